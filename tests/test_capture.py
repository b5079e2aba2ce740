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


def run_sequential(tiny, propagation, replace):
    seen = {}

    def make(li):
        return HessianAccumulator(li.in_features)

    def compress(block, linears, solvers):
        seen.update(solvers)
        return replace(block, linears)

    sequential(BlockRunner(tiny.adapter), WINDOWS, make, compress, propagation, batch=4)
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
