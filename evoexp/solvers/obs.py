"""SparseGPT and GPTQ: greedy OBS column sweeps with lazy block updates (Frantar & Alistarh).

Several levels of one layer (sparsities, or bit-widths) share the Hessian factor U: they are stacked as rows
of one matrix and swept together, so L levels cost one Python column loop with L-times-taller matmuls.
"""
from __future__ import annotations

import torch

from evoexp.solvers.quant import Grid, QuantizedWeight, dequantize, fit_grid, quantize


def block_counts(total: int, blocks: list[int], fraction: float) -> list[int]:
    """Entries to prune per column block so that the layer total is exactly round(fraction * total)."""
    out, done, start = [], 0, 0
    for size in blocks:
        start += size
        upto = round(fraction * start)
        out.append(upto - done)
        done = upto
    return out


def _group_span(W1: torch.Tensor, Wl: torch.Tensor, i: int, i2: int, col: int, g: int) -> torch.Tensor:
    """The current (error-updated) weights of the group starting at column `col`, which may run past the block."""
    if col + g > i2:
        return torch.cat([W1[:, i:], Wl[:, i2: col + g]], dim=1)
    return W1[:, i: i + g]


@torch.no_grad()
def sparsegpt(W: torch.Tensor, U: torch.Tensor, sparsities: list[float], nm: tuple[int, int] | None = None,
              blocksize: int = 128, dead: torch.Tensor | None = None, bits: int | None = None,
              group_size: int = 128, sym: bool = False) -> torch.Tensor:
    """Pruned weights [len(sparsities), rows, cols] (fp32). Unstructured masks are chosen per column block
    from w² / U_jj² with exactly round(s·numel) zeros per layer; `nm=(n, m)` prunes n of every m columns per
    row instead (one level). With `bits`, kept weights are also quantized (min-max grid per row and group of
    `group_size` columns) inside the same sweep, so the OBS updates compensate both errors."""
    rows, cols = W.shape
    levels = 1 if nm else len(sparsities)
    Wl = W.float().repeat(levels, 1)
    g = (group_size if group_size > 0 else cols) if bits else 0
    maxq = torch.full((levels * rows,), 2.0 ** bits - 1, device=W.device) if bits else None
    grid: Grid | None = None
    if dead is not None:
        Wl[:, dead] = 0
    d = torch.diag(U)
    starts = list(range(0, cols, blocksize))
    sizes = [min(blocksize, cols - s) for s in starts]
    per_block = [block_counts(rows * cols, [rows * n for n in sizes], s) for s in (sparsities if not nm else [0])]
    for b, (i1, count) in enumerate(zip(starts, sizes)):
        i2 = i1 + count
        W1 = Wl[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Uinv = U[i1:i2, i1:i2]
        if nm:
            mask = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = (W1.square() / d[i1:i2].square()).view(levels, -1)
            mask = torch.zeros_like(score, dtype=torch.bool)
            for lvl in range(levels):
                k = per_block[lvl][b]
                if k > 0:
                    mask[lvl, torch.topk(score[lvl], k, largest=False).indices] = True
            mask = mask.view(levels * rows, count)
        for i in range(count):
            w = W1[:, i]
            if nm and i % nm[1] == 0:
                span = W1[:, i: i + nm[1]].square() / d[i1 + i: i1 + i + nm[1]].square()
                mask.scatter_(1, i + torch.topk(span, nm[0], dim=1, largest=False).indices, True)
            kept = w
            if bits:
                col = i1 + i
                if col % g == 0:
                    grid = fit_grid(_group_span(W1, Wl, i, i2, col, g), maxq, sym)
                kept = dequantize(quantize(w.unsqueeze(1), grid), grid)[:, 0]
            q = torch.where(mask[:, i], torch.zeros_like(w), kept)
            err = (w - q) / Uinv[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Uinv[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        Wl[:, i1:i2] = W1
        Wl[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Wl.view(levels, rows, cols)


@torch.no_grad()
def gptq(W: torch.Tensor, U: torch.Tensor, bits: list[int], group_size: int = 128, sym: bool = False,
         mse: bool = False, perm: torch.Tensor | None = None, static_groups: bool = False, blocksize: int = 128,
         dead: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32) -> list[QuantizedWeight]:
    """One QuantizedWeight per bit-width. `U` must be the factor of the Hessian permuted by `perm` (act-order:
    columns by decreasing H_jj); codes, scales and g_idx are returned in the original column order."""
    rows, cols = W.shape
    levels = len(bits)
    perm = torch.arange(cols) if perm is None else perm.cpu()
    g = group_size if group_size > 0 else cols
    n_groups = -(-cols // g)
    maxq = torch.tensor([2 ** b - 1 for b in bits], dtype=torch.float32).repeat_interleave(rows).to(W.device)
    W0 = W.float().repeat(levels, 1)
    if dead is not None:
        W0[:, dead] = 0
    static = ([fit_grid(W0[:, k * g: (k + 1) * g], maxq, sym, mse, scale_dtype=scale_dtype) for k in range(n_groups)]
              if static_groups else None)
    Wl = W0[:, perm.to(W.device)]
    codes = torch.zeros_like(Wl)
    scales = torch.zeros((levels * rows, n_groups), device=W.device)
    zeros = torch.zeros_like(scales)
    g_idx = torch.zeros(cols, dtype=torch.int32)
    grid: Grid | None = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wl[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Uinv = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            if static is not None:
                group = orig // g
                grid = static[group]
            else:
                group = col // g
                if col % g == 0:
                    grid = fit_grid(_group_span(W1, Wl, i, i2, col, g), maxq, sym, mse, scale_dtype=scale_dtype)
            scales[:, group], zeros[:, group] = grid.scale[:, 0], grid.zero[:, 0]
            g_idx[orig] = group
            w = W1[:, i: i + 1]
            q = quantize(w, grid)
            deq = grid.scale * (q - grid.zero)
            codes[:, col] = q[:, 0]
            err = (w[:, 0] - deq[:, 0]) / Uinv[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Uinv[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wl[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm).to(W.device)
    codes = codes[:, inv]
    return [QuantizedWeight(codes[k * rows: (k + 1) * rows].to(torch.uint8).cpu(),
                            scales[k * rows: (k + 1) * rows].cpu(), zeros[k * rows: (k + 1) * rows].cpu(),
                            g_idx.clone(), b, sym)
            for k, b in enumerate(bits)]


@torch.no_grad()
def rtn(W: torch.Tensor, bits: list[int], group_size: int = 128, sym: bool = False, mse: bool = False,
        scale_dtype: torch.dtype = torch.float32) -> list[QuantizedWeight]:
    """Round-to-nearest on the same grids, no error feedback (the baseline GPTQ improves on)."""
    rows, cols = W.shape
    g = group_size if group_size > 0 else cols
    n_groups = -(-cols // g)
    out = []
    for b in bits:
        maxq = torch.full((rows,), 2.0 ** b - 1, device=W.device)
        codes = torch.zeros((rows, cols), device=W.device)
        scales = torch.zeros((rows, n_groups), device=W.device)
        zeros = torch.zeros_like(scales)
        for k in range(n_groups):
            x = W[:, k * g: (k + 1) * g].float()
            grid = fit_grid(x, maxq, sym, mse, scale_dtype=scale_dtype)
            codes[:, k * g: (k + 1) * g] = quantize(x, grid)
            scales[:, k], zeros[:, k] = grid.scale[:, 0], grid.zero[:, 0]
        g_idx = (torch.arange(cols) // g).to(torch.int32)
        out.append(QuantizedWeight(codes.to(torch.uint8).cpu(), scales.cpu(), zeros.cpu(), g_idx, b, sym))
    return out
