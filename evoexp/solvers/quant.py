"""Min-max integer grids per output row (and per group of input columns), as GPTQ and RTN use them.

Rows may carry different bit-widths: a solver can stack several levels of one layer as rows of one matrix.
Codes are unsigned integers q in [0, 2^b - 1]; the dequantized value is scale * (q - zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BITS = 8  # the widest grid a layer may take: codes are stored as uint8 and packed by the exports


@dataclass
class Grid:
    scale: torch.Tensor  # [rows, 1]
    zero: torch.Tensor  # [rows, 1], integer-valued
    maxq: torch.Tensor  # [rows, 1], 2^bits - 1


def fit_grid(x: torch.Tensor, maxq: torch.Tensor, sym: bool = False, mse: bool = False,
             norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8, scale_dtype: torch.dtype = torch.float32
             ) -> Grid:
    """Per-row grid for x [rows, cols] (GPTQ's Quantizer.find_params, vectorised over rows and bit-widths).

    Scales are rounded to `scale_dtype` (the dtype they are stored and served in), so the values the solver
    compensates for are exactly the values a packed checkpoint decodes to."""
    maxq = maxq.reshape(-1, 1).to(x.dtype)
    xmin = torch.clamp(x.min(1, keepdim=True).values, max=0)
    xmax = torch.clamp(x.max(1, keepdim=True).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    best = _grid(xmin, xmax, maxq, sym, scale_dtype)
    if mse:
        best_err = torch.full_like(xmin, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            cand = _grid(p * xmin, p * xmax, maxq, sym, scale_dtype)
            err = (dequantize(quantize(x, cand), cand) - x).abs().pow(norm).sum(1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = Grid(torch.where(better, cand.scale, best.scale), torch.where(better, cand.zero, best.zero), maxq)
    return best


def _grid(xmin, xmax, maxq, sym, scale_dtype=torch.float32) -> Grid:
    scale = ((xmax - xmin) / maxq).to(scale_dtype).float()
    zero = torch.full_like(scale, 0) + torch.floor((maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return Grid(scale, zero, maxq)


def quantize(x: torch.Tensor, g: Grid) -> torch.Tensor:
    """Integer codes (as floats) of x on grid g."""
    return torch.clamp(torch.round(x / g.scale) + g.zero, torch.zeros_like(g.maxq), g.maxq)


def dequantize(q: torch.Tensor, g: Grid) -> torch.Tensor:
    return g.scale * (q - g.zero)


@dataclass
class QuantizedWeight:
    """Integer codes with per-(row, group) scales and zeros; groups cover input columns [k·g, (k+1)·g).

    With a group size that does not divide the input width, the last group is partial (e.g. 576 = 4·128 + 64:
    group 4 covers columns 512..575). `g_idx[j]` is the group of input column j (act-order permutes it).
    """

    codes: torch.Tensor  # [rows, cols] uint8
    scales: torch.Tensor  # [rows, groups] fp32
    zeros: torch.Tensor  # [rows, groups] fp32 (integer-valued)
    g_idx: torch.Tensor  # [cols] int32
    bits: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        idx = self.g_idx.long()
        return self.scales[:, idx] * (self.codes.float() - self.zeros[:, idx])
