"""Layer-wise compression solvers: one small object per linear layer, `add_batch(inputs)` then `compress(levels)`.

Every solver works from Python on a plain weight tensor and its calibration inputs:

    solver = SparseGPT(layer.weight)
    for x in inputs: solver.add_batch(x)
    w50, w60 = solver.compress([0.5, 0.6])        # one pruned weight per level
"""
from __future__ import annotations

import torch

from evoexp.solvers.hessian import HessianAccumulator, prepare
from evoexp.solvers.obs import block_counts, gptq, rtn, sparsegpt
from evoexp.errors import check_min, check_positive, fail
from evoexp.solvers.quant import MAX_BITS, QuantizedWeight

__all__ = ["SparseGPT", "GPTQ", "RTN", "Wanda", "Magnitude", "QuantizedWeight", "HessianAccumulator", "prepare"]


class _Solver:
    needs_data = True  # False: the solver ignores calibration inputs (no forwards are run for it)
    propagation: str | None = None  # set when the method fixes what the next block is calibrated on
    true_sequential = False  # True: the method always calibrates a block group by group (q/k/v, o, ...)

    @staticmethod
    def check_config(cfg) -> None:
        """One-line UserErrors for settings the config schema cannot express, before the model loads."""

    def __init__(self, weight: torch.Tensor, name: str = "", device: torch.device | str | None = None,
                 hessian: HessianAccumulator | None = None):
        self.W = weight.detach()
        self.name = name
        # Layers reading the same input (q/k/v, gate/up) may share one accumulator.
        self.hessian = hessian or HessianAccumulator(self.W.shape[1], device or self.W.device)

    def add_batch(self, inp: torch.Tensor) -> None:
        self.hessian.add_batch(inp)


class SparseGPT(_Solver):
    """SparseGPT: unstructured (levels = sparsities) or N:M (`nm=(2, 4)`, one level) with OBS reconstruction."""

    def __init__(self, weight, name="", damp=0.01, blocksize=128, nm: tuple[int, int] | None = None,
                 bits: int | None = None, group_size: int = 128, sym: bool = False, device=None, hessian=None):
        super().__init__(weight, name, device, hessian)
        self.damp, self.blocksize, self.nm = damp, blocksize, nm
        self.bits, self.group_size, self.sym = bits, group_size, sym  # bits: joint quantization of kept weights
        self.damp_used = None

    @staticmethod
    def check_config(cfg) -> None:
        """One-line UserErrors for a SparseGPTCfg, before the model loads."""
        check_min(cfg.damp, "solver.damp", 0)
        check_positive(cfg.blocksize, "solver.blocksize")
        if cfg.bits is not None and not 1 <= cfg.bits <= MAX_BITS:
            fail("solver.bits", f"a bit-width between 1 and {MAX_BITS} or null", cfg.bits)
        check_min(cfg.group_size, "solver.group_size", 0)

    def compress(self, sparsities: list[float]) -> list[torch.Tensor]:
        U, dead, self.damp_used = prepare(self.hessian.H, self.W, self.damp, name=self.name)
        out = sparsegpt(self.W.to(U.device), U, sparsities, self.nm, self.blocksize, dead,
                        self.bits, self.group_size, self.sym)
        return [w.to(self.W.dtype) for w in out]


