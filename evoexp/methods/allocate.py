"""Per-layer allocations without a search: OWL's outlier-weighted sparsities and the error-additivity knapsack.

    owl_zeros(layers, weights, norms, target, lam, m)   # zeros per layer, mean sparsity exactly the target
    knapsack(errors, costs, budget, exact)              # the level per item minimising the summed error
"""
from __future__ import annotations

import math

import numpy as np
import torch

from evoexp.errors import UserError
from evoexp.models.adapter import LinearInfo


# --- OWL (Yin et al. 2024), as EvoPress's owl_prune.py allocates it --------------------------------------------
def outlier_ratios(layers: list[LinearInfo], weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor],
                   ms: list[float]) -> np.ndarray:
    """[len(ms), blocks]: the fraction of a block's Wanda scores |W_ij|·‖x_j‖ above M times their block mean."""
    blocks = sorted({li.block for li in layers})
    out = np.zeros((len(ms), len(blocks)))
    for bi, b in enumerate(blocks):
        scores = torch.cat([(weights[li.name].float().abs() *  # the norms are cached on the CPU
                             norms[li.name].to(weights[li.name].device).float().unsqueeze(0)).reshape(-1)
                            for li in layers if li.block == b])
        mean = scores.mean()
        for mi, m in enumerate(ms):
            out[mi, bi] = float((scores > m * mean).float().mean())
    return out


def owl_block_sparsity(ratios: np.ndarray, target: float, lam: float) -> np.ndarray:
    """s_b = s − 2λ·(r_b − min r)/(max r − min r), re-centred on s: more outliers, fewer weights pruned."""
    spread = ratios.max() - ratios.min()
    if spread <= 0:
        return np.full(len(ratios), target)
    scaled = 2 * lam * (ratios - ratios.min()) / spread
    s = target - scaled + scaled.mean()
    if s.min() < 0 or s.max() >= 1:
        raise UserError(f"search.lambdas: lambda={lam} moves block sparsities outside [0, 1) around target "
                        f"{target} ({s.min():.3f}..{s.max():.3f}); use a smaller lambda")
    return s


def owl_zeros(layers: list[LinearInfo], block_sparsity: dict[int, float], total: int) -> dict[str, int]:
    """Zeros per layer at its block's sparsity, rounded (largest remainder) to exactly `total` zeros overall."""
    ideal = np.array([block_sparsity[li.block] * li.numel for li in layers])
    zeros = np.floor(ideal).astype(np.int64)
    short = total - int(zeros.sum())
    if short:
        order = np.argsort(-(ideal - zeros), kind="stable")
        zeros[order[:short] if short > 0 else order[short:]] += 1 if short > 0 else -1
    return {li.name: int(min(max(z, 0), li.numel)) for li, z in zip(layers, zeros)}


# --- the error-additivity baseline (SPDY's DP, as in EvoPress's dp_search.py, with weighted costs) ------------
def knapsack(errors: list[np.ndarray], costs: list[np.ndarray], budget: int, exact: bool = False,
             resolution: int = 200_000) -> np.ndarray:
    """One option per item minimising Σ errors[i][k] with Σ costs[i][k] == budget (exact) or <= budget.

    Costs are non-negative integers. When the budget exceeds `resolution` steps (and exact is off), costs are
    rounded up and the budget down onto a coarser grid, so the answer stays within budget."""
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    base = int(sum(int(c.min()) for c in costs))
    costs = [c - c.min() for c in costs]
    budget = int(budget) - base
    if budget < 0:
        raise UserError(f"the budget is below what the cheapest options spend ({base + budget} < {base})")
    g = math.gcd(*[int(v) for c in costs for v in c]) or 1
    if exact and budget % g:
        raise UserError("no combination of levels spends the budget exactly")
    costs, budget = [c // g for c in costs], budget // g
    if budget > resolution:
        if exact:
            raise UserError(f"an exact budget of {budget} steps is more than the knapsack resolution {resolution}")
        f = budget / resolution
        costs, budget = [np.ceil(c / f).astype(np.int64) for c in costs], resolution
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(costs), budget + 1), dtype=np.int16)
    for i, (c, e) in enumerate(zip(costs, errors)):
        new = np.full(budget + 1, np.inf)
        for k, (ck, ek) in enumerate(zip(c.tolist(), e.tolist())):
            if ck > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[ck:] = best[: budget + 1 - ck] + ek
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = k
        best = new
    end = budget if exact else int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise UserError("no combination of levels spends the budget exactly")
    picks = np.zeros(len(costs), dtype=np.int64)
    for i in range(len(costs) - 1, -1, -1):
        k = int(choice[i, end])
        picks[i] = k
        end -= int(costs[i][k])
    return picks


def group_knapsack(errors: list[np.ndarray], groups: list[np.ndarray], weights: np.ndarray, per_weight: float,
                   exact: bool, resolution: int = 200_000) -> np.ndarray:
    """Level index per unit minimising Σ errors, each group spending at most (exactly, with `exact`)
    floor(per_weight · Σ its units' weights) weighted level steps; errors[i][k] is unit i at level k."""
    picks = np.zeros(len(errors), dtype=np.int64)
    for g in groups:
        w = [int(weights[i]) for i in g]
        budget = math.floor(per_weight * sum(w) + 1e-9)
        picks[g] = knapsack([errors[i] for i in g], [wi * np.arange(len(errors[i])) for wi, i in zip(w, g)],
                            budget, exact=exact, resolution=resolution)
    return picks
