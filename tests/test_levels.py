"""Level spaces over per-layer sparsity and bit-widths: every switch keeps non-zeros / bits exactly."""
import numpy as np
import pytest

from evoexp.errors import UserError
from evoexp.methods.layerwise import (bits_of, default_step, fractional_start, group_sums, quant_levels,
                                      sparse_levels, units)
from evoexp.models.adapter import LinearInfo


def llama_like(blocks=4, hidden=64, mlp=160, kv=16):
    """LinearInfos with Llama's shapes (GQA: k/v smaller than q/o)."""
    shapes = [("q_proj", "attn_in", hidden, hidden), ("k_proj", "attn_in", hidden, kv),
              ("v_proj", "attn_in", hidden, kv), ("o_proj", "attn_out", hidden, hidden),
              ("gate_proj", "mlp_in", hidden, mlp), ("up_proj", "mlp_in", hidden, mlp),
              ("down_proj", "mlp_out", mlp, hidden)]
    return [LinearInfo(f"model.layers.{b}.{s}", b, s, role, i, o) for b in range(blocks) for s, role, i, o in shapes]


def nonzeros(levels, state):
    return sum(round((1 - v) * levels.numel[u]) for u, v in
               enumerate(levels.values(state)[n[0]] for n in levels.unit_layers))


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
def test_sparse_switches_keep_the_number_of_nonzeros(target):
    layers = llama_like()
    step = default_step(target, 64, 8)
    lv = sparse_levels(layers, target, step, 8)
    rng = np.random.default_rng(0)
    state = lv.space.uniform_state()
    start = nonzeros(lv, state)
    assert start == sum(li.numel - round(target * li.numel) for li in layers)
    for _ in range(300):
        state = lv.space.mutate(state, rng)
        assert lv.space.feasible(state) and nonzeros(lv, state) == start
    for name, values in lv.grid.items():  # every level is a whole number of zeros, step apart
        n = next(li.numel for li in layers if li.name == name)
        zeros = [round(v * n) for v in values]
        assert all(b - a == step for a, b in zip(zeros, zeros[1:])) and 0 <= zeros[0] and zeros[-1] <= n
        assert len(values) <= 17


def test_sparse_levels_match_the_evopress_ranges():
    """ℓ ∈ [−min(⌊sN/Δ⌋, L), +min(⌊(1−s)N/Δ⌋, L)] with Δ = 0.5·min(s, 1−s)/L·hidden² by default."""
    layers = llama_like(blocks=1, hidden=576, mlp=1536, kv=192)
    step = default_step(0.7, 576, 8)
    assert step == int(0.5 * 0.3 / 8 * 576 ** 2)
    lv = sparse_levels(layers, 0.7, step, 8)
    by_short = {li.short: (lv.space.lo[i], lv.space.hi[i]) for i, li in enumerate(layers)}
    assert by_short["q_proj"] == (-8, min((331776 - round(0.7 * 331776)) // step, 8))
    assert by_short["k_proj"][0] == -min(round(0.7 * 110592) // step, 8)
    assert by_short["down_proj"] == (-8, 8)
    with pytest.raises(UserError, match="method.step"):
        sparse_levels(layers, 0.5, 0, 8)


@pytest.mark.parametrize("rule,tied", [("size", False), ("name", False), ("none", False), ("size", True),
                                       ("name", True), ("none", True)])
def test_quant_switches_keep_total_bits_for_every_group_rule(rule, tied):
    layers = llama_like()
    lv = quant_levels(layers, 3, [2, 3, 4, 5, 6], rule, tied)
    state = lv.space.uniform_state()
    assert bits_of(lv, state, 2) == 3.0
    total = ((state + 2) * lv.numel).sum()
    rng = np.random.default_rng(1)
    moved = 0
    for _ in range(300):
        child = lv.space.mutate(state, rng)
        moved += not np.array_equal(child, state)
        state = child
        assert ((state + 2) * lv.numel).sum() == total
    assert moved > 200  # switches do happen (with weighted units too)
    assert len(np.unique(state)) > 1
    if rule == "none":  # one group: bits move between layers of different sizes
        assert len(lv.space.groups) == 1 and len(set(lv.numel.tolist())) > 1
    else:
        for g in lv.space.groups:  # a group only holds units of one size
            assert len(set(lv.numel[g].tolist())) == 1
    if tied:
        names = lv.layers_of(state)
        for b in range(4):  # q/k/v share one bit-width, gate/up another
            assert len({names[f"model.layers.{b}.{s}"] for s in ("q_proj", "k_proj", "v_proj")}) == 1
            assert names[f"model.layers.{b}.gate_proj"] == names[f"model.layers.{b}.up_proj"]


@pytest.mark.parametrize("target,rule", [(2.25, "size"), (2.5, "size"), (2.5, "none")])
def test_fractional_bit_targets_start_feasible_and_keep_their_budget(target, rule):
    layers = llama_like()
    base = quant_levels(layers, 3, [2, 3, 4, 5, 6], rule)
    rng = np.random.default_rng(2)
    start = fractional_start(base, target, [2, 3, 4, 5, 6], rng)
    assert target - 0.2 < bits_of(base, start, 2) <= target
    lv = quant_levels(layers, target, [2, 3, 4, 5, 6], rule, state_sums=group_sums(base.space, start))
    assert lv.space.feasible(start)
    state, bits = start.copy(), bits_of(lv, start, 2)
    for _ in range(200):
        state = lv.space.mutate(state, rng)
        assert bits_of(lv, state, 2) == bits
    with pytest.raises(UserError, match="fractional"):
        quant_levels(layers, 2.5, [2, 3, 4])
    with pytest.raises(UserError, match="consecutive"):
        quant_levels(layers, 4, [2, 4, 8])


def test_units_are_every_block_linear(tiny):
    assert len(units(tiny.adapter)) == 8 * 7
