"""Which solver class each `solver.kind` names, which solvers each method kind accepts, and building one."""
from __future__ import annotations

from dataclasses import asdict

import torch

from evoexp.errors import UserError
from evoexp.solvers import GPTQ, RTN, Magnitude, SparseGPT, Wanda
from evoexp.solvers.fista import Fista

SOLVER_CLASSES = {"sparsegpt": SparseGPT, "wanda": Wanda, "magnitude": Magnitude, "gptq": GPTQ, "rtn": RTN,
                  "fista": Fista}
SOLVERS_FOR = {"sparse": ("sparsegpt", "wanda", "magnitude", "fista"), "quant": ("gptq", "rtn")}


def solver_class(kind: str) -> type:
    """The solver class for a `solver.kind`."""
    return SOLVER_CLASSES[kind]


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
