"""One-shot depth-pruning baselines that rank blocks by a score: ShortGPT, cosine window, Weight Subcloning.

Scores come from the hidden states at block boundaries, taken with the block runner (block inputs and the
last block's raw output), not from `output_hidden_states`, whose last entry is already final-normed.
A segment is a run of consecutive blocks dropped as one unit (one block, or a pair with method.unit=pair).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from evoexp.blockrun import BlockRunner
from evoexp.errors import UserError
from evoexp.fitness import Minibatch


@torch.inference_mode()
def boundary_similarity(runner: BlockRunner, windows: torch.Tensor, batch: Minibatch,
                        pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Token means of cos(h_a, h_b) and |h_b - h_a| / |h_b| for each boundary pair (a, b), a < b."""
    device = next(runner.adapter.model.parameters()).device
    cos_sum, ratio_sum, count = np.zeros(len(pairs)), np.zeros(len(pairs)), 0
    for ids, n in batch.groups(8):
        bounds: list[torch.Tensor] = []
        out = runner.run(runner.embed(windows[ids, :n].to(device)), 0, inputs_out=bounds)
        bounds.append(out)
        for p, (a, b) in enumerate(pairs):
            ha, hb = bounds[a].float(), bounds[b].float()
            cos_sum[p] += F.cosine_similarity(ha, hb, dim=-1).double().sum().item()
            ratio_sum[p] += ((hb - ha).norm(dim=-1) / hb.norm(dim=-1).clamp_min(1e-12)).double().sum().item()
        count += len(ids) * n
    return {"cos": cos_sum / count, "ratio": ratio_sum / count}


def shortgpt(sim_cos: np.ndarray, k: int, allowed: np.ndarray) -> list[int]:
    """Block Influence BI = 1 - cos(in, out): drop the k least influential segments."""
    influence = np.where(allowed, 1.0 - sim_cos, np.inf)
    return sorted(np.argsort(influence, kind="stable")[:k].tolist())


def subcloning(ratio: np.ndarray, k: int, allowed: np.ndarray) -> list[int]:
    """Weight Subcloning: drop the k segments that change the residual stream least, |out - in| / |out|."""
    return sorted(np.argsort(np.where(allowed, ratio, np.inf), kind="stable")[:k].tolist())


def window_cosine(window_cos: np.ndarray, k: int, allowed: np.ndarray) -> list[int]:
    """Drop the k consecutive segments s..s+k-1 whose outer boundaries are most similar."""
    best, best_cos = None, -np.inf
    for s, c in enumerate(window_cos):
        if allowed[s: s + k].all() and c > best_cos:
            best, best_cos = s, c
    if best is None:
        raise UserError(f"search=window_cosine: no {k} consecutive droppable units (see method.droppable)")
    return list(range(best, best + k))
