"""Layer-wise solver schemas (`solver=`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class SparseGPTCfg:
    kind: str = "sparsegpt"
    damp: float = 0.01  # relative to the mean diagonal of H
    blocksize: int = 128  # columns per lazy batch (and per mask choice)
    bits: Optional[int] = None  # joint quantization of the kept weights
    group_size: int = 128
    sym: bool = False


@dataclass
class FistaCfg:
    """FISTAPruner: per-operator LASSO against the dense target on the pruned path, solved with FISTA."""

    kind: str = "fista"
    warm_start: str = "sparsegpt"  # sparsegpt (on the pruned-path Hessian) | wanda | magnitude
    damp: float = 0.01  # SparseGPT warm start
    blocksize: int = 128
    iters: int = 100  # FISTA iterations per lambda
    tol: float = 1e-4  # stop a lambda's iterations when the objective's relative change falls below this
    ratio: float = 0.3  # the paper's xi: share of the final error the hard threshold may add
    bisect_steps: int = 8  # lambda trials per operator (bisection in log space)
    lam_min: float = 1e-5  # bisection range, relative to lambda_max = max|grad f(0)|
    lam_max: float = 0.5
    refit_iters: int = 50  # masked least-squares steps after the threshold (0: the paper's plain threshold)


@dataclass
class GPTQCfg:
    kind: str = "gptq"
    damp: float = 0.01
    blocksize: int = 128
    group_size: int = 128  # 0: one grid per output row
    sym: bool = False
    mse: bool = False  # search a shrunk range per group minimising the Lp error (GPTQ's grid search)
    act_order: bool = False  # columns in order of decreasing H_jj
    static_groups: bool = False  # with act_order: grids fitted up front on the original weights


@dataclass
class RTNCfg:
    kind: str = "rtn"
    group_size: int = 128
    sym: bool = False
    mse: bool = False


@dataclass
class WandaCfg:
    kind: str = "wanda"


@dataclass
class MagnitudeCfg:
    kind: str = "magnitude"  # method=structured: whole groups by the Frobenius norm of their columns


# Structured solvers (method=structured): the method sets each layer's group size (head_dim on o_proj, 1 on
# down_proj); levels are counts of removed groups, nested. `solver=magnitude` is shared with method=sparse.
@dataclass
class ZipLMCfg:
    """ZipLM: greedy structured OBS with compensation of the kept columns (DarwinLM's database builder)."""

    kind: str = "ziplm"
    damp: float = 0.01  # relative to the mean diagonal of H


@dataclass
class WandaSPCfg:
    """Wanda-sp (Bonsai's `wanda` prior): mean |W[:, c]| times RMS(x_c), averaged over a group."""

    kind: str = "wanda_sp"


@dataclass
class RandomCfg:
    """Random prior: a seeded permutation of each layer's groups (the layer name is mixed into the seed)."""

    kind: str = "random"
    seed: int = 0


