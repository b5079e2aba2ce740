"""The baselines' allocators: the DP is optimal (checked by enumeration), OWL keeps the target mean exactly."""
import itertools

import numpy as np
import pytest
import torch

from evoexp.errors import UserError
from evoexp.methods.allocate import group_knapsack, knapsack, outlier_ratios, owl_block_sparsity, owl_zeros
from tests.test_levels import llama_like


def brute(errors, costs, budget, exact):
    best, arg = np.inf, None
    for combo in itertools.product(*[range(len(e)) for e in errors]):
        c = sum(costs[i][k] for i, k in enumerate(combo))
        if (c == budget) if exact else (c <= budget):
            e = sum(errors[i][k] for i, k in enumerate(combo))
            if e < best - 1e-12:
                best, arg = e, combo
    return best, arg


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exact", [True, False])
def test_knapsack_is_optimal_on_small_problems(seed, exact):
    rng = np.random.default_rng(seed)
    items = rng.integers(3, 6)
    costs = [np.sort(rng.choice(np.arange(0, 12), size=rng.integers(2, 5), replace=False)) * rng.integers(1, 4)
             for _ in range(items)]
    errors = [np.sort(rng.random(len(c)))[::-1] + rng.random() for c in costs]  # cheaper = worse, mostly
    lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
    budget = int(rng.integers(lo, hi + 1))
    best, arg = brute(errors, costs, budget, exact)
    if arg is None:
        with pytest.raises(UserError):
            knapsack(errors, costs, budget, exact)
        return
    picks = knapsack(errors, costs, budget, exact)
    spent = sum(costs[i][k] for i, k in enumerate(picks))
    assert (spent == budget) if exact else (spent <= budget)
    assert sum(errors[i][k] for i, k in enumerate(picks)) == pytest.approx(best, abs=1e-12)


def test_knapsack_coarsened_costs_stay_within_budget():
    rng = np.random.default_rng(0)
    costs = [np.array([2, 3, 4, 5, 6]) * n for n in rng.integers(1_000, 5_000, size=12)]
    errors = [np.array([16.0, 8, 4, 2, 1]) * rng.random() for _ in costs]
    budget = int(3.3 * sum(c[0] // 2 for c in costs))
    picks = knapsack(errors, costs, budget, resolution=500)
    assert sum(c[k] for c, k in zip(costs, picks)) <= budget
    exact = knapsack(errors, costs, budget)  # full resolution is optimal and may spend a little more
    assert sum(e[k] for e, k in zip(errors, exact)) <= sum(e[k] for e, k in zip(errors, picks)) + 1e-12


@pytest.mark.parametrize("per_weight,exact", [(1, True), (0.5, False)])  # 3 and 2.5 bits over levels 2..6
def test_group_knapsack_holds_each_group_and_is_optimal_within_it(per_weight, exact):
    rng = np.random.default_rng(1)
    groups = [np.array([0, 2, 4]), np.array([1, 3, 5, 6])]
    errors = [np.sort(rng.random(5))[::-1] * (1.0 if i in groups[0] else 100.0) for i in range(7)]
    weights = np.ones(7, dtype=np.int64)
    picks = group_knapsack(errors, groups, weights, per_weight, exact)
    for g in groups:
        budget = int(per_weight * len(g))
        assert picks[g].sum() == budget  # a level always lowers the error, so the whole budget is spent
        best, _ = brute([errors[i] for i in g], [np.arange(5)] * len(g), budget, exact)
        assert sum(errors[i][picks[i]] for i in g) == pytest.approx(best, abs=1e-12)
    # one knapsack over all units would move levels to the group whose errors are 100x larger
    pooled = knapsack(errors, [np.arange(5)] * 7, int(per_weight * 7), exact)
    assert pooled[groups[1]].sum() > int(per_weight * len(groups[1]))


@pytest.mark.parametrize("lam", [0.02, 0.08, 0.2])
def test_owl_allocation_has_the_target_mean(lam):
    layers = llama_like(blocks=6)
    g = torch.Generator().manual_seed(0)
    weights = {li.name: torch.randn(li.out_features, li.in_features, generator=g) for li in layers}
    for li in layers:  # make some blocks outlier-heavy
        if li.block in (1, 4):
            weights[li.name][:, :3] *= 20
    norms = {li.name: torch.rand(li.in_features, generator=g) + 0.5 for li in layers}
    ratios = outlier_ratios(layers, weights, norms, [5.0])[0]
    assert ratios[1] > ratios[0] and ratios[4] > ratios[5]
    per_block = owl_block_sparsity(ratios, 0.6, lam)
    assert per_block.mean() == pytest.approx(0.6, abs=1e-12)
    assert per_block.max() - per_block.min() == pytest.approx(2 * lam)
    assert per_block[1] < per_block[0]  # more outliers, fewer weights pruned
    total = sum(round(0.6 * li.numel) for li in layers)
    zeros = owl_zeros(layers, dict(enumerate(per_block)), total)
    assert sum(zeros.values()) == total  # exactly the non-zeros of the uniform allocation
    for li in layers:
        assert abs(zeros[li.name] - per_block[li.block] * li.numel) <= 1
    with pytest.raises(UserError, match="lambda"):
        owl_block_sparsity(ratios, 0.95, 0.2)
