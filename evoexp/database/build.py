"""Building the database: block-sequential calibration, every level of a layer in one stacked solve.

    db = Database(root, spec)
    build_database(db, adapter, windows, SparseGPTCfg())      # resumable: finished layers are skipped
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from evoexp.blockrun import BlockRunner
from evoexp.database.store import Database
from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.solvers import GPTQ, RTN, Magnitude, SparseGPT, Wanda
from evoexp.solvers.capture import sequential
from evoexp.utils import progress

log = logging.getLogger(__name__)
SOLVER_CLASSES = {"sparsegpt": SparseGPT, "wanda": Wanda, "magnitude": Magnitude, "gptq": GPTQ, "rtn": RTN}
SOLVERS_FOR = {"sparse": ("sparsegpt", "wanda", "magnitude"), "quant": ("gptq", "rtn")}


def check_solver(method_kind: str, solver_kind: str) -> None:
    allowed = SOLVERS_FOR.get(method_kind, ())
    if solver_kind not in allowed:
        raise UserError(f"solver: {solver_kind!r} does not apply to method={method_kind} "
                        f"(choose one of {', '.join(allowed)})")


def make_solver(cfg, weight: torch.Tensor, name: str = "", hessian=None, nm=None,
                scale_dtype: torch.dtype = torch.float32):
    """The solver object for one layer from its config dataclass (SparseGPTCfg, GPTQCfg, ...)."""
    kwargs = {k: v for k, v in asdict(cfg).items() if k != "kind"}
    if cfg.kind in SOLVERS_FOR["sparse"]:
        kwargs["nm"] = tuple(nm) if nm else None
    else:
        kwargs["scale_dtype"] = scale_dtype
    return SOLVER_CLASSES[cfg.kind](weight, name=name, hessian=hessian, **kwargs)


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
        w_hat = r.dequantize().to(W.device) if hasattr(r, "dequantize") else r.to(W.device)
        out.append(energy(W - w_hat.float()) / ref)
    return torch.tensor(out, dtype=torch.float64)


def build_database(db: Database, adapter: DecoderAdapter, windows: torch.Tensor | None, solver_cfg,
                   nm=None, batch: int = 8) -> dict:
    """Compute and store every missing (layer, level); returns build statistics."""
    spec, t0 = db.spec, time.time()
    names = list(spec.grid)
    todo = [n for n in names if not db.has(n)]
    stats = {"layers": len(names), "built": len(todo), "reused": len(names) - len(todo), "damp": {}}
    if not todo:
        return stats
    bar = progress(total=len(names), initial=len(names) - len(todo), desc="database", unit="layer")
    propagate = spec.propagation != "dense"

    def solve(li: LinearInfo, hessian) -> None:
        W = adapter.module(li.name).weight.data
        solver = make_solver(solver_cfg, W, li.name, hessian, nm, db.dtype)
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
        lins = [li for li in adapter.linears(block) if li.name in spec.grid]
        if not all(db.has(li.name) for li in lins):
            return None
        return {li.name: db.weight(li.name, spec.reference[li.name]) for li in lins} if propagate else {}

    try:
        if SOLVER_CLASSES[solver_cfg.kind].needs_data:
            if windows is None:
                raise ValueError(f"solver {solver_cfg.kind} needs calibration windows")
            sequential(BlockRunner(adapter), windows, compress, spec.propagation, batch, spec.true_sequential,
                       finished)
        else:  # magnitude / RTN read no activations: no forwards at all
            for li in adapter.linears():
                if li.name in spec.grid and not db.has(li.name):
                    solve(li, None)
    finally:
        bar.close()
    stats["seconds"] = round(time.time() - t0, 2)
    return stats
