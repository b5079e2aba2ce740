"""Structured solvers (issue 33): ZipLM's greedy structured OBS against brute force, the priors, their levels."""
import logging

import pytest
import torch

from evoexp.config.solvers import MagnitudeCfg, RandomCfg, WandaSPCfg, ZipLMCfg
from evoexp.errors import UserError
from evoexp.solvers import Magnitude
from evoexp.solvers.registry import check_solver, make_solver, solver_class
from evoexp.solvers.structured import (StructMagnitude, StructRandom, StructuredLevel, WandaSP, ZipLM,
                                       block_inverses)

SOLVERS = [ZipLM, WandaSP, StructMagnitude, StructRandom]


def correlated_inputs(n_tokens, cols, seed=0):
    """Tokens × cols inputs with correlated features and one outlier channel."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    X[:, 1] *= 6
    return X


def fed(cls, W, X, **kw):
    solver = cls(W, **kw)
    solver.add_batch(X)
    return solver


def layer_error(W, V, H):
    """tr((W − V) H (W − V)ᵀ) in float64."""
    D = W.double() - V.double()
    return torch.einsum("ij,jk,ik->", D, H.double(), D).item()


def least_squares(W, H, cols):
    """The closed-form optimum over the kept columns: V_K = W H_{:,K} H_KK⁻¹ (zero elsewhere), in float64."""
    W, H = W.double(), H.double()
    V = torch.zeros_like(W)
    if len(cols):
        V[:, cols] = torch.linalg.solve(H[cols][:, cols], (W @ H[:, cols]).T).T
    return V


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("g", [1, 4])
def test_levels_are_nested_and_shaped(cls, g):
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    total = 24 // g
    levels = fed(cls, W, correlated_inputs(200, 24), group_size=g).compress(list(range(total + 1)))
    for k, lv in enumerate(levels):
        assert lv.removed == k and lv.group_size == g and len(lv.kept) == total - k
        assert lv.kept.dtype == torch.long and torch.equal(lv.kept, torch.sort(lv.kept).values)
        assert lv.weight.shape == (16, (total - k) * g) and torch.isfinite(lv.weight).all()
    for a, b in zip(levels, levels[1:]):
        assert set(b.kept.tolist()) < set(a.kept.tolist())
    torch.testing.assert_close(levels[0].weight, W, rtol=0, atol=0)  # count 0: the layer as it was
    assert levels[-1].kept.numel() == 0 and levels[-1].weight.shape == (16, 0)
    assert (levels[-1].dense(24) == 0).all()  # everything removed: the sub-layer is dropped


@pytest.mark.parametrize("g", [1, 2])
def test_each_greedy_step_is_the_brute_force_best_removal(g):
    """On 8×12 with a random SPD H: every step removes the group whose removal, with the kept columns
    re-solved exactly, gives the least layer error; and the compensated weights are that optimum."""
    W = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    solver = fed(ZipLM, W, correlated_inputs(400, 12), group_size=g, damp=0.0)
    H, total = solver.hessian.H, 12 // g
    levels = solver.compress(list(range(total + 1)))
    for prev, lv in zip(levels, levels[1:]):
        chosen = (set(prev.kept.tolist()) - set(lv.kept.tolist())).pop()
        errors = {}
        for cand in prev.kept.tolist():
            kept = torch.tensor([k for k in prev.kept.tolist() if k != cand], dtype=torch.long)
            errors[cand] = layer_error(W, least_squares(W, H, StructuredLevel(kept, W, g, 0).columns()), H)
        best = min(errors, key=errors.get)
        runner_up = min(e for c, e in errors.items() if c != best) if len(errors) > 1 else float("inf")
        assert chosen == best, (lv.removed, chosen, errors)
        assert runner_up > errors[best] * 1.001  # the choice is clear, not a round-off tie
        optimum = least_squares(W, H, lv.columns())
        torch.testing.assert_close(lv.dense(12).double(), optimum, rtol=1e-3, atol=1e-4)
        assert layer_error(W, lv.dense(12), H) == pytest.approx(errors[best], rel=1e-4, abs=1e-6)


def test_dead_inputs_are_removed_first_for_free():
    X = correlated_inputs(300, 12)
    X[:, [2, 3, 7]] = 0  # group 1 (columns 2, 3) is dead, and one column of group 3
    W = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    heads = fed(ZipLM, W, X, group_size=2).compress([1, 2])
    assert heads[0].kept.tolist() == [0, 2, 3, 4, 5] and torch.isfinite(heads[1].weight).all()
    neurons = fed(ZipLM, W, X).compress([3])[0]
    assert set(neurons.kept.tolist()) == set(range(12)) - {2, 3, 7}
    torch.testing.assert_close(layer_error(W, neurons.dense(12), fed(ZipLM, W, X).hessian.H), 0.0, atol=1e-6, rtol=0)
    wanda = fed(WandaSP, W, X, group_size=2).compress([1])[0]
    assert wanda.kept.tolist() == [0, 2, 3, 4, 5]  # RMS 0: the lowest wanda_sp score


def test_rank_deficient_and_indefinite_hessians_give_finite_levels(caplog):
    W = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    few = correlated_inputs(4, 12)  # 4 tokens: H has rank 4 of 12, singular without damping
    few[:, 5] = few[:, 4] * (1 + 1e-7)  # and two collinear inputs
    for g in (1, 2, 3):
        solver = fed(ZipLM, W, few, group_size=g)
        levels = solver.compress(list(range(12 // g + 1)))
        assert all(torch.isfinite(lv.weight).all() for lv in levels)
        errors = [layer_error(W, lv.dense(12), solver.hessian.H) for lv in levels]
        assert all(b >= a - 1e-3 * max(errors) for a, b in zip(errors, errors[1:]))  # error grows along the path
    solver = ZipLM(W, group_size=2)
    solver.hessian.H = -torch.eye(12) * 0.5 + 0.01 * torch.ones(12, 12)  # indefinite: Cholesky must retry
    with caplog.at_level(logging.WARNING):
        levels = solver.compress([0, 3, 6])
    assert solver.damp_used > 0.01 and "Cholesky failed" in caplog.text
    assert all(torch.isfinite(lv.weight).all() for lv in levels) and levels[2].kept.numel() == 0


def test_singular_diagonal_blocks_fall_back_to_the_pseudo_inverse():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # rank 1: Cholesky fails
    inv = block_inverses(torch.stack([A, singular]))
    torch.testing.assert_close(inv[0], torch.linalg.inv(A))
    torch.testing.assert_close(inv[1], torch.full((2, 2), 0.25))  # pinv of [[1, 1], [1, 1]]


def test_dense_round_trips_and_counts_keep_their_order():
    W = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    levels = fed(WandaSP, W, correlated_inputs(50, 8), group_size=2).compress([3, 0, 1, 3])
    assert [lv.removed for lv in levels] == [3, 0, 1, 3]
    torch.testing.assert_close(levels[1].dense(8), W, rtol=0, atol=0)
    lv = levels[2]
    full = lv.dense(8)
    assert torch.equal(full[:, lv.columns()], lv.weight) and torch.equal(full[:, lv.columns()], W[:, lv.columns()])
    gone = sorted(set(range(8)) - set(lv.columns().tolist()))
    assert len(gone) == 2 and (full[:, gone] == 0).all()
    assert lv.columns().tolist() == [c for k in lv.kept.tolist() for c in (2 * k, 2 * k + 1)]
    with pytest.raises(ValueError, match="0..4"):
        WandaSP(W, group_size=2).compress([5])
    with pytest.raises(ValueError, match="group_size 3"):
        ZipLM(W, group_size=3)


def test_prior_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 0.0, -0.5, 4.0]])
    X = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, -2.0, 4.0, 1.0]])  # RMS per column: 1, 2, 2√2, 1
    # wanda_sp: mean_rows |W| · RMS = 2·1, 1·2, 0.5·2√2, 2·1; averaged over groups of 2: 2.0, (√2 + 2)/2
    torch.testing.assert_close(fed(WandaSP, W, X, group_size=2).scores(), torch.tensor([2.0, (2 ** 0.5 + 2) / 2]))
    # magnitude: ‖W[:, G]‖_F = √(1 + 9 + 4), √(0.25 + 0.25 + 16)
    torch.testing.assert_close(StructMagnitude(W, group_size=2).scores(), torch.tensor([14 ** 0.5, 16.5 ** 0.5]))
    assert fed(WandaSP, W, X).compress([2])[0].kept.tolist() == [1, 3]  # per column: 2, 2, 1.41, 2 → drop 2, then 0
    a, b, c = (StructRandom(torch.zeros(4, 64), name=n, seed=s).compress([32])[0].kept for n, s in
               (("l.0", 0), ("l.0", 0), ("l.1", 0)))
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded, and not the same indices in every layer
    assert not torch.equal(a, StructRandom(torch.zeros(4, 64), name="l.0", seed=1).compress([32])[0].kept)


def test_registry_resolves_structured_solvers_by_method():
    W = torch.randn(8, 12)
    assert solver_class("magnitude") is Magnitude and solver_class("magnitude", "structured") is StructMagnitude
    assert solver_class("ziplm") is ZipLM and solver_class("wanda_sp", "structured") is WandaSP
    check_solver("structured", "ziplm")
    with pytest.raises(UserError, match="wanda_sp"):
        check_solver("structured", "wanda")  # the unstructured Wanda is not a structured prior
    with pytest.raises(UserError, match="method=sparse"):
        check_solver("sparse", "ziplm")
    z = make_solver(ZipLMCfg(damp=0.1), W, "o", method_kind="structured", group_size=4)
    assert isinstance(z, ZipLM) and z.group_size == 4 and z.damp == 0.1 and z.groups == 3
    assert isinstance(make_solver(MagnitudeCfg(), W, "m", method_kind="structured"), StructMagnitude)
    assert isinstance(make_solver(WandaSPCfg(), W, "w", method_kind="structured"), WandaSP)
    assert make_solver(RandomCfg(seed=7), W, "r", method_kind="structured").seed == 7
    with pytest.raises(UserError, match="solver.damp"):
        ZipLM.check_config(ZipLMCfg(damp=-1.0))
    with pytest.raises(UserError, match="solver.seed"):
        StructRandom.check_config(RandomCfg(seed=-1))


# --- real layers ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layers(embedded, block5_inputs):
    """o_proj and down_proj of block 5 with their inputs' Hessians, and their groups: a head's columns, one neuron."""
    cfg = embedded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {short: (*block5_inputs[short], head_dim if short == "o_proj" else 1) for short in ("o_proj", "down_proj")}


@pytest.mark.embedded
@pytest.mark.parametrize("short", ["o_proj", "down_proj"])
def test_layer_error_order_magnitude_wanda_sp_ziplm(layers, short):
    W, acc, g = layers[short]
    total = W.shape[1] // g
    counts = [total // 4, total // 2]
    rel = {}
    for cls in (StructMagnitude, WandaSP, ZipLM):
        solver = cls(W, group_size=g)
        if solver.hessian is not None:
            solver.hessian = acc
        levels = solver.compress(counts)
        rel[cls.__name__] = [layer_error(W, lv.dense(W.shape[1]), acc.H) / layer_error(W, 0 * W, acc.H)
                             for lv in levels]
    for k in range(2):
        assert rel["StructMagnitude"][k] > rel["WandaSP"][k] > rel["ZipLM"][k] > 0, (short, rel)
