"""Building the database: block-sequential calibration, every level of a layer in one stacked solve.

    db = Database(root, spec)
    build_database(db, adapter, windows, SparseGPTCfg())      # resumable: finished layers are skipped
"""
from __future__ import annotations

import logging
import time

import torch

from evoexp.blockrun import BlockRunner
from evoexp.database.store import Database
from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.solvers.capture import paired_sequential, sequential
from evoexp.solvers.fista import Fista, FistaSettings, PairedGram
from evoexp.solvers.registry import make_solver, solver_class
from evoexp.solvers.structured import StructuredLevel
from evoexp.utils import progress

log = logging.getLogger(__name__)


def level_errors(W: torch.Tensor, results: list, H: torch.Tensor | None) -> torch.Tensor:
    """⟨ΔW H ΔWᵀ⟩ / ⟨W H Wᵀ⟩ per level: the layer's output error on the calibration data, relative to its output
    (H = identity: relative Frobenius error). The error-additivity (DP) baseline sums these."""
    W = W.float()
    H = None if H is None else H.to(W.device)

    def energy(M: torch.Tensor) -> float:
        return float((M @ H * M).sum()) if H is not None else float(M.square().sum())

    ref = energy(W) or 1.0
    out = []
    for r in results:
        if isinstance(r, StructuredLevel):
            r = r.dense(W.shape[1])
        w_hat = r.dequantize().to(W.device) if hasattr(r, "dequantize") else r.to(W.device)
        out.append(energy(W - w_hat.float()) / ref)
    return torch.tensor(out, dtype=torch.float64)


def build_database(db: Database, adapter: DecoderAdapter, windows: torch.Tensor | None, solver_cfg,
                   nm=None, batch: int = 8, shard: tuple[int, int] | None = None) -> dict:
    """Compute and store every missing (layer, level); returns build statistics. With `shard=(i, n)` only the
    layers of blocks b with b % n == i (dense propagation: the blocks do not depend on each other's results)."""
    spec, t0 = db.spec, time.time()
    if shard is not None and spec.propagation not in ("dense", "none"):
        raise UserError(f"database.shard: blocks can be built apart only with dense propagation, not "
                        f"{spec.propagation} (set database.propagation=dense)")
    mine = {li.name for li in adapter.linears() if shard is None or li.block % shard[1] == shard[0]}
    names = [n for n in spec.grid if n in mine]
    todo = [n for n in names if not db.has(n)]
    stats = {"layers": len(names), "built": len(todo), "reused": len(names) - len(todo), "damp": {}}
    if not todo:
        return stats
    bar = progress(total=len(names), initial=len(names) - len(todo), desc="database", unit="layer")
    propagate = spec.propagation != "dense"

    def solve(li: LinearInfo, hessian) -> None:
        W = adapter.module(li.name).weight.data
        solver = make_solver(solver_cfg, W, li.name, hessian, nm, db.dtype, **structured_args(spec, li.name))
        results = solver.compress(spec.grid[li.name])
        extra = {"errors": level_errors(W, results, hessian.H if hessian is not None else None)}
        if hessian is not None:
            extra["act_norm"] = hessian.act_norm.float()
        db.save_layer(li.name, tuple(W.shape), results, extra)
        if getattr(solver, "damp_used", None) not in (None, getattr(solver_cfg, "damp", None)):
            stats["damp"][li.name] = solver.damp_used  # Cholesky needed more damping (already logged)
        bar.update()

    def compress(block: int, linears: list[LinearInfo], hessians: dict) -> dict[str, torch.Tensor]:
        out = {}
        for li in linears:
            if li.name not in spec.grid:
                continue
            if not db.has(li.name):
                solve(li, hessians[li.name])
            if propagate:  # the stored values, so a resumed build propagates exactly what a fresh one does
                out[li.name] = db.weight(li.name, spec.reference[li.name])
        return out

    def finished(block: int):
        lins = [li for li in adapter.linears(block) if li.name in spec.grid and li.name in mine]
        if not all(db.has(li.name) for li in lins):
            return None
        return {li.name: db.weight(li.name, spec.reference[li.name]) for li in lins} if propagate else {}

    try:
        if solver_cfg.kind == "fista":
            _build_fista(db, adapter, windows, solver_cfg, nm, batch, bar, stats, mine)
        elif solver_class(solver_cfg.kind, spec.kind).needs_data:
            if windows is None:
                raise ValueError(f"solver {solver_cfg.kind} needs calibration windows")
            sequential(BlockRunner(adapter), windows, compress, spec.propagation, batch, spec.true_sequential,
                       finished, only=set(spec.grid))
        else:  # magnitude / RTN read no activations: no forwards at all
            for li in adapter.linears():
                if li.name in spec.grid and li.name in mine and not db.has(li.name):
                    solve(li, None)
    finally:
        bar.close()
    stats["seconds"] = round(time.time() - t0, 2)
    return stats


