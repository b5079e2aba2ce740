"""Layer-wise solvers on real layers of the embedded model with real calibration activations."""
import logging

import pytest
import torch

from evoexp.solvers import GPTQ, RTN, HessianAccumulator, Magnitude, SparseGPT, Wanda, prepare
from evoexp.solvers.obs import sparsegpt


def recon_error(W, What, H):
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) / tr(W H Wᵀ): the relative layer-output error on the calibration inputs."""
    D = (W.float() - What.float())
    return (torch.einsum("ij,jk,ik->", D, H, D) / torch.einsum("ij,jk,ik->", W.float(), H, W.float())).item()


@pytest.fixture(scope="module")
def layers(block5_inputs):
    return block5_inputs


def fed(cls, W, acc, **kw):
    solver = cls(W, **kw)
    if solver.hessian is not None:
        solver.hessian = acc
    return solver


@pytest.mark.embedded
@pytest.mark.parametrize("short", ["q_proj", "up_proj", "down_proj"])
def test_pruning_error_order_unstructured_and_2_4(layers, short):
    W, acc = layers[short]
    for nm in (None, (2, 4)):
        errs = [recon_error(W, fed(cls, W, acc, nm=nm).compress([0.5])[0], acc.H)
                for cls in (Magnitude, Wanda, SparseGPT)]
        assert errs[0] > errs[1] > errs[2] > 0, (short, nm, errs)


@pytest.mark.embedded
@pytest.mark.parametrize("short", ["q_proj", "o_proj", "down_proj"])
def test_gptq_beats_rtn(layers, short):
    W, acc = layers[short]
    for bits in (3, 4):
        rtn_q = RTN(W).compress([bits])[0]
        gptq_q = fed(GPTQ, W, acc).compress([bits])[0]
        assert recon_error(W, rtn_q.dequantize(), acc.H) > recon_error(W, gptq_q.dequantize(), acc.H)


@pytest.mark.embedded
def test_sparsity_is_exact_and_nm_masks_are_exact(layers):
    W, acc = layers["up_proj"]
    for s, w in zip([0.3, 0.5, 0.7], fed(SparseGPT, W, acc).compress([0.3, 0.5, 0.7])):
        assert (w == 0).sum().item() == round(s * W.numel())
    no_natural_zeros = (W.view(W.shape[0], -1, 4) != 0).all(-1)  # the GGUF weights hold a few exact zeros
    for cls in (SparseGPT, Wanda, Magnitude):
        w = fed(cls, W, acc, nm=(2, 4)).compress([0.5])[0]
        zeros = (w.view(W.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros >= 2).all() and (zeros[no_natural_zeros] == 2).all(), cls.__name__
    w = fed(Wanda, W, acc).compress([0.5])[0]
    assert ((w == 0).sum(1) == W.shape[1] // 2).all()  # Wanda compares within each output row


@pytest.mark.embedded
def test_quantized_values_lie_on_the_grid_with_a_partial_last_group(layers):
    W, acc = layers["q_proj"]  # 576 input columns = 4 groups of 128 + one of 64
    for q in fed(GPTQ, W, acc).compress([2, 3, 4, 8]):
        assert q.codes.max().item() <= 2 ** q.bits - 1
        assert q.scales.shape == (576, 5) and q.g_idx.max().item() == 4 and (q.g_idx == 4).sum().item() == 64
        deq = q.dequantize()
        for col in (0, 300, 575):
            g = q.g_idx[col]
            grid = q.scales[:, g:g + 1] * (torch.arange(2 ** q.bits).float() - q.zeros[:, g:g + 1])
            assert (grid - deq[:, col:col + 1]).abs().min(1).values.max().item() < 1e-6
    sym = fed(GPTQ, W, acc, sym=True, act_order=True).compress([4])[0]
    assert (sym.zeros == 8).all() and not torch.equal(sym.g_idx, torch.sort(sym.g_idx).values)


def test_stacked_levels_equal_separate_runs():
    torch.manual_seed(0)
    X = torch.randn(512, 96)
    W = torch.randn(40, 96)
    acc = HessianAccumulator(96)
    acc.add_batch(X)
    U, dead, _ = prepare(acc.H, W)
    together = sparsegpt(W, U, [0.4, 0.6], blocksize=32)
    apart = [sparsegpt(W, U, [s], blocksize=32)[0] for s in (0.4, 0.6)]
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    q_together = GPTQ(W, group_size=32)
    q_together.hessian = acc
    q_apart = [q_together.compress([b])[0] for b in (3, 4)]
    for a, b in zip(q_together.compress([3, 4]), q_apart):
        assert torch.equal(a.codes, b.codes)


def test_cholesky_failure_recovers_with_more_damping(caplog):
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    H = -torch.eye(32) * 0.5 + 0.01 * torch.ones(32, 32)  # indefinite: the first attempts must fail
    H[0, 0] = H[3, 3] = 0.0  # and two dead columns
    with caplog.at_level(logging.WARNING):
        U, dead, damp = prepare(H, W, damp=0.01)
    assert torch.isfinite(U).all() and damp > 0.01 and dead[0] and dead[3]
    assert "Cholesky failed" in caplog.text
    pruned = sparsegpt(W, U, [0.5], dead=dead)[0]
    assert torch.isfinite(pruned).all() and (pruned[:, [0, 3]] == 0).all()


@pytest.mark.embedded
def test_sparsegpt_with_joint_quantization_keeps_exact_sparsity_on_the_grid(layers):
    W, acc = layers["q_proj"]
    plain, joint = (fed(SparseGPT, W, acc, **kw).compress([0.5])[0] for kw in ({}, {"bits": 4, "group_size": 128}))
    zeros = (joint == 0).sum().item()  # the mask's zeros, plus kept weights that round to the grid's zero
    assert round(0.5 * W.numel()) <= zeros < round(0.55 * W.numel())
    for g in range(5):  # 4 full groups of 128 columns and the partial one of 64
        block = joint[:, g * 128: (g + 1) * 128]
        distinct = max(len(torch.unique(row[row != 0])) for row in block)
        assert distinct <= 16, (g, distinct)
    assert recon_error(W, plain, acc.H) < recon_error(W, joint, acc.H) < 2 * recon_error(W, plain, acc.H)
