"""Getting the database a run needs: the one with the same spec reused from disk, else built now.

A run may need several (a search grid and, for OWL, a grid of its own); each is built at most once per run, on
the dense model, from the database calibration windows (drawn once, when a solver first needs data).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict
from typing import Callable, ContextManager

import torch

from evoexp.blockrun import BlockRunner
from evoexp.config import DatabaseCfg
from evoexp.data import WindowProtocol
from evoexp.database.build import build_database
from evoexp.database.store import Database, DatabaseSpec
from evoexp.errors import Stop, UserError
from evoexp.solvers.capture import activation_norms
from evoexp.solvers.registry import solver_class
from evoexp.tensorfiles import load_cached, save_safetensors
from evoexp.sharing import exclusive
from evoexp.utils import cache_root, stable_hash

log = logging.getLogger(__name__)
Calibration = tuple[torch.Tensor, WindowProtocol]


def resolve_propagation(propagation: str, kind: str, grid: dict[str, list], target,
                        reference_level) -> tuple[str, dict[str, int]]:
    """(propagation, {layer: index of the level the next block's inputs are computed with}). `target` is the
    method's target, or {layer: level value} where the target is no single level value (structured counts)."""
    if propagation == "auto":
        if all(len(levels) == 1 for levels in grid.values()):
            propagation = "compressed"
        else:
            propagation = "reference" if kind == "quant" else "dense"
    if propagation == "dense":
        return propagation, {}
    if propagation not in ("compressed", "reference"):
        raise UserError(f"database.propagation: expected auto, dense, compressed or reference, got {propagation!r}")
    value, key = (target, "method.target") if propagation == "compressed" else (reference_level,
                                                                                 "database.reference_level")
    reference = {}
    for name, levels in grid.items():
        # sparse levels are whole numbers of weights, so the target level of a layer is the target up to
        # rounding (0.6000012 for 0.6): take the nearest level within a small tolerance
        wanted = value[name] if isinstance(value, dict) else value
        dist = [abs(float(v) - float(wanted)) for v in levels]
        best = min(range(len(levels)), key=dist.__getitem__)
        if dist[best] > 1e-4:
            raise UserError(f"{key}: {wanted} is not a level of {name} (levels {levels}); propagation="
                            f"{propagation} needs it in the grid")
        reference[name] = best
    return propagation, reference


class DatabaseProvider:
    """The databases of one run, by grid. `calibration()` draws the database's calibration windows (called once,
    when a solver first needs data); `dense()` puts the dense model back before a build (solvers compress the
    dense weights); `timed(key)` records how long a build took. `extra` goes into every spec (what the method's
    solvers need per layer); `targets` ({layer: level value}) stands for method.target where one number is no
    level of every layer (structured counts), for compressed propagation."""

    def __init__(self, adapter, model_name: str, fingerprint: str, method, solver, cfg: DatabaseCfg,
                 compute_dtype: str, calibration: Callable[[], Calibration], dense: Callable[[], None],
                 timed: Callable[[str], ContextManager[None]] = lambda _key: nullcontext(),
                 extra: dict | None = None, targets: dict[str, float] | None = None):
        self.adapter, self.model_name, self.fingerprint = adapter, model_name, fingerprint
        self.method, self.solver, self.cfg, self.compute_dtype = method, solver, cfg, compute_dtype
        self.extra, self.targets = extra or {}, targets
        self._draw, self.dense, self.timed = calibration, dense, timed
        self._calibration: Calibration | None = None
        self.databases: dict[str, Database] = {}
        self.reused: dict[str, bool] = {}  # database key -> complete before this run

    def calibration(self) -> Calibration:
        if self._calibration is None:
            with self.timed("calibration"):
                self._calibration = self._draw()
        return self._calibration

    def get(self, grid: dict[str, list], label_extra: str = "") -> Database:
        """The database for a grid (built now unless a complete one with the same key exists)."""
        spec, windows = self.spec(grid)
        if spec.key in self.databases:
            return self.databases[spec.key]
        label = "-".join(x for x in (self.model_name, self.method.kind, self.solver.kind, label_extra) if x)
        db = Database(self.cfg.dir or cache_root() / "databases", spec, label=label)
        reused = db.complete
        if not reused:
            # parallel jobs of a sweep need the same database: one builds it, the others wait and reuse it
            # (a shard locks only its own blocks: shards are built side by side on purpose)
            shard = f".shard{self.cfg.shard[0]}" if self.cfg.shard else ""
            with exclusive(db.path / f".build{shard}.lock", f"building {db.path.name}"):
                reused = db.complete  # another process may have finished it while this one waited
                if not reused:
                    self.build(db, windows, label_extra)
        self.reused[db.key] = reused
        if reused:
            log.info("database reused: %s", db.path)
        self.databases[spec.key] = db
        return db

    def spec(self, grid: dict[str, list]) -> tuple[DatabaseSpec, torch.Tensor | None]:
        """What identifies the database of a grid, and the calibration windows its solver needs (or None)."""
        method, cfg, solver = self.method, self.cfg, solver_class(self.solver.kind, self.method.kind)
        needs_data = solver.needs_data
        if solver.propagation:  # e.g. FISTAPruner's blocks always take dense inputs (checked before the model loads)
            propagation, reference = solver.propagation, {}
        else:
            propagation, reference = resolve_propagation(cfg.propagation, method.kind, grid,
                                                         self.targets or method.target, cfg.reference_level)
        windows, proto = self.calibration() if needs_data else (None, None)
        # the batch changes how activations are grouped into forwards, hence (in low precision) their values
        calib = {**proto.as_dict(), "batch": cfg.batch} if needs_data else {"kind": "none"}
        settings = asdict(self.solver)
        if self.nm:
            settings["nm"] = list(self.nm)
        spec = DatabaseSpec(
            kind=method.kind, model={"name": self.model_name, "fingerprint": self.fingerprint},
            calibration=calib, solver=settings, propagation=propagation if needs_data else "none",
            reference=reference if needs_data else {}, grid=grid, dtype=cfg.dtype.value if cfg.dtype else
            self.compute_dtype, compute_dtype=self.compute_dtype,
            true_sequential=(cfg.true_sequential or solver.true_sequential) and needs_data, extra=self.extra)
        return spec, windows

    @property
    def nm(self) -> list[int] | None:
        return self.method.nm if self.method.kind == "sparse" else None

    def build(self, db: Database, windows: torch.Tensor | None, label_extra: str) -> None:
        cfg, spec = self.cfg, db.spec
        log.info("database: %s %s, propagation %s, %d layers x up to %d levels -> %s", spec.kind, self.solver.kind,
                 spec.propagation, len(spec.grid), max(len(v) for v in spec.grid.values()), db.path)
        self.dense()
        with self.timed("database" + (f"_{label_extra}" if label_extra else "")):
            stats = build_database(db, self.adapter, windows, self.solver, self.nm, cfg.batch,
                                   tuple(cfg.shard) if cfg.shard else None)
        missing = sum(not db.has(n) for n in spec.grid)
        if missing:  # another shard's blocks are still to come; the last shard to finish goes on
            raise Stop(f"database shard {cfg.shard[0]}/{cfg.shard[1]} built; {missing} layers of other shards "
                       f"still missing in {db.path}")
        db.mark_complete({"build": stats, "disk_bytes": db.disk_bytes()})
        log.info("database built: %d layers (%d reused), %.1f MB", stats["layers"], stats["reused"],
                 db.disk_bytes() / 1e6)

    def activation_norms(self, runner: BlockRunner) -> dict[str, torch.Tensor]:
        """‖x_j‖ per layer input on the database's calibration windows (dense model), cached on disk."""
        windows, proto = self.calibration()
        key = stable_hash({"model": self.fingerprint, "calibration": proto.as_dict(), "dtype": self.compute_dtype,
                           "batch": self.cfg.batch})
        path = cache_root() / "act_norms" / f"{self.model_name}-{key}.safetensors"
        cached = load_cached(path, "recomputing the activation norms")
        if cached is not None:
            return cached
        self.dense()
        norms = activation_norms(runner, windows, self.cfg.batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in norms.items()}, path)
        return norms
