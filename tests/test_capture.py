"""Block-sequential calibration: Hessians match full forwards, propagation modes feed the right inputs."""
import pytest
import torch

from evoexp.blockrun import BlockRunner
from evoexp.errors import UserError
from evoexp.solvers import HessianAccumulator
from evoexp.solvers.capture import sequential

WINDOWS = torch.randint(3, 259, (6, 40), generator=torch.Generator().manual_seed(0))


def hooked_hessians(tiny, names):
    accs = {n: HessianAccumulator(tiny.adapter.module(n).in_features) for n in names}
    hooks = [tiny.adapter.module(n).register_forward_hook(lambda m, a, o, n=n: accs[n].add_batch(a[0]))
             for n in names]
    with torch.no_grad():
        for i in range(0, 6, 4):
            tiny.model(WINDOWS[i: i + 4])
    for h in hooks:
        h.remove()
    return accs


def run_sequential(tiny, propagation, replace, **kw):
    seen = {}

    def compress(block, linears, hessians):
        seen.update({li.name: hessians[li.name] for li in linears})
        return replace(block, linears)

    sequential(BlockRunner(tiny.adapter), WINDOWS, compress, propagation, batch=4, **kw)
    return seen


def test_dense_propagation_matches_a_full_forward(tiny):
    seq = run_sequential(tiny, "dense", lambda b, lins: {})
    ref = hooked_hessians(tiny, list(seq))
    assert len(seq) == 8 * 7
    for name, acc in seq.items():
        torch.testing.assert_close(acc.H, ref[name].H, rtol=1e-4, atol=1e-6)
        assert acc.tokens == 6 * 40


def test_compressed_propagation_feeds_the_compressed_block(tiny):
    down0 = tiny.adapter.linears(0)[-1]
    before = tiny.adapter.module(down0.name).weight.clone()

    def replace(block, linears):  # "compress" block 0's down_proj to zero, leave the rest dense
        return {down0.name: torch.zeros_like(before)} if block == 0 else {}

    seq = run_sequential(tiny, "compressed", replace)
    assert torch.equal(tiny.adapter.module(down0.name).weight, before)  # the model is left dense
    q1 = tiny.adapter.linears(1)[0].name
    tiny.adapter.module(down0.name).weight.data = torch.zeros_like(before)
    try:
        ref = hooked_hessians(tiny, [q1])[q1]
    finally:
        tiny.adapter.module(down0.name).weight.data = before
    torch.testing.assert_close(seq[q1].H, ref.H, rtol=1e-4, atol=1e-6)
    dense = run_sequential(tiny, "dense", replace)
    assert not torch.allclose(dense[q1].H, ref.H)
    with pytest.raises(UserError, match="propagation"):
        run_sequential(tiny, "sideways", replace)


def test_true_sequential_feeds_later_groups_the_compressed_earlier_ones(tiny):
    """With q/k/v zeroed in block 0, o_proj of block 0 sees zero inputs only in true-sequential mode."""
    qkv = [li.name for li in tiny.adapter.input_groups(0)[0]]
    o0 = tiny.adapter.input_groups(0)[1][0].name

    def replace(block, linears):
        return {li.name: torch.zeros_like(tiny.adapter.module(li.name).weight) for li in linears
                if li.name in qkv}

    seq = run_sequential(tiny, "compressed", replace, true_sequential=True)
    assert seq[o0].H.abs().max().item() == 0.0  # attention of zero values: o_proj saw only zeros
    plain = run_sequential(tiny, "compressed", replace)
    assert plain[o0].H.abs().max().item() > 0
    with pytest.raises(UserError, match="true_sequential"):
        run_sequential(tiny, "dense", replace, true_sequential=True)


def test_shared_inputs_share_one_accumulator_and_finished_blocks_are_skipped(tiny):
    calls = []

    def replace(block, linears):
        calls.append(block)
        return {}

    seen = {}

    def compress(block, linears, hessians):
        seen.update({li.name: hessians[li.name] for li in linears})
        return replace(block, linears)

    sequential(BlockRunner(tiny.adapter), WINDOWS, compress, "dense", batch=4,
               finished=lambda b: {} if b < 5 else None)
    assert calls == [5, 6, 7]
    q, k, v = tiny.adapter.input_groups(6)[0]
    assert seen[q.name] is seen[k.name] is seen[v.name]
    full = run_sequential(tiny, "dense", lambda b, lins: {})
    torch.testing.assert_close(seen[q.name].H, full[q.name].H)  # skipped blocks still propagate