def structured_args(spec, name: str) -> dict:
    """What a structured solver needs beyond the config: the method, and the layer's group of input columns
    (a head's head_dim columns of o_proj, one down_proj column per neuron)."""
    if spec.kind != "structured":
        return {}
    return {"method_kind": "structured", "group_size": int(spec.extra["group_size"][name])}


def fista_solver(cfg, weight: torch.Tensor, name: str, gram: PairedGram, nm=None) -> Fista:
    settings = FistaSettings(**{k: getattr(cfg, k) for k in FistaSettings.__dataclass_fields__})
    return Fista(weight, name, cfg.warm_start, cfg.damp, cfg.blocksize, tuple(nm) if nm else None, settings,
                 gram=gram)


def _build_fista(db: Database, adapter: DecoderAdapter, windows: torch.Tensor, cfg, nm, batch: int, bar,
                 stats: dict, mine: set[str]) -> None:
    """FISTAPruner's database: dense block inputs, and level ℓ of a layer solved on the path where the block's
    earlier groups are at their level ℓ too (a uniform level inside the block), so every level is what a
    uniform FISTAPruner run at that level would produce."""
    if windows is None:
        raise ValueError("solver fista needs calibration windows")
    spec = db.spec
    levels = max(len(v) for v in spec.grid.values())

    def level_of(name: str, lvl: int) -> int:
        return min(lvl, len(spec.grid[name]) - 1)

    def solve_group(block: int, group: list[LinearInfo], grams: list) -> dict[int, dict[str, torch.Tensor]]:
        out: dict[int, dict[str, torch.Tensor]] = {lvl: {} for lvl in range(levels)}
        for li in group:
            if li.name not in spec.grid:
                continue
            if not db.has(li.name):
                W = adapter.module(li.name).weight.data
                grid = spec.grid[li.name]
                results, errors, infos = [], [], []
                for lvl, s in enumerate(grid):  # each level has its own pruned path, hence its own problem
                    solver = fista_solver(cfg, W, li.name, grams[lvl], nm)
                    (res,) = solver.compress([s])
                    results.append(res)
                    errors.append(solver.infos[0]["relative"])
                    infos.append(solver.infos[0])
                db.save_layer(li.name, tuple(W.shape), results,
                              {"errors": torch.tensor(errors, dtype=torch.float64),
                               "act_norm": grams[0].act_norm.float()})
                lams = [t["lambda"] for i in infos for t in i["trials"] if t["loss"] == i["loss"]]
                stats.setdefault("fista", {})[li.name] = {
                    "gain_over_warm_start": [1 - i["loss"] / max(i["warm_loss"], 1e-30) for i in infos],
                    "lambda": lams}
                bar.update()
            for lvl in range(levels):
                out[lvl][li.name] = db.weight(li.name, level_of(li.name, lvl))
        return out

    def finished(block: int) -> bool:
        return all(db.has(li.name) for li in adapter.linears(block) if li.name in spec.grid and li.name in mine)

    paired_sequential(BlockRunner(adapter), windows, levels, solve_group, batch, finished, PairedGram)
