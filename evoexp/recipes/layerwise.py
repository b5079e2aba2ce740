"""Per-layer sparsity / quantization end to end: calibration -> database -> allocation -> evaluation -> export.

An allocation is a level (grid index) for every layer of one database. `search=uniform` takes the target level
everywhere; `evopress` searches the level space (equal parameter steps for sparsity, bit-widths for
quantization); `random`, `dp` and `owl` are the paper's baselines. Every allocation is evaluated the same way.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from evoexp.blockrun import BlockRunner
from evoexp.config import DPSearchCfg, OwlSearchCfg, RandomSearchCfg, RunCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, DatabaseSpec, LevelApplier, build_database, check_solver
from evoexp.errors import Stop, UserError
from evoexp.eval import evaluate_ppl, evaluate_zeroshot, heldout_tracker
from evoexp.eval.zeroshot import zeroshot_wanted
from evoexp.fitness import Teacher
from evoexp.methods.allocate import group_knapsack, knapsack, outlier_ratios, owl_block_sparsity, owl_zeros
from evoexp.methods.depth import minibatch
from evoexp.methods.layerwise import (LayerLevels, bits_of, default_step, fractional_start, group_sums,
                                      quant_levels, resolve_propagation, sparse_levels, uniform_grid, units)
from evoexp.models import LoadedModel
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage
from evoexp.solvers.capture import activation_norms
from evoexp.utils import cache_root, stable_hash, write_json

log = logging.getLogger(__name__)
SEARCHES = ("uniform", "evopress", "random", "dp", "owl")
BASELINES = ("uniform", "random", "dp", "owl")
DEFAULT_GENERATIONS = {"sparse": 400, "quant": 150}


@dataclass
class Allocation:
    """A level (index into the database grid) for every layer."""

    db: Database
    levels: dict[str, int]
    info: dict = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        return {name: self.db.spec.grid[name][i] for name, i in self.levels.items()}


class LayerwiseRecipe:
    def __init__(self, rc: RunCfg, loaded: LoadedModel, out_dir, tracker, timed):
        self.rc, self.loaded, self.out_dir, self.tracker, self.timed = rc, loaded, out_dir, tracker, timed
        self.adapter = loaded.adapter
        self.layers = units(self.adapter)
        self.appliers: dict[str, LevelApplier] = {}
        self.databases: dict[str, Database] = {}
        self.reused: dict[str, bool] = {}  # database key -> complete before this run
        self._db_windows = None
        self._levels: LayerLevels | None = None
        self.teacher: Teacher | None = None
        self.runner = BlockRunner(self.adapter)

    # --- configuration ------------------------------------------------------------------------------------------
    @staticmethod
    def validate(rc: RunCfg) -> None:
        """Config mistakes that can be caught before the model is loaded."""
        m, s = rc.method, rc.search
        if s.kind not in SEARCHES:
            raise UserError(f"search: {s.kind!r} does not apply to method={m.kind} ({', '.join(SEARCHES)})")
        if rc.solver is None:
            raise UserError(f"solver: method={m.kind} needs a solver (solver=...)")
        check_solver(m.kind, rc.solver.kind)
        shard = rc.database.shard
        if shard is not None and (len(shard) != 2 or not 0 <= shard[0] < shard[1]):
            raise UserError(f"database.shard: expected [i, n] with 0 <= i < n, got {list(shard)}")
        solver = _solver_class(rc.solver.kind)
        solver.check_config(rc.solver)
        if solver.propagation and rc.database.propagation not in ("auto", solver.propagation):
            raise UserError(f"database.propagation: solver={rc.solver.kind} fixes it to {solver.propagation}; "
                            f"use auto or {solver.propagation}, not {rc.database.propagation}")
        bad = [r for r in (s.references or []) if r not in BASELINES]
        if bad:
            raise UserError(f"search.references: {bad[0]!r} is not a baseline of method={m.kind} "
                            f"({', '.join(BASELINES)})")
        for name in getattr(s, "reference_settings", None) or {}:
            reference_cfg(s, name)
        kinds = [s.kind, *(s.references or [])]
        dp = [s] if s.kind == "dp" else [reference_cfg(s, "dp") or DPSearchCfg()] if "dp" in kinds else []
        if dp and dp[0].budget not in ("pooled", "groups"):
            key = "search.budget" if s.kind == "dp" else "search.reference_settings.dp.budget"
            raise UserError(f"{key}: expected pooled or groups, got {dp[0].budget!r}")
        if m.kind == "quant" and "owl" in kinds:
            raise UserError("search: owl allocates sparsity; it does not apply to method=quant")
        if getattr(m, "nm", None) and any(k != "uniform" for k in kinds):
            raise UserError(f"method.nm: {m.nm[0]}:{m.nm[1]} fixes every layer at the same sparsity; only "
                            "search=uniform applies")
        if rc.export.kind not in ("none", "auto", "hf", "compressed_tensors", "gptq"):
            raise UserError(f"export: expected none, auto, hf, compressed_tensors or gptq, got {rc.export.kind!r}")
        if rc.export.kind in ("compressed_tensors", "gptq") and m.kind != "quant":
            raise UserError(f"export: {rc.export.kind} packs quantized weights; method={m.kind} exports as hf")
        if m.kind == "quant" and m.target != int(m.target) and s.kind == "uniform":
            raise UserError(f"method.target: search=uniform needs a whole bit-width, got {m.target} (fractional "
                            "targets need a search over bit-widths, e.g. search=evopress)")

    def export_format(self) -> str:
        from evoexp.methods.export import natural_format

        kind = self.rc.export.kind
        if kind == "auto" or (kind == "none" and self.rc.method.export):
            return natural_format(self.rc.method.kind)
        return kind

    def references(self) -> list[str]:
        s, m = self.rc.search, self.rc.method
        if s.references is not None:
            refs = list(s.references)
        elif s.kind == "uniform" or self.fractional:
            refs = []
        else:
            refs = ["uniform"]
        return [r for r in refs if r != s.kind]

    @property
    def fractional(self) -> bool:
        m = self.rc.method
        return m.kind == "quant" and m.target != int(m.target)

    # --- the run ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        rc = self.rc
        self.validate(rc)
        kind, refs = rc.search.kind, self.references()
        if kind != "uniform" or refs:
            with self.timed("teacher"):
                self.teacher = self.build_teacher()
        with self.timed("search"):
            t0 = time.time()
            found = self.choose(kind, rc.search)
            found.info["seconds"] = round(time.time() - t0, 2)
        allocations = {kind: found}
        for name in refs:
            with self.timed(f"reference_{name}"):
                allocations[name] = self.choose(name, reference_cfg(rc.search, name))
        models = self.evaluate({"dense": None, **allocations})
        self.put(None)
        allocation = self.describe(found)
        write_json(self.out_dir / "allocation.json", allocation)
        self.tracker.summary({"achieved": models[kind]["achieved"]})
        fmt = self.export_format()
        if fmt != "none":
            from evoexp.methods.export import export_allocation

            with self.timed("export"):
                export_allocation(self, found, allocation, models, fmt)
        db = found.db
        return {"database": {"key": db.key, "path": str(db.path), "reused": self.reused[db.key], **db.info()},
                "search": found.info, "allocation": allocation, "models": models,
                "ppl": models[kind].get("ppl", {}), "zeroshot": models[kind].get("zeroshot")}

    # --- choosing levels ----------------------------------------------------------------------------------------
    def choose(self, kind: str, cfg) -> Allocation:
        m = self.rc.method
        if kind == "uniform":
            return self.uniform()
        if kind == "evopress":
            return self.evopress(cfg)
        if kind == "random":
            return self.random(cfg or RandomSearchCfg())
        if kind == "dp":
            return self.dp(cfg or DPSearchCfg())
        if kind == "owl":
            return self.owl(cfg or OwlSearchCfg())
        raise UserError(f"search: {kind!r} does not apply to method={m.kind}")

    def uniform(self) -> Allocation:
        m = self.rc.method
        if self.rc.search.kind == "uniform" and not self.references():  # one level: the standard pipeline
            db = self.database(uniform_grid(m, self.layers))
            return Allocation(db, {li.name: 0 for li in self.layers}, {"kind": "uniform"})
        if self.fractional:
            raise UserError(f"search.references: uniform needs a whole bit-width, not {m.target}")
        lv, db = self.level_space(), self.search_db()
        state = lv.space.uniform_state()
        return Allocation(db, lv.layers_of(state), {"kind": "uniform"})

    def evopress(self, s) -> Allocation:
        m, rc = self.rc.method, self.rc
        db = self.search_db()
        init = s.init or ("fractional" if self.fractional else "uniform")
        lv, start = self.level_space(), None
        rng = np.random.Generator(np.random.PCG64(rc.seed + 7))
        if init == "fractional":
            if not self.fractional:
                raise UserError("search.init: fractional applies to fractional bit targets only")
            start, fit = self.best_of(self.fractional_starts(s.init_candidates, rng), db, s.init_tokens, rng,
                                      "random starts")
            lv = quant_levels(self.layers, m.target, m.levels, m.group_rule, m.tied,
                              state_sums=group_sums(lv.space, start))
            log.info("fractional start: best of %d random allocations at %.4f bits, fitness %.5f on %d tokens",
                     s.init_candidates, bits_of(lv, start, min(m.levels)), fit, s.init_tokens)
            init = "given"
        elif self.fractional:
            raise UserError(f"search.init: a fractional bit target needs init=fractional (or null), not {init}")
        settings = EvoPressSettings(
            generations=s.generations if s.generations is not None else DEFAULT_GENERATIONS[m.kind],
            offspring=s.offspring, stages=[Stage(st.survivors, st.tokens) for st in s.stages],
            max_switches=s.max_switches, init=init, init_candidates=s.init_candidates,
            init_tokens=s.init_tokens, max_tries=s.max_tries, track_every=s.track_every)
        evaluator = self.state_evaluator(lv, db, s.max_batch, s.incremental)
        track = heldout_tracker(self.loaded, rc.eval, rc.dtype.value, s,
                                lambda st: self.put_levels(db, lv.layers_of(st)))
        teacher = self.teacher

        def on_generation(record):
            self.tracker.log({"search": {"generation": record["generation"], "fitness": record["parent_fitness"],
                                         "evaluations": record["evaluations"], "seconds": record["seconds"],
                                         **({"heldout_ppl": record["heldout"]} if "heldout" in record else {})}})

        engine = EvoPress(settings, lv.space, evaluator, lambda tokens, r: minibatch(teacher, tokens, r), rc.seed,
                          self.out_dir, on_generation, start=start, track=track)
        result = engine.run()
        applier = self.appliers[db.key]
        return Allocation(db, lv.layers_of(result.state), {
            "kind": "evopress", "fitness": result.fitness, "generations": result.generations,
            "evaluations": evaluator.evaluations, "block_passes": evaluator.block_passes,
            "level_loads": applier.loads, "init": s.init or init})

    def random(self, s) -> Allocation:
        db, lv = self.search_db(), self.level_space()
        rng = np.random.Generator(np.random.PCG64(self.rc.seed + 11))
        states = (self.fractional_starts(s.candidates, rng) if self.fractional
                  else lv.space.random_states(rng, s.candidates))
        best, fit = self.best_of(states, db, s.tokens, rng, "random")
        return Allocation(db, lv.layers_of(best), {"kind": "random", "fitness": fit, "candidates": len(states),
                                                   "tokens": s.tokens})

    def dp(self, s) -> Allocation:
        """Minimise the summed per-layer reconstruction errors under the exact budget."""
        m = self.rc.method
        db, lv = self.search_db(), self.level_space()
        errors = [sum(db.errors(name).numpy() for name in names) for names in lv.unit_layers]
        if m.kind == "sparse":  # grid index k of a unit = level lo + k; the levels must sum to 0
            costs = [np.arange(len(e)) for e in errors]
            picks = knapsack(errors, costs, int(-lv.space.lo.sum()), exact=True)
            state = picks + lv.space.lo
        elif s.budget == "groups":  # each switch group of the search's space at the target mean bit-width
            state = group_knapsack(errors, lv.space.groups, lv.space.weights, m.target - min(m.levels),
                                   exact=m.target == int(m.target), resolution=s.resolution)
        else:  # bits weighted by the number of weights: at most target bits per weight overall
            bits = np.array(sorted(m.levels))
            costs = [n * bits for n in lv.numel.tolist()]
            budget = math.floor(m.target * int(lv.numel.sum()) + 1e-9)
            state = knapsack(errors, costs, budget, exact=False, resolution=s.resolution)
        total = float(sum(e[k] for e, k in zip(errors, (state - lv.offset).tolist())))
        return Allocation(db, lv.layers_of(state), {"kind": "dp", "error_sum": total})

    def owl(self, s) -> Allocation:
        """OWL's block sparsities for every (lambda, M) of the grid, the best one on calibration KL."""
        m, rc = self.rc.method, self.rc
        with self.timed("owl_scores"):
            norms = self.activation_norms()
            self.put(None)
            weights = {li.name: self.adapter.module(li.name).weight.data for li in self.layers}
            ratios = outlier_ratios(self.layers, weights, norms, list(s.ms))
        total = sum(round(m.target * li.numel) for li in self.layers)
        cands = []
        for lam in s.lambdas:
            for mi, big_m in enumerate(s.ms):
                per_block = owl_block_sparsity(ratios[mi], m.target, lam)
                zeros = owl_zeros(self.layers, dict(enumerate(per_block)), total)
                cands.append(({"lambda": lam, "m": big_m, "block_sparsity": per_block.round(4).tolist()}, zeros))
        grid = {li.name: {z[li.name] / li.numel for _, z in cands} for li in self.layers}
        if rc.database.propagation == "compressed":
            # the next block's inputs come from this one pruned at the target (as in the EvoPress database that
            # propagation builds), so the target must be a level of every layer even where no candidate uses it
            for li in self.layers:
                grid[li.name].add(round(m.target * li.numel) / li.numel)
        grid = {name: sorted(levels) for name, levels in grid.items()}
        db = self.database(grid, label_extra="owl")
        allocs = [Allocation(db, {n: grid[n].index(z[n] / self.numel(n)) for n in grid}, {"kind": "owl", **info})
                  for info, z in cands]
        if len(allocs) == 1:
            return allocs[0]
        rng = np.random.Generator(np.random.PCG64(rc.seed + 13))
        batch = minibatch(self.teacher, min(s.tokens, self.teacher.windows.numel()), rng)
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
            m = self.rc.method
            if m.kind == "sparse":
                step = m.step or default_step(m.target, self.adapter.model.config.hidden_size, m.num_levels)
                self._levels = sparse_levels(self.layers, m.target, step, m.num_levels)
            else:  # a fractional target gets its budgets from its start state (see evopress); groups are equal
                self._levels = quant_levels(self.layers, math.ceil(m.target), m.levels, m.group_rule, m.tied)
        return self._levels

    def search_db(self) -> Database:
        return self.database(self.level_space().grid)

    def fractional_starts(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        m = self.rc.method
        return [fractional_start(self.level_space(), m.target, m.levels, rng) for _ in range(n)]

    def best_of(self, states: list[np.ndarray], db: Database, tokens: int, rng, desc: str
                ) -> tuple[np.ndarray, float]:
        batch = minibatch(self.teacher, min(tokens, self.teacher.windows.numel()), rng)
        fits = self.state_evaluator(self.level_space(), db).score(states, batch, desc=desc)
        best = int(np.argmin(fits))
        return states[best], float(fits[best])

    def state_evaluator(self, lv: LayerLevels, db: Database, max_batch: int = 8, incremental: bool = True):
        return CandidateEvaluator(self.runner, self.teacher, lambda st: self.put_levels(db, lv.layers_of(st)),
                                  lv.space.unit_block, max_batch, incremental, scores_dir=self.out_dir,
                                  context={"model": self.loaded.fingerprint, "database": db.key,
                                           "units": lv.space.names})

    def alloc_evaluator(self) -> CandidateEvaluator:
        """Scores Allocation objects (always a full forward: they share no parent)."""
        return CandidateEvaluator(self.runner, self.teacher, self.put, np.zeros(0), incremental=False,
                                  scores_dir=self.out_dir, context={"model": self.loaded.fingerprint},
                                  key_of=lambda a: stable_hash(None if a is None  # None: the dense model
                                                               else {"database": a.db.key, "levels": a.levels}))

    def numel(self, name: str) -> int:
        return self.adapter.module(name).weight.numel()

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

    # --- data, teacher and databases -----------------------------------------------------------------------------
    def build_teacher(self) -> Teacher:
        rc = self.rc
        stream = load_tokens(rc.data.calib, self.loaded.tokenizer, rc.data.jsonl_field)
        windows, self.search_proto = calibration_windows(stream, self.loaded.tokenizer, rc.data.seq_len,
                                                         rc.data.calib_windows, rc.data.seed, rc.data.bos)
        return Teacher(self.adapter, windows, rc.fitness.kind, rc.fitness.topk, rc.fitness.chunk_tokens,
                       rc.fitness.max_memory_gb, self.out_dir).build(self.runner)

    def db_calibration(self):
        if self._db_windows is None:
            rc = self.rc
            with self.timed("calibration"):
                stream = load_tokens(rc.data.calib, self.loaded.tokenizer, rc.data.jsonl_field)
                self._db_windows = calibration_windows(stream, self.loaded.tokenizer, rc.database.seq_len,
                                                       rc.database.windows, rc.data.seed, rc.data.bos)
        return self._db_windows

    def activation_norms(self) -> dict[str, torch.Tensor]:
        """‖x_j‖ per layer input on the database's calibration windows (dense model), cached on disk."""
        from safetensors.torch import load_file, save_file

        from evoexp.utils import atomic_path

        windows, proto = self.db_calibration()
        key = stable_hash({"model": self.loaded.fingerprint, "calibration": proto.as_dict(),
                           "dtype": self.rc.dtype.value, "batch": self.rc.database.batch})
        path = cache_root() / "act_norms" / f"{self.loaded.name}-{key}.safetensors"
        if path.exists():
            return load_file(str(path))
        self.put(None)
        norms = activation_norms(self.runner, windows, self.rc.database.batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in norms.items()}, str(tmp))
        return norms

    def database(self, grid: dict[str, list], label_extra: str = "") -> Database:
        """The database for a grid (built now unless a complete one with the same key exists)."""
        rc, method = self.rc, self.rc.method
        solver_class = _solver_class(rc.solver.kind)
        needs_data = solver_class.needs_data
        if solver_class.propagation:  # e.g. FISTAPruner's blocks always take dense inputs (see validate)
            propagation, reference = solver_class.propagation, {}
        else:
            propagation, reference = resolve_propagation(rc.database.propagation, method.kind, grid,
                                                         method.target, rc.database.reference_level)
        windows, proto = self.db_calibration() if needs_data else (None, None)
        # the batch changes how activations are grouped into forwards, hence (in low precision) their values
        calib = {**proto.as_dict(), "batch": rc.database.batch} if needs_data else {"kind": "none"}
        solver = asdict(rc.solver)
        if getattr(method, "nm", None):
            solver["nm"] = list(method.nm)
        spec = DatabaseSpec(
            kind=method.kind, model={"name": self.loaded.name, "fingerprint": self.loaded.fingerprint},
            calibration=calib, solver=solver, propagation=propagation if needs_data else "none",
            reference=reference if needs_data else {}, grid=grid, dtype=(rc.database.dtype or rc.dtype).value,
            compute_dtype=rc.dtype.value,
            true_sequential=(rc.database.true_sequential or solver_class.true_sequential) and needs_data)
        if spec.key in self.databases:
            return self.databases[spec.key]
        label = "-".join(x for x in (self.loaded.name, method.kind, rc.solver.kind, label_extra) if x)
        db = Database(rc.database.dir or cache_root() / "databases", spec, label=label)
        levels = max(len(v) for v in grid.values())
        self.reused[db.key] = db.complete
        if db.complete:
            log.info("database reused: %s", db.path)
        else:
            log.info("database: %s %s, propagation %s, %d layers x up to %d levels -> %s", method.kind,
                     rc.solver.kind, spec.propagation, len(grid), levels, db.path)
            self.put(None)  # solvers compress the dense weights
            with self.timed("database" + (f"_{label_extra}" if label_extra else "")):
                stats = build_database(db, self.adapter, windows, rc.solver, getattr(method, "nm", None),
                                       rc.database.batch, tuple(rc.database.shard) if rc.database.shard else None)
            missing = sum(not db.has(n) for n in grid)
            if missing:  # another shard's blocks are still to come; the last shard to finish goes on
                raise Stop(f"database shard {rc.database.shard[0]}/{rc.database.shard[1]} built; {missing} "
                           f"layers of other shards still missing in {db.path}")
            db.mark_complete({"build": stats, "disk_bytes": db.disk_bytes()})
            log.info("database built: %d layers (%d reused), %.1f MB", stats["layers"], stats["reused"],
                     db.disk_bytes() / 1e6)
        self.databases[spec.key] = db
        return db

    # --- reporting ------------------------------------------------------------------------------------------------
    def evaluate(self, allocations: dict[str, Allocation | None]) -> dict:
        """Fitness on one fixed calibration minibatch (when a search ran) and held-out PPL, per model."""
        rc = self.rc
        fits = {}
        if self.teacher is not None:
            rng = np.random.Generator(np.random.PCG64(rc.seed + 2))
            batch = minibatch(self.teacher, min(rc.fitness.report_tokens, self.teacher.windows.numel()), rng)
            with self.timed("report_fitness"):
                scores = self.alloc_evaluator().score(list(allocations.values()), batch, desc="report fitness")
            fits = {name: {"fitness": f, "fitness_kind": rc.fitness.kind, "fitness_tokens": batch.tokens}
                    for name, f in zip(allocations, scores)}
        models = {}
        for name, alloc in allocations.items():
            self.put(alloc)
            entry = {**fits.get(name, {})}
            state_id = None if alloc is None else [alloc.db.key, alloc.levels]  # what the model holds
            if alloc is not None:
                entry["achieved"] = measure(self.adapter, alloc)
                entry["summary"] = summary(rc.method.kind, entry["achieved"], len(alloc.levels))
                entry["per_block"] = per_block(self.layers, alloc.values())
            if rc.eval.ppl and rc.eval.datasets:
                with self.timed(f"eval_ppl_{name}"):
                    entry["ppl"] = evaluate_ppl(self.loaded, rc.eval, rc.dtype.value, dense=alloc is None,
                                                run_dir=self.out_dir, state_id=state_id or "dense")
            if zeroshot_wanted(rc.eval.zeroshot, name, rc.search.kind):
                with self.timed(f"eval_zeroshot_{name}"):
                    entry["zeroshot"] = evaluate_zeroshot(
                        self.loaded, rc.eval.zeroshot, rc.dtype.value, dense=alloc is None, run_dir=self.out_dir,
                        state=name, state_id=state_id)
            models[name] = entry
        return models

    def describe(self, alloc: Allocation) -> dict:
        m = self.rc.method
        self.put(alloc)
        achieved = measure(self.adapter, alloc)
        self.put(None)
        values = alloc.values()
        return {"method": m.kind, "target": m.target, "search": self.rc.search.kind, "solver": self.rc.solver.kind,
                "database": alloc.db.key, "achieved": achieved, "levels": values,
                "per_block": per_block(self.layers, values), "numel": {li.short: li.numel for li in self.layers},
                "search_info": _jsonable(alloc.info),
                "summary": summary(m.kind, achieved, len(values))}


