"""The applier contract (evoexp/models/applier.py): what an applier installs is its own, so writes to the model
after `apply` (fine-tuning a candidate in place) reach neither the database's cached levels nor the dense
weights, a later `apply` installs the state's exact values again, and `restore` gives the model back."""
import pytest
import torch

from evoexp.config import SparseGPTCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, LevelApplier, build_database
from evoexp.methods.drop import DropApplier, DropConfig
from evoexp.models import Applier
from tests.test_database import spec_for


@pytest.fixture(scope="module")
def db(tiny, tmp_path_factory):
    stream = load_tokens("wikitext2:validation", tiny.tokenizer)
    win, proto = calibration_windows(stream, tiny.tokenizer, 64, 8, seed=0, bos=False)
    db = Database(tmp_path_factory.mktemp("db"), spec_for(tiny, proto, "sparse", [0.3, 0.5, 0.7], "dense",
                                                           SparseGPTCfg()))
    build_database(db, tiny.adapter, win, SparseGPTCfg(), batch=4)
    return db


@pytest.mark.parametrize("cache_gb", [0.0, 1.0])
def test_writes_after_apply_reach_neither_the_cache_nor_the_dense_weights(tiny, db, cache_gb):
    names = list(db.spec.grid)[:4]
    dense = {n: tiny.adapter.module(n).weight.detach().clone() for n in names}
    applier = LevelApplier(tiny.adapter, db, cache_gb=cache_gb)
    assert isinstance(applier, Applier)
    applier.apply({n: 1 for n in names})
    applier.apply({n: 2 for n in names})
    applier.apply({n: 1 for n in names})  # level 1 now comes from the cache (when there is one)
    weights = [tiny.adapter.module(n).weight for n in names]
    optimizer = torch.optim.SGD(weights, lr=0.1)  # a fine-tuning step on the candidate, in place
    for w in weights:
        w.grad = torch.ones_like(w)
    optimizer.step()
    with torch.no_grad():
        weights[0].add_(1.0)
    for name, level in [(n, lv) for n in names for lv in (1, 2)]:
        if (name, level) in applier.cache:
            assert torch.equal(applier.cache[(name, level)], db.weight(name, level)), "a cached level was written"
    applier.apply({n: 1 for n in names})  # the same state again: its exact values, not the fine-tuned ones
    assert all(torch.equal(tiny.adapter.module(n).weight, db.weight(n, 1)) for n in names)
    with torch.no_grad():
        weights[1].mul_(0.0)
    applier.restore()
    assert all(torch.equal(tiny.adapter.module(n).weight, dense[n]) for n in names), "the dense weights changed"
    for w in weights:  # the session's tiny model is shared: leave no gradient behind
        w.grad = None


def test_an_unchanged_untouched_level_is_not_reinstalled(tiny, db):
    name = next(iter(db.spec.grid))
    applier = LevelApplier(tiny.adapter, db, cache_gb=1.0)
    applier.apply({name: 0})
    loads, ptr = applier.loads, tiny.adapter.module(name).weight.data_ptr()
    applier.apply({name: 0})
    assert (applier.loads, tiny.adapter.module(name).weight.data_ptr()) == (loads, ptr)
    applier.restore()


def test_drop_applier_restores_the_very_modules(tiny):
    blocks = tiny.adapter.blocks
    before = [(b.self_attn, b.mlp) for b in blocks]
    applier = DropApplier(tiny.adapter)
    assert isinstance(applier, Applier)
    n = len(blocks)
    applier.apply(DropConfig([i % 2 == 0 for i in range(n)], [i % 3 == 0 for i in range(n)]))
    assert blocks[0].self_attn is not before[0][0] and blocks[1].self_attn is before[1][0]
    applier.restore()
    assert [(b.self_attn, b.mlp) for b in blocks] == before
