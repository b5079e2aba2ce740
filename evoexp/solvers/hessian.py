"""The layer-wise Hessian H = 2/N Σ x xᵀ and its preparation for OBS-style solvers (SparseGPT, GPTQ)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running fp32 mean of 2·x xᵀ over calibration tokens, fed with a linear layer's inputs."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.tokens = 0
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)  # Σ x_j² (Wanda's ‖x_j‖²)

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        total = self.tokens + n
        # Rescale the running mean instead of summing, so H stays O(1) whatever the token count.
        self.H.mul_(self.tokens / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.sq_norm += x.square().sum(0)
        self.tokens = total

    @property
    def act_norm(self) -> torch.Tensor:
        """‖x_j‖₂ per input column over all tokens seen."""
        return self.sq_norm.sqrt()


class InputNorms:
    """Σ x_j² per input column and the token count only: what the Wanda-style priors read, without the d x d
    Hessian (`HessianAccumulator`'s `sq_norm` / `tokens`)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.sq_norm.device, torch.float32)
        self.sq_norm += x.square().sum(0)
        self.tokens += x.shape[0]


def prepare(H: torch.Tensor, W: torch.Tensor, damp: float = 0.01, max_tries: int = 6, name: str = ""
            ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Dead columns handled, damping added, upper Cholesky factor U of H⁻¹ returned (with the damp used).

    A column no token ever activated (H_jj = 0) gets H_jj = 1 and is zeroed in W by the caller (its weights
    never matter). If the Cholesky factorisation fails, damping grows 10x per retry, and each retry is logged.
    """
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).abs().mean().item() or 1.0  # damping is relative to the typical curvature
    cur = damp
    for attempt in range(max_tries):
        Hd = H.clone()
        Hd.diagonal().add_(cur * mean_diag)
        try:
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            U = torch.linalg.cholesky(Hinv, upper=True)
            if torch.isfinite(U).all():
                return U, dead, cur
        except RuntimeError:
            pass
        log.warning("%s: Cholesky failed with damp %.3g; retrying with %.3g", name or "layer", cur, cur * 10)
        cur *= 10
    raise FloatingPointError(f"{name or 'layer'}: Hessian not positive definite even with damp {cur / 10:.3g}")
