"""Per-layer sparsity / quantization end to end: calibration -> database -> allocation -> evaluation -> export.

An allocation is a level (grid index) for every layer of one database. `search=uniform` takes the target level
everywhere; `evopress` searches the level space (equal parameter steps for sparsity, bit-widths for
quantization); `random`, `dp` and `owl` are the paper's baselines. Every allocation is evaluated the same way.
What differs between sparsity and bit-widths is the method's `LevelKind` (methods/level_kinds.py); the
databases come from `DatabaseProvider` (database/provision.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from evoexp.blockrun import BlockRunner
from evoexp.config import DPSearchCfg, OwlSearchCfg, RandomSearchCfg, RunCfg
from evoexp.database import Database, LevelApplier
from evoexp.database.provision import DatabaseProvider
from evoexp.methods.export import FORMATS, CardFacts, export_allocation, model_card
from evoexp.methods.layer_baselines import dp_state, owl_candidates
from evoexp.methods.layerwise import (Allocation, LayerLevels, bits_of, fractional_start, group_sums, per_block,
                                      quant_levels, units)
from evoexp.methods.level_kinds import LEVEL_KINDS
from evoexp.models.adapter import LinearInfo
from evoexp.recipes.common import (build_teacher, calibration, capped_minibatch, evaluate_models, evopress_settings,
                                   rng_for, run_evopress)
from evoexp.recipes.contract import RecipeContext, RecipeResult
from evoexp.recipes.layerwise_checks import check_layerwise, reference_cfg
from evoexp.recipes.posttrain import FoundModel, post_train
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.utils import stable_hash, write_json

log = logging.getLogger(__name__)
EVOPRESS_SEED, RANDOM_SEED, OWL_SEED = 7, 11, 13  # offsets of the run's seed for each one-off random draw


class LayerwiseRecipe:
    kinds = ("sparse", "quant")

    @classmethod
    def validate(cls, rc: RunCfg) -> None:
        check_layerwise(rc)

    def __init__(self, ctx: RecipeContext):
        self.ctx, self.rc = ctx, ctx.rc
        self.kind = LEVEL_KINDS[self.rc.method.kind]
        self.adapter = ctx.loaded.adapter
        self.layers = self.unit_layers()
        self.runner = BlockRunner(self.adapter)
        self.appliers: dict[str, LevelApplier] = {}
        self.teacher = None
        self._levels: LayerLevels | None = None
        rc, loaded = self.rc, ctx.loaded
        self.dbs = DatabaseProvider(
            self.adapter, loaded.name, loaded.fingerprint, rc.method, rc.solver, rc.database, rc.dtype.value,
            calibration=lambda: calibration(ctx, rc.database.seq_len, rc.database.windows),
            dense=lambda: self.put(None), timed=ctx.timed, **self.database_options())

    def unit_layers(self) -> list[LinearInfo]:
        """The layers the database holds and the searches set (a method's own recipe may narrow them)."""
        return units(self.adapter)

    def database_options(self) -> dict:
        """What the method adds to its databases' specs (see DatabaseProvider): nothing for sparse and quant."""
        return {}

    @property
    def fractional(self) -> bool:
        return self.kind.fractional(self.rc.method)

    def references(self) -> list[str]:
        s = self.rc.search
        if s.references is not None:
            refs = list(s.references)
        else:
            refs = [] if s.kind == "uniform" or self.fractional else ["uniform"]
        return [r for r in refs if r != s.kind]

    # --- the run ------------------------------------------------------------------------------------------------
    def run(self) -> RecipeResult:
        ctx, rc = self.ctx, self.rc
        kind, refs = rc.search.kind, self.references()
        if kind != "uniform" or refs:
            with ctx.timed("teacher"):
                windows, _ = calibration(ctx, rc.data.seq_len, rc.data.calib_windows)
                self.teacher = build_teacher(ctx, windows, self.runner)
        with ctx.timed("search"):
            t0 = time.time()
            found = self.choose(kind, rc.search)
            found.info["seconds"] = round(time.time() - t0, 2)
        allocations = {kind: found}
        for name in refs:
            with ctx.timed(f"reference_{name}"):
                allocations[name] = self.choose(name, reference_cfg(rc.search, name))
        models = evaluate_models(ctx, {"dense": None, **allocations}, self.put, self.details,
                                 lambda a: None if a is None else [a.db.key, a.levels],
                                 self.alloc_evaluator() if self.teacher is not None else None)
        self.put(None)
        allocation = self.describe(found, models[kind].details["achieved"])
        write_json(ctx.out_dir / "allocation.json", allocation)
        ctx.tracker.summary({"achieved": models[kind].details["achieved"]})
        if rc.train.kind == "none":
            self.export(found, allocation, models[kind].to_json())
        else:  # the found model trained in place, evaluated again and exported trained (recipes/posttrain.py)
            models[f"{kind}_trained"] = post_train(
                ctx, self.runner, f"{kind}_trained", self.found_model(found),
                while_trained=lambda entry: self.export(found, allocation, entry.to_json(), held=True))
        db = found.db
        database = {"key": db.key, "path": str(db.path), "reused": self.dbs.reused[db.key], **db.info()}
        return RecipeResult(kind, models, allocation, found.info, {"database": database})

    # --- choosing levels ----------------------------------------------------------------------------------------
    def choose(self, kind: str, cfg) -> Allocation:
        choosers = {"uniform": lambda: self.uniform(), "evopress": lambda: self.evopress(cfg),
                    "random": lambda: self.random(cfg or RandomSearchCfg()),
                    "dp": lambda: self.dp(cfg or DPSearchCfg()), "owl": lambda: self.owl(cfg or OwlSearchCfg())}
        return choosers[kind]()

    def uniform(self) -> Allocation:
        if self.rc.search.kind == "uniform" and not self.references():  # one level: the standard pipeline
            db = self.dbs.get(self.kind.grid(self.rc.method, self.layers))
            return Allocation(db, {li.name: 0 for li in self.layers}, {"kind": "uniform"})
        lv = self.level_space()
        return Allocation(self.search_db(), lv.layers_of(lv.space.uniform_state()), {"kind": "uniform"})

    def evopress(self, s) -> Allocation:
        m = self.rc.method
        db, lv, start = self.search_db(), self.level_space(), None
        init = s.init or ("fractional" if self.fractional else "uniform")
        if init == "fractional":
            rng = rng_for(self.ctx, EVOPRESS_SEED)
            start, fit = self.best_of(self.fractional_starts(s.init_candidates, rng), db, s.init_tokens, rng,
                                      "random starts")
            lv = quant_levels(self.layers, m.target, m.levels, m.group_rule, m.tied,
                              state_sums=group_sums(lv.space, start))
            log.info("fractional start: best of %d random allocations at %.4f bits, fitness %.5f on %d tokens",
                     s.init_candidates, bits_of(lv, start, min(m.levels)), fit, s.init_tokens)
            init = "given"
        evaluator = self.state_evaluator(lv, db, s.max_batch, s.incremental)
        # decodes of database levels, counted across processes with the search's own counters (search_state.json)
        evaluator.extra_counters["level_loads"] = lambda: self.appliers[db.key].loads if db.key in self.appliers else 0
        result = run_evopress(self.ctx, evopress_settings(s, self.kind.default_generations, init), s, lv.space,
                              evaluator, start)
        return Allocation(db, lv.layers_of(result.state), {
            "kind": "evopress", "fitness": result.fitness, "generations": result.generations,
            "evaluations": evaluator.evaluations, "block_passes": evaluator.block_passes,
            "level_loads": evaluator.counters()["level_loads"], "init": s.init or init})

    def random(self, s: RandomSearchCfg) -> Allocation:
        db, lv = self.search_db(), self.level_space()
        rng = rng_for(self.ctx, RANDOM_SEED)
        states = (self.fractional_starts(s.candidates, rng) if self.fractional
                  else lv.space.random_states(rng, s.candidates))
        best, fit = self.best_of(states, db, s.tokens, rng, "random")
        return Allocation(db, lv.layers_of(best), {"kind": "random", "fitness": fit, "candidates": len(states),
                                                   "tokens": s.tokens})

    def dp(self, s: DPSearchCfg) -> Allocation:
        db, lv = self.search_db(), self.level_space()
        state, total = dp_state(lv, db, self.rc.method, s)
        return Allocation(db, lv.layers_of(state), {"kind": "dp", "error_sum": total})

    def owl(self, s: OwlSearchCfg) -> Allocation:
        """OWL's block sparsities for every (lambda, M) of the grid, the best one on calibration KL."""
        with self.ctx.timed("owl_scores"):
            norms = self.dbs.activation_norms(self.runner)
            self.put(None)
            weights = {li.name: self.adapter.module(li.name).weight.data for li in self.layers}
            grid, candidates = owl_candidates(self.layers, weights, norms, self.rc.method.target, s,
                                              with_target=self.rc.database.propagation == "compressed")
        db = self.dbs.get(grid, label_extra="owl")
        numel = {li.name: li.numel for li in self.layers}
        allocs = [Allocation(db, {n: grid[n].index(z[n] / numel[n]) for n in grid}, {"kind": "owl", **info})
                  for info, z in candidates]
        if len(allocs) == 1:
            return allocs[0]
        batch = capped_minibatch(self.teacher, s.tokens, rng_for(self.ctx, OWL_SEED))
        fits = self.alloc_evaluator().score(allocs, batch, desc="owl grid")
        best = int(np.argmin(fits))
        allocs[best].info.update({"fitness": fits[best], "tokens": batch.tokens,
                                  "grid": [{"lambda": a.info["lambda"], "m": a.info["m"], "fitness": f}
                                           for a, f in zip(allocs, fits)]})
        log.info("OWL: best lambda=%g M=%g of %d on %d tokens", allocs[best].info["lambda"],
                 allocs[best].info["m"], len(allocs), batch.tokens)
        return allocs[best]

    # --- helpers for the searches -------------------------------------------------------------------------------
    def level_space(self) -> LayerLevels:
        if self._levels is None:
            hidden = self.adapter.model.config.hidden_size
            self._levels = self.kind.level_space(self.rc.method, self.layers, hidden)
        return self._levels

    def search_db(self) -> Database:
        return self.dbs.get(self.level_space().grid)

    def fractional_starts(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        m = self.rc.method
        return [fractional_start(self.level_space(), m.target, m.levels, rng) for _ in range(n)]

    def best_of(self, states: list[np.ndarray], db: Database, tokens: int, rng, desc: str
                ) -> tuple[np.ndarray, float]:
        batch = capped_minibatch(self.teacher, tokens, rng)
        fits = self.state_evaluator(self.level_space(), db).score(states, batch, desc=desc)
        best = int(np.argmin(fits))
        return states[best], float(fits[best])

    def state_evaluator(self, lv: LayerLevels, db: Database, max_batch: int = 8, incremental: bool = True):
        return CandidateEvaluator(self.runner, self.teacher, lambda st: self.put_levels(db, lv.layers_of(st)),
                                  lv.space.unit_block, max_batch, incremental, scores_dir=self.ctx.out_dir,
                                  context={"model": self.ctx.loaded.fingerprint, "database": db.key,
                                           "units": lv.space.names})

    def alloc_evaluator(self) -> CandidateEvaluator:
        """Scores Allocation objects (always a full forward: they share no parent)."""
        return CandidateEvaluator(self.runner, self.teacher, self.put, np.zeros(0), incremental=False,
                                  scores_dir=self.ctx.out_dir, context={"model": self.ctx.loaded.fingerprint},
                                  key_of=lambda a: stable_hash(None if a is None  # None: the dense model
                                                               else {"database": a.db.key, "levels": a.levels}))

    # --- putting levels into the model ---------------------------------------------------------------------------
    def put(self, alloc: Allocation | None) -> None:
        """The model with an allocation's weights (None: dense)."""
        if alloc is None:
            for applier in self.appliers.values():
                applier.restore()
            return
        self.put_levels(alloc.db, alloc.levels)

    def put_levels(self, db: Database, levels: dict[str, int]) -> None:
        for key, applier in self.appliers.items():
            if key != db.key:
                applier.restore()
        if db.key not in self.appliers:
            self.appliers[db.key] = LevelApplier(self.adapter, db, self.rc.database.cache_gb)
        self.appliers[db.key].apply(levels)

    # --- reporting ------------------------------------------------------------------------------------------------
    def details(self, alloc: Allocation | None) -> dict:
        """What the model now holding `alloc` achieves, measured in its weights (nothing for dense)."""
        if alloc is None:
            return {}
        achieved = self.kind.measure(self.adapter, alloc)
        return {"achieved": achieved, "summary": self.kind.summary(achieved, len(alloc.levels)),
                "per_block": per_block(self.layers, alloc.values())}

    def describe(self, alloc: Allocation, achieved: dict) -> dict:
        """allocation.json: the found allocation's level of every layer and what it achieves."""
        rc, values = self.rc, alloc.values()
        info = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in alloc.info.items()}
        return {"method": rc.method.kind, "target": rc.method.target, "search": rc.search.kind,
                "solver": rc.solver.kind, "database": alloc.db.key, "achieved": achieved, "levels": values,
                "per_block": per_block(self.layers, values), "numel": {li.short: li.numel for li in self.layers},
                "search_info": info, "summary": self.kind.summary(achieved, len(values))}

    def export_format(self) -> str:
        """What export= (or method.export=true) asks for, `auto` resolved: a format, or none."""
        rc = self.rc
        fmt = rc.export.kind
        if fmt == "auto" or (fmt == "none" and rc.method.export):
            fmt = self.kind.natural_format
        assert fmt == "none" or fmt in FORMATS  # validate() admits no other
        return fmt

    def card_facts(self) -> CardFacts:
        rc, loaded = self.rc, self.ctx.loaded
        return CardFacts(loaded.name, loaded.source, loaded.fingerprint, rc.method.kind, rc.method.target,
                         rc.search.kind, rc.solver.kind, f"`{rc.data.calib}`, database {rc.database.windows} x "
                         f"{rc.database.seq_len} tokens, seed {rc.data.seed}", rc.seed)

    def export(self, found: Allocation, allocation: dict, entry: dict, held: bool = False) -> None:
        """Write the found model (`held`: the one the model holds now, trained; else from the database)."""
        loaded, fmt = self.ctx.loaded, self.export_format()
        if fmt == "none":
            return
        with self.ctx.timed("export"):
            if not held:
                self.put(found)
            try:
                export_allocation(loaded.model, loaded.tokenizer, found, allocation,
                                  model_card(self.card_facts(), allocation, entry, fmt), fmt,
                                  self.ctx.out_dir / "model")
            finally:
                if not held:
                    self.put(None)

    def found_model(self, alloc: Allocation) -> FoundModel:
        """The allocation as post-training takes it (see `kept_entries`)."""
        return FoundModel(lambda: self.put(alloc), lambda: self.put(None), lambda: self.kept_entries(alloc),
                          [alloc.db.key, alloc.levels], lambda: self.details(alloc))

    def kept_entries(self, alloc: Allocation) -> dict:
        """{weight: bool mask of the entries that stay} with `alloc` in place: a sparse layer's non-zeros."""
        return {w: w != 0 for w in (self.adapter.module(name).weight for name in alloc.levels)}
