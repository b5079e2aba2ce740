"""Depth pruning end to end: calibration -> teacher -> search -> reference baselines -> evaluation -> export."""
from __future__ import annotations

import time

import numpy as np

from evoexp.blockrun import BlockRunner
from evoexp.config import EvoPressCfg, RunCfg, ScoreSearchCfg
from evoexp.errors import UserError
from evoexp.fitness import Teacher, minibatch
from evoexp.methods.depth import (SCORE_BASELINES, DepthSpace, brute_force, check_depth_method, depth_space,
                                  random_best, score_baseline)
from evoexp.methods.drop import DropApplier, DropConfig, export_dropped
from evoexp.models.peek import peek_blocks
from evoexp.recipes.common import (build_teacher, calibration, capped_minibatch, evaluate_models, evopress_settings,
                                   rng_for, run_evopress)
from evoexp.recipes.checks import check_calibration, check_search, evopress_tokens
from evoexp.recipes.contract import RecipeContext, RecipeResult
from evoexp.recipes.posttrain import FoundModel, post_train
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.utils import write_json

SEARCHES = ("evopress", "random", "brute", *SCORE_BASELINES)
EXPORTS = ("none", "hf", "auto")
SEARCH_SEED, BASELINE_SEED = 0, 1  # offsets of the run's seed: the search's draws, the score baselines' minibatch


