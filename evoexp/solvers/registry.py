"""Which solver class each `solver.kind` names, which solvers each method kind accepts, and building one."""
from __future__ import annotations

from dataclasses import asdict

import torch

from evoexp.errors import UserError
from evoexp.solvers import GPTQ, RTN, Magnitude, SparseGPT, Wanda
from evoexp.solvers.fista import Fista
from evoexp.solvers.structured import StructMagnitude, StructRandom, WandaSP, ZipLM

SOLVER_CLASSES = {"sparsegpt": SparseGPT, "wanda": Wanda, "magnitude": Magnitude, "gptq": GPTQ, "rtn": RTN,
                  "fista": Fista}
# method=structured removes whole groups (heads, neurons): its solvers are looked up here. `magnitude` names a
# solver of both kinds (one config, `solver=magnitude`): the method decides which one runs.
STRUCTURED_CLASSES = {"ziplm": ZipLM, "wanda_sp": WandaSP, "magnitude": StructMagnitude, "random": StructRandom}
SOLVERS_FOR = {"sparse": ("sparsegpt", "wanda", "magnitude", "fista"), "quant": ("gptq", "rtn"),
               "structured": tuple(STRUCTURED_CLASSES)}


def solver_class(kind: str, method_kind: str | None = None) -> type:
    """The solver class for a `solver.kind`; under method=structured, its structured counterpart (kinds that
    exist only as structured solvers resolve without the method)."""
    if method_kind == "structured" or kind not in SOLVER_CLASSES:
        return STRUCTURED_CLASSES[kind]
    return SOLVER_CLASSES[kind]


def check_solver(method_kind: str, solver_kind: str) -> None:
    allowed = SOLVERS_FOR.get(method_kind, ())
    if solver_kind not in allowed:
        raise UserError(f"solver: {solver_kind!r} does not apply to method={method_kind} "
                        f"(choose one of {', '.join(allowed)})")


def make_solver(cfg, weight: torch.Tensor, name: str = "", hessian=None, nm=None,
                scale_dtype: torch.dtype = torch.float32, *, method_kind: str | None = None, group_size: int = 1):
    """The solver object for one layer from its config dataclass (SparseGPTCfg, GPTQCfg, ...). Under
    method=structured, `group_size` is the layer's unit (head_dim on o_proj, 1 on down_proj)."""
    kwargs = {k: v for k, v in asdict(cfg).items() if k != "kind"}
    if method_kind == "structured":
        return STRUCTURED_CLASSES[cfg.kind](weight, name=name, hessian=hessian, group_size=group_size, **kwargs)
    if cfg.kind in SOLVERS_FOR["sparse"]:
        kwargs["nm"] = tuple(nm) if nm else None
    else:
        kwargs["scale_dtype"] = scale_dtype
    return SOLVER_CLASSES[cfg.kind](weight, name=name, hessian=hessian, **kwargs)