class GPTQ(_Solver):
    """GPTQ: levels are bit-widths (2-8), per-channel (group_size=0) or grouped, optional act-order."""

    def __init__(self, weight, name="", damp=0.01, blocksize=128, group_size=128, sym=False, mse=False,
                 act_order=False, static_groups=False, scale_dtype=torch.float32, device=None, hessian=None):
        super().__init__(weight, name, device, hessian)
        self.scale_dtype = scale_dtype
        self.damp, self.blocksize, self.group_size = damp, blocksize, group_size
        self.sym, self.mse, self.act_order, self.static_groups = sym, mse, act_order, static_groups
        self.damp_used = None

    @staticmethod
    def check_config(cfg) -> None:
        """One-line UserErrors for a GPTQCfg, before the model loads."""
        check_min(cfg.damp, "solver.damp", 0)
        check_positive(cfg.blocksize, "solver.blocksize")
        check_min(cfg.group_size, "solver.group_size", 0)  # 0: one grid per output row

    def compress(self, bits: list[int]) -> list[QuantizedWeight]:
        H = self.hessian.H
        perm = torch.argsort(torch.diag(H), descending=True) if self.act_order else torch.arange(H.shape[0])
        dead = torch.diag(H) == 0
        U, _, self.damp_used = prepare(H[perm][:, perm], self.W, self.damp, name=self.name)
        return gptq(self.W.to(U.device), U, bits, self.group_size, self.sym, self.mse, perm.to(U.device),
                    self.static_groups, self.blocksize, dead.to(U.device), self.scale_dtype)


class RTN(_Solver):
    """Round-to-nearest on GPTQ's grids: no calibration data, no error feedback."""

    needs_data = False

    def __init__(self, weight, name="", group_size=128, sym=False, mse=False, scale_dtype=torch.float32,
                 device=None, hessian=None):
        self.W, self.name = weight.detach(), name
        self.group_size, self.sym, self.mse, self.scale_dtype = group_size, sym, mse, scale_dtype
        self.hessian = None

    @staticmethod
    def check_config(cfg) -> None:
        """One-line UserErrors for an RTNCfg, before the model loads."""
        check_min(cfg.group_size, "solver.group_size", 0)  # 0: one grid per output row

    def add_batch(self, inp: torch.Tensor) -> None:  # RTN needs no calibration inputs
        pass

    def compress(self, bits: list[int]) -> list[QuantizedWeight]:
        return rtn(self.W, bits, self.group_size, self.sym, self.mse, self.scale_dtype)


def prune_by_score(W: torch.Tensor, score: torch.Tensor, sparsity: float, nm, per_row: bool) -> torch.Tensor:
    rows, cols = W.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm:
        n, m = nm
        groups = score.view(rows, cols // m, m)
        idx = torch.topk(groups, n, dim=2, largest=False).indices
        mask.view(rows, cols // m, m).scatter_(2, idx, True)
    elif per_row:
        for r, k in enumerate(block_counts(rows * cols, [cols] * rows, sparsity)):
            if k:
                mask[r, torch.topk(score[r], k, largest=False).indices] = True
    else:
        k = round(sparsity * W.numel())
        if k:
            mask.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
    return torch.where(mask, torch.zeros_like(W), W)


class Wanda(_Solver):
    """Wanda: prune the smallest |W_ij|·‖x_j‖ within each output row (or n of every m), no weight update."""

    def __init__(self, weight, name="", nm: tuple[int, int] | None = None, device=None, hessian=None):
        super().__init__(weight, name, device, hessian)
        self.nm = nm

    def compress(self, sparsities: list[float]) -> list[torch.Tensor]:
        score = self.W.float().abs() * self.hessian.act_norm.to(self.W.device).unsqueeze(0)
        return [prune_by_score(self.W, score, s, self.nm, per_row=True) for s in (sparsities if not self.nm else [0])]


class Magnitude(_Solver):
    """Magnitude pruning: the smallest |W_ij| of the whole layer (or n of every m per row)."""

    needs_data = False

    def __init__(self, weight, name="", nm: tuple[int, int] | None = None, device=None, hessian=None):
        self.W, self.name, self.nm, self.hessian = weight.detach(), name, nm, None

    def add_batch(self, inp: torch.Tensor) -> None:  # magnitude needs no calibration inputs
        pass

    def compress(self, sparsities: list[float]) -> list[torch.Tensor]:
        score = self.W.float().abs()
        return [prune_by_score(self.W, score, s, self.nm, per_row=False) for s in (sparsities if not self.nm else [0])]