def reference_cfg(search, name: str):
    """A reference baseline's settings: its defaults, updated from search.reference_settings[name] (or None)."""
    given = dict(getattr(search, "reference_settings", None) or {}).get(name)
    if not given:
        return None
    schema = {"random": RandomSearchCfg, "dp": DPSearchCfg, "owl": OwlSearchCfg}.get(name)
    fields = set(schema.__dataclass_fields__) - {"kind", "references"} if schema else set()
    bad = sorted(set(given) - fields)
    if schema is None or bad:
        raise UserError(f"search.reference_settings.{name}: unknown key(s) {bad or sorted(given)} (expected "
                        f"{sorted(fields) if fields else 'a baseline with settings: random, dp or owl'})")
    return schema(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in given.items()})


def _solver_class(solver_kind: str):
    from evoexp.database.build import SOLVER_CLASSES

    return SOLVER_CLASSES[solver_kind]


def _jsonable(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def measure(adapter, alloc: Allocation) -> dict:
    """What the model as modified holds: zero fraction (sparse, counted in the weights) or mean bits (quant)."""
    names = list(alloc.levels)
    total = sum(adapter.module(n).weight.numel() for n in names)
    if alloc.db.spec.kind == "sparse":
        zeros = sum(int((adapter.module(n).weight == 0).sum()) for n in names)
        return {"sparsity": zeros / total, "zeros": zeros, "params": total}
    values = alloc.values()
    bits = sum(adapter.module(n).weight.numel() * values[n] for n in names)
    return {"bits": bits / total, "params": total}


def per_block(layers, values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Level value of every projection per block (for profiles and plots)."""
    out: dict[str, dict[str, float]] = {}
    for li in layers:
        out.setdefault(str(li.block), {})[li.short] = values[li.name]
    return out


def summary(kind: str, achieved: dict, layers: int) -> str:
    if kind == "sparse":
        return f"sparsity {achieved['sparsity']:.4f} over {layers} layers ({achieved['params'] / 1e6:.1f}M weights)"
    return f"{achieved['bits']:.3f} bits per weight over {layers} layers ({achieved['params'] / 1e6:.1f}M weights)"
