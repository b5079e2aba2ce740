"""Per-layer sparsity / quantization end to end: calibration -> database -> allocation -> evaluation."""
from __future__ import annotations

import logging
from dataclasses import asdict

from evoexp.config import RunCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, DatabaseSpec, LevelApplier, build_database, check_solver
from evoexp.errors import UserError
from evoexp.eval import evaluate_ppl
from evoexp.methods.layerwise import resolve_propagation, uniform_grid, units
from evoexp.models import LoadedModel
from evoexp.utils import cache_root, write_json

log = logging.getLogger(__name__)
SEARCHES = ("uniform",)


class LayerwiseRecipe:
    def __init__(self, rc: RunCfg, loaded: LoadedModel, out_dir, tracker, timed):
        self.rc, self.loaded, self.out_dir, self.tracker, self.timed = rc, loaded, out_dir, tracker, timed

    @staticmethod
    def validate(rc: RunCfg) -> None:
        """Config mistakes that can be caught before the model is loaded."""
        if rc.search.kind not in SEARCHES:
            raise UserError(f"search: {rc.search.kind!r} does not apply to method={rc.method.kind} "
                            f"({', '.join(SEARCHES)})")
        if rc.solver is None:
            raise UserError(f"solver: method={rc.method.kind} needs a solver (solver=...)")
        check_solver(rc.method.kind, rc.solver.kind)

    def run(self) -> dict:
        rc, adapter = self.rc, self.loaded.adapter
        method = rc.method
        self.validate(rc)
        layers = units(adapter)
        grid = uniform_grid(method, layers)
        windows, proto = self.calibration() if _needs_data(rc.solver.kind) else (None, None)
        db = self.database(grid, proto)
        reused = db.complete
        if not reused:
            with self.timed("database"):
                stats = build_database(db, adapter, windows, rc.solver, getattr(method, "nm", None),
                                       rc.database.batch)
            db.mark_complete({"build": stats, "disk_bytes": db.disk_bytes()})
            log.info("database built in %s: %d layers (%d reused), %.1f MB", db.path, stats["layers"],
                     stats["reused"], db.disk_bytes() / 1e6)
        else:
            log.info("database reused: %s", db.path)

        state = {name: 0 for name in grid}  # uniform: every layer at its only level
        applier = LevelApplier(adapter, db)
        models = {}
        if rc.eval.ppl and rc.eval.datasets:
            with self.timed("eval_ppl_dense"):
                models["dense"] = {"ppl": evaluate_ppl(self.loaded, rc.eval, rc.dtype.value, dense=True)}
        applier.apply(state)
        achieved = measure(adapter, db, grid, state)
        entry = {"achieved": achieved}
        if rc.eval.ppl and rc.eval.datasets:
            with self.timed(f"eval_ppl_{rc.search.kind}"):
                entry["ppl"] = evaluate_ppl(self.loaded, rc.eval, rc.dtype.value, dense=False)
        models[rc.search.kind] = entry
        applier.restore()

        allocation = {"method": method.kind, "target": method.target, "search": rc.search.kind,
                      "solver": rc.solver.kind, "database": db.key, "achieved": achieved,
                      "levels": {name: grid[name][lvl] for name, lvl in state.items()},
                      "summary": describe(method.kind, achieved, len(grid))}
        write_json(self.out_dir / "allocation.json", allocation)
        self.tracker.summary({"achieved": achieved})
        return {"database": {"key": db.key, "path": str(db.path), "reused": reused, **db.info()}, "allocation": allocation,
                "models": models, "ppl": entry.get("ppl", {})}

    def calibration(self):
        rc = self.rc
        with self.timed("calibration"):
            stream = load_tokens(rc.data.calib, self.loaded.tokenizer, rc.data.jsonl_field)
            windows, proto = calibration_windows(stream, self.loaded.tokenizer, rc.database.seq_len,
                                                 rc.database.windows, rc.data.seed, rc.data.bos)
        return windows, proto

    def database(self, grid: dict[str, list], proto) -> Database:
        """The database this run needs, keyed by everything that decides its contents."""
        rc, method = self.rc, self.rc.method
        propagation, reference = resolve_propagation(rc.database.propagation, method.kind, grid, method.target,
                                                     rc.database.reference_level)
        needs_data = proto is not None
        # the batch changes how activations are grouped into forwards, hence (in low precision) their values
        calib = {**proto.as_dict(), "batch": rc.database.batch} if needs_data else {"kind": "none"}
        storage = (rc.database.dtype or rc.dtype).value
        solver = asdict(rc.solver)
        if getattr(method, "nm", None):
            solver["nm"] = list(method.nm)
        spec = DatabaseSpec(
            kind=method.kind, model={"name": self.loaded.name, "fingerprint": self.loaded.fingerprint},
            calibration=calib, solver=solver, propagation=propagation if needs_data else "none",
            reference=reference if needs_data else {}, grid=grid, dtype=storage, compute_dtype=rc.dtype.value,
            true_sequential=rc.database.true_sequential and needs_data)
        root = rc.database.dir or cache_root() / "databases"
        log.info("database: %s %s, propagation %s, %d layers x %d levels", method.kind, rc.solver.kind,
                 spec.propagation, len(grid), max(len(v) for v in grid.values()))
        return Database(root, spec, label=f"{self.loaded.name}-{method.kind}-{rc.solver.kind}")


def _needs_data(solver_kind: str) -> bool:
    from evoexp.database.build import SOLVER_CLASSES

    return SOLVER_CLASSES[solver_kind].needs_data


def measure(adapter, db: Database, grid: dict[str, list], state: dict[str, int]) -> dict:
    """What the model as modified actually holds: zero fraction (sparse) or mean bits (quant) over the units."""
    total = sum(adapter.module(n).weight.numel() for n in grid)
    if db.spec.kind == "sparse":
        zeros = sum(int((adapter.module(n).weight == 0).sum()) for n in grid)
        return {"sparsity": zeros / total, "zeros": zeros, "params": total}
    bits = sum(adapter.module(n).weight.numel() * grid[n][state[n]] for n in grid)
    return {"bits": bits / total, "params": total}


def describe(kind: str, achieved: dict, layers: int) -> str:
    if kind == "sparse":
        return f"sparsity {achieved['sparsity']:.4f} over {layers} layers ({achieved['params'] / 1e6:.1f}M weights)"
    return f"{achieved['bits']:.3f} bits per weight over {layers} layers ({achieved['params'] / 1e6:.1f}M weights)"