class DepthPruningRecipe:
    kinds = ("drop",)

    @classmethod
    def validate(cls, rc: RunCfg) -> None:
        s = rc.search
        if s.kind not in SEARCHES:
            raise UserError(f"search: {s.kind!r} does not apply to method=drop ({', '.join(SEARCHES)})")
        bad = [r for r in (s.references or []) if r not in SCORE_BASELINES]
        if bad:
            raise UserError(f"search.references: {bad[0]!r} is not a depth baseline ({', '.join(SCORE_BASELINES)})")
        if rc.export.kind not in EXPORTS:
            raise UserError(f"export: method=drop exports as hf, not {rc.export.kind}")
        check_depth_method(rc.method, peek_blocks(rc.model))
        check_search(s)
        if isinstance(s, EvoPressCfg):
            check_calibration(rc, evopress_tokens(s))
        elif s.kind in ("random", "brute"):  # their minibatch is drawn uncapped
            check_calibration(rc, [("search.tokens", s.tokens)])

    def __init__(self, ctx: RecipeContext):
        self.ctx, self.rc = ctx, ctx.rc
        self.applier = DropApplier(ctx.loaded.adapter)

    def run(self) -> RecipeResult:
        ctx, rc, adapter = self.ctx, self.rc, self.ctx.loaded.adapter
        with ctx.timed("calibration"):
            windows, proto = calibration(ctx, rc.data.seq_len, rc.data.calib_windows)
        runner = BlockRunner(adapter)
        with ctx.timed("teacher"):
            teacher = build_teacher(ctx, windows, runner)
        ds = depth_space(rc.method, adapter.num_blocks)
        evaluator = self.evaluator(ds, runner, teacher, **evaluator_options(rc.search))
        ppl_evaluator = self.evaluator(ds, runner, Teacher(adapter, windows, "ppl"), **evaluator_options(rc.search,
                                                                                                          False))
        with ctx.timed("search"):
            t0 = time.time()
            state, search_info = self.search(ds, evaluator, ppl_evaluator)
            search_info["seconds"] = round(time.time() - t0, 2)
        states = {"dense": np.zeros(ds.space.size, dtype=np.int64), rc.search.kind: state}
        for name in rc.search.references if rc.search.references is not None else ["shortgpt"]:
            if name not in states:
                with ctx.timed(f"reference_{name}"):
                    states[name] = self.baseline(name, ds, ppl_evaluator)
        lines = lambda st: ds.to_config(st).lines()  # noqa: E731 - what identifies a dropped model
        models = evaluate_models(ctx, states, lambda st: self.applier.apply(ds.to_config(st)),
                                 lambda st: {"lines": lines(st)}, lines, evaluator)
        self.applier.restore()
        allocation = self.allocation(ds, state, search_info)
        write_json(ctx.out_dir / "allocation.json", allocation)
        found = ds.to_config(state)
        export = (lambda _entry=None: self.export(found)) if rc.method.export or rc.export.kind != "none" else None
        if rc.train.kind != "none":  # the found model trained, evaluated again and exported trained
            found_model = FoundModel(lambda: self.applier.apply(found), self.applier.restore, lambda: {},
                                     lines(state), lambda: {"lines": lines(state)})
            models[f"{rc.search.kind}_trained"] = post_train(ctx, runner, f"{rc.search.kind}_trained", found_model,
                                                             while_trained=export)
        elif export is not None:
            export()
        return RecipeResult(rc.search.kind, models, allocation, search_info, {"calibration": proto.as_dict()})

    def export(self, cfg: DropConfig) -> None:
        """The model without the dropped blocks, with the weights the kept ones hold now (trained or dense)."""
        with self.ctx.timed("export"):
            self.applier.restore()  # export_dropped copies the undropped model and removes blocks itself
            export_dropped(self.ctx.loaded.model, self.ctx.loaded.tokenizer, cfg, self.ctx.out_dir / "model")

    def evaluator(self, ds: DepthSpace, runner: BlockRunner, teacher: Teacher, **options) -> CandidateEvaluator:
        """Scores drop states; one-off scorings are kept in the run dir, keyed by what a state means."""
        keep = {"scores_dir": self.ctx.out_dir,
                "context": {"model": self.ctx.loaded.fingerprint, "units": ds.space.names}}
        return CandidateEvaluator(runner, teacher, lambda st: self.applier.apply(ds.to_config(st)),
                                  ds.space.unit_block, **options, **keep)

    # --- choosing what to drop -----------------------------------------------------------------------------------
    def search(self, ds: DepthSpace, evaluator: CandidateEvaluator, ppl_evaluator: CandidateEvaluator):
        s = self.rc.search
        rng = rng_for(self.ctx, SEARCH_SEED)
        if s.kind == "evopress":
            return self.evopress(ds, evaluator, s)
        if s.kind == "random":
            state, fit = random_best(ds, evaluator, minibatch(evaluator.teacher, s.tokens, rng), s.candidates, rng)
            return state, {"kind": "random", "fitness": fit, "candidates": s.candidates}
        if s.kind == "brute":
            state, fit = brute_force(ds, evaluator, minibatch(evaluator.teacher, s.tokens, rng), s.max_states)
            return state, {"kind": "brute", "fitness": fit, "states": ds.space.count_states()}
        return self.baseline(s.kind, ds, ppl_evaluator), {"kind": s.kind}

    def baseline(self, kind: str, ds: DepthSpace, ppl_evaluator: CandidateEvaluator) -> np.ndarray:
        """A score baseline's state, on its own settings when it is the search, else on its defaults."""
        cfg = self.rc.search if self.rc.search.kind == kind else ScoreSearchCfg(kind=kind)
        batch = capped_minibatch(ppl_evaluator.teacher, cfg.tokens, rng_for(self.ctx, BASELINE_SEED))
        return score_baseline(kind, ds, ppl_evaluator, batch)

    def evopress(self, ds: DepthSpace, evaluator: CandidateEvaluator, s: EvoPressCfg):
        settings = evopress_settings(s, ds.default_generations, s.init or "random")
        result = run_evopress(self.ctx, settings, s, ds.space, evaluator)
        return result.state, {"kind": "evopress", "fitness": result.fitness, "generations": result.generations,
                              "evaluations": evaluator.evaluations, "block_passes": evaluator.block_passes}

    def allocation(self, ds: DepthSpace, state: np.ndarray, info: dict) -> dict:
        cfg = ds.to_config(state)
        attn = [i for i, d in enumerate(cfg.attn) if d]
        mlp = [i for i, d in enumerate(cfg.mlp) if d]
        return {"method": "drop", "unit": ds.unit, "target": self.rc.method.target, "search": info["kind"],
                "units": dict(zip(ds.space.names, state.tolist())), "drop": cfg.to_dict(),
                "attn_dropped": attn, "mlp_dropped": mlp,
                "summary": f"attention dropped in blocks {attn}, MLP dropped in blocks {mlp}"}


def evaluator_options(search, incremental: bool = True) -> dict:
    """The candidate scoring settings a search config has (EvoPress's); others score with the defaults."""
    options = {k: getattr(search, k) for k in ("max_batch", "incremental") if hasattr(search, k)}
    if not incremental:
        options.pop("incremental", None)
    return options
