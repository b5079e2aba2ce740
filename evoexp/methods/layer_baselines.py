"""The per-layer baselines EvoPress is compared with, as states of a level space or candidate allocations:
error-additivity DP (SPDY-style knapsack over the database's reconstruction errors) and OWL (outlier-weighted
block sparsities). Random search is the level space's own `random_states`; the recipe scores them."""
from __future__ import annotations

import math

import numpy as np
import torch

from evoexp.config import DPSearchCfg, OwlSearchCfg
from evoexp.database import Database
from evoexp.methods.allocate import group_knapsack, knapsack, outlier_ratios, owl_block_sparsity, owl_zeros
from evoexp.methods.layerwise import LayerLevels
from evoexp.models.adapter import LinearInfo


def dp_state(lv: LayerLevels, db: Database, method, s: DPSearchCfg) -> tuple[np.ndarray, float]:
    """The state minimising the summed per-layer reconstruction errors under the exact budget, and that sum."""
    target = method.target
    errors = [sum(db.errors(name).numpy() for name in names) for names in lv.unit_layers]
    if method.kind == "structured":  # each switch group of the space exactly at its budget (method.budget)
        state = lv.space.lo.copy()
        for g, t in zip(lv.space.groups, lv.space.targets):
            costs = [int(lv.space.weights[i]) * np.arange(len(errors[i])) for i in g]
            state[g] = knapsack([errors[i] for i in g], costs, t, exact=True, resolution=s.resolution)
    elif method.kind == "sparse":  # grid index k of a unit = level lo + k; the levels must sum to 0
        costs = [np.arange(len(e)) for e in errors]
        picks = knapsack(errors, costs, int(-lv.space.lo.sum()), exact=True)
        state = picks + lv.space.lo
    elif s.budget == "groups":  # each switch group of the search's space at the target mean bit-width
        state = group_knapsack(errors, lv.space.groups, lv.space.weights, target - min(method.levels),
                               exact=target == int(target), resolution=s.resolution)
    else:  # bits weighted by the number of weights: at most target bits per weight overall
        widths = np.array(sorted(method.levels))
        costs = [n * widths for n in lv.numel.tolist()]
        budget = math.floor(target * int(lv.numel.sum()) + 1e-9)
        state = knapsack(errors, costs, budget, exact=False, resolution=s.resolution)
    total = float(sum(e[k] for e, k in zip(errors, (state - lv.offset).tolist())))
    return state, total


def owl_candidates(layers: list[LinearInfo], weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor],
                   target: float, s: OwlSearchCfg, with_target: bool
                   ) -> tuple[dict[str, list[float]], list[tuple[dict, dict[str, int]]]]:
    """OWL's zeros per layer for every (lambda, M) of the grid, and the sparsity grid that holds them all.

    `with_target` adds the target sparsity to every layer's grid even where no candidate uses it (a database
    built with compressed propagation computes the next block's inputs at the target)."""
    ratios = outlier_ratios(layers, weights, norms, list(s.ms))
    total = sum(round(target * li.numel) for li in layers)
    candidates = []
    for lam in s.lambdas:
        for mi, big_m in enumerate(s.ms):
            block_sparsity = owl_block_sparsity(ratios[mi], target, lam)
            zeros = owl_zeros(layers, dict(enumerate(block_sparsity)), total)
            candidates.append(({"lambda": lam, "m": big_m, "block_sparsity": block_sparsity.round(4).tolist()},
                               zeros))
    grid = {li.name: {z[li.name] / li.numel for _, z in candidates} for li in layers}
    if with_target:
        for li in layers:
            grid[li.name].add(round(target * li.numel) / li.numel)
    return {name: sorted(levels) for name, levels in grid.items()}, candidates
