"""Depth pruning end to end: calibration -> teacher -> search -> reference baselines -> evaluation -> export."""
from __future__ import annotations

import logging
import time

import numpy as np

from evoexp.blockrun import BlockRunner
from evoexp.config import EvoPressCfg, RunCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.errors import UserError
from evoexp.eval import evaluate_ppl, evaluate_zeroshot, heldout_tracker
from evoexp.eval.zeroshot import zeroshot_wanted
from evoexp.fitness import Teacher
from evoexp.methods.depth import (SCORE_BASELINES, DepthSpace, brute_force, depth_space, minibatch, random_best,
                                  score_baseline)
from evoexp.methods.drop import DropApplier, export_dropped
from evoexp.models import LoadedModel
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage
from evoexp.utils import write_json

log = logging.getLogger(__name__)
SEARCHES = ("evopress", "random", "brute", *SCORE_BASELINES)


class DepthPruningRecipe:
    def __init__(self, rc: RunCfg, loaded: LoadedModel, out_dir, tracker, timed):
        self.rc, self.loaded, self.out_dir, self.tracker, self.timed = rc, loaded, out_dir, tracker, timed

    def run(self) -> dict:
        rc, adapter = self.rc, self.loaded.adapter
        if rc.search.kind not in SEARCHES:
            raise UserError(f"search: {rc.search.kind!r} does not apply to method=drop ({', '.join(SEARCHES)})")
        with self.timed("calibration"):
            stream = load_tokens(rc.data.calib, self.loaded.tokenizer, rc.data.jsonl_field)
            windows, proto = calibration_windows(stream, self.loaded.tokenizer, rc.data.seq_len,
                                                 rc.data.calib_windows, rc.data.seed, rc.data.bos)
        runner = BlockRunner(adapter)
        with self.timed("teacher"):
            teacher = Teacher(adapter, windows, rc.fitness.kind, rc.fitness.topk, rc.fitness.chunk_tokens,
                              rc.fitness.max_memory_gb, self.out_dir).build(runner)
        ds = depth_space(rc.method, adapter.num_blocks)
        self.applier = DropApplier(adapter)
        apply = lambda st: self.applier.apply(ds.to_config(st))  # noqa: E731
        max_batch = getattr(rc.search, "max_batch", 8)
        # what a state means, for the one-off scorings kept in the run dir (see CandidateEvaluator)
        keep = {"scores_dir": self.out_dir, "context": {"model": self.loaded.fingerprint, "units": ds.space.names}}
        evaluator = CandidateEvaluator(runner, teacher, apply, ds.space.unit_block, max_batch,
                                       getattr(rc.search, "incremental", True), **keep)
        ppl_evaluator = CandidateEvaluator(runner, Teacher(adapter, windows, "ppl"), apply, ds.space.unit_block,
                                           max_batch, **keep)

        with self.timed("search"):
            t0 = time.time()
            state, search_info = self.search(ds, evaluator, ppl_evaluator)
            search_info["seconds"] = round(time.time() - t0, 2)
        states = {"dense": np.zeros(ds.space.size, dtype=np.int64), rc.search.kind: state}
        references = rc.search.references if rc.search.references is not None else ["shortgpt"]
        for name in references:
            if name not in states:
                with self.timed(f"reference_{name}"):
                    states[name] = self.baseline(name, ds, ppl_evaluator)

        models = self.evaluate(states, ds, evaluator, teacher)
        self.applier.restore()
        allocation = self.allocation(ds, state, search_info)
        write_json(self.out_dir / "allocation.json", allocation)
        if rc.export.kind not in ("none", "hf", "auto"):
            raise UserError(f"export: method=drop exports as hf, not {rc.export.kind}")
        if rc.method.export or rc.export.kind != "none":
            with self.timed("export"):
                export_dropped(self.loaded.model, self.loaded.tokenizer, ds.to_config(state),
                               self.out_dir / "model")
        return {"calibration": proto.as_dict(), "search": search_info, "allocation": allocation, "models": models,
                "ppl": models[rc.search.kind].get("ppl", {}), "zeroshot": models[rc.search.kind].get("zeroshot")}

    # --- choosing what to drop -----------------------------------------------------------------------------------
    def search(self, ds: DepthSpace, evaluator: CandidateEvaluator, ppl_evaluator: CandidateEvaluator):
        rc, s = self.rc, self.rc.search
        rng = np.random.Generator(np.random.PCG64(rc.seed))
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
        if kind not in SCORE_BASELINES:
            raise UserError(f"search.references: {kind!r} is not a depth baseline ({', '.join(SCORE_BASELINES)})")
        tokens = getattr(self.rc.search, "tokens", 8192) if self.rc.search.kind == kind else 8192
        rng = np.random.Generator(np.random.PCG64(self.rc.seed + 1))
        batch = minibatch(ppl_evaluator.teacher, min(tokens, ppl_evaluator.teacher.windows.numel()), rng)
        return score_baseline(kind, ds, ppl_evaluator, batch)

    def evopress(self, ds: DepthSpace, evaluator: CandidateEvaluator, s: EvoPressCfg):
        settings = EvoPressSettings(
            generations=s.generations if s.generations is not None else ds.default_generations,
            offspring=s.offspring, stages=[Stage(st.survivors, st.tokens) for st in s.stages],
            max_switches=s.max_switches, init=s.init or "random", init_candidates=s.init_candidates,
            init_tokens=s.init_tokens, max_tries=s.max_tries, track_every=s.track_every)
        teacher = evaluator.teacher
        track = heldout_tracker(self.loaded, self.rc.eval, self.rc.dtype.value, s,
                                lambda st: self.applier.apply(ds.to_config(st)))

        def sample(tokens, rng):
            return minibatch(teacher, tokens, rng)

        def on_generation(record):
            self.tracker.log({"search": {"generation": record["generation"], "fitness": record["parent_fitness"],
                                         "evaluations": record["evaluations"], "seconds": record["seconds"],
                                         **({"heldout_ppl": record["heldout"]} if "heldout" in record else {})}})

        engine = EvoPress(settings, ds.space, evaluator, sample, self.rc.seed, self.out_dir, on_generation,
                          track=track)
        result = engine.run()
        return result.state, {"kind": "evopress", "fitness": result.fitness, "generations": result.generations,
                              "evaluations": evaluator.evaluations, "block_passes": evaluator.block_passes}

    # --- reporting ---------------------------------------------------------------------------------------------
    def evaluate(self, states: dict, ds: DepthSpace, evaluator: CandidateEvaluator, teacher: Teacher) -> dict:
        """Fitness on one fixed calibration minibatch and held-out PPL, for dense, found and references."""
        rc = self.rc
        rng = np.random.Generator(np.random.PCG64(rc.seed + 2))
        batch = minibatch(teacher, min(rc.fitness.report_tokens, teacher.windows.numel()), rng)
        with self.timed("report_fitness"):
            fits = evaluator.score(list(states.values()), batch, desc="report fitness")
        models = {}
        for (name, st), fit in zip(states.items(), fits):
            cfg = ds.to_config(st)
            entry = {"fitness": fit, "fitness_kind": rc.fitness.kind, "fitness_tokens": batch.tokens,
                     "lines": cfg.lines()}
            self.applier.apply(cfg)
            if rc.eval.ppl and rc.eval.datasets:
                with self.timed(f"eval_ppl_{name}"):
                    entry["ppl"] = evaluate_ppl(self.loaded, rc.eval, rc.dtype.value, dense=name == "dense",
                                               run_dir=self.out_dir, state_id=entry["lines"])
            if zeroshot_wanted(rc.eval.zeroshot, name, rc.search.kind):
                with self.timed(f"eval_zeroshot_{name}"):
                    entry["zeroshot"] = evaluate_zeroshot(self.loaded, rc.eval.zeroshot, rc.dtype.value,
                                                          dense=name == "dense", run_dir=self.out_dir,
                                                          state=name, state_id=entry["lines"])
            models[name] = entry
        return models

    def allocation(self, ds: DepthSpace, state: np.ndarray, info: dict) -> dict:
        cfg = ds.to_config(state)
        attn = [i for i, d in enumerate(cfg.attn) if d]
        mlp = [i for i, d in enumerate(cfg.mlp) if d]
        return {"method": "drop", "unit": ds.unit, "target": self.rc.method.target, "search": info["kind"],
                "units": dict(zip(ds.space.names, state.tolist())), "drop": cfg.to_dict(),
                "attn_dropped": attn, "mlp_dropped": mlp,
                "summary": f"attention dropped in blocks {attn}, MLP dropped in blocks {mlp}"}
