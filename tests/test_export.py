"""Exports round-trip: loaded back the way users load them, they give the in-memory compressed model's logits."""
import json

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evoexp.config import GPTQCfg, SparseGPTCfg
from evoexp.database import Database, LevelApplier, build_database
from evoexp.methods.export import save_compressed_tensors
from evoexp.recipes.layerwise import Allocation
from tests.test_database import spec_for, windows  # noqa: F401 - fixture


def random_levels(db, seed):
    rng = np.random.default_rng(seed)
    return {name: int(rng.integers(len(levels))) for name, levels in db.spec.grid.items()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("group_size", [128, 48])  # 48 does not divide the tiny model's 64 / 128 inputs
def test_compressed_tensors_export_decodes_exactly_and_loads_in_transformers(tiny, windows, tmp_path,  # noqa: F811
                                                                             group_size):
    win, proto = windows
    solver = GPTQCfg(group_size=group_size)
    db = Database(tmp_path / "db", spec_for(tiny, proto, "quant", [2, 3, 4, 5, 6], "reference", solver, 3))
    build_database(db, tiny.adapter, win, solver, batch=4)
    alloc = Allocation(db, random_levels(db, group_size))
    assert len({db.spec.grid[n][i] for n, i in alloc.levels.items()}) == 5  # every bit-width in use
    ids = torch.randint(1, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    dense_logits = logits(tiny.model, ids)
    applier = LevelApplier(tiny.adapter, db)
    applier.apply(alloc.levels)
    try:
        save_compressed_tensors(tiny.model, alloc, tmp_path / "model")
        expected = logits(tiny.model, ids)
    finally:
        applier.restore()
    assert (expected - dense_logits).abs().max() > 1e-3  # quantization shows in the logits
    stored = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name, level in alloc.levels.items():  # the packed codes unpack to exactly the database's codes
        q = db.quantized(name, level)
        offset = 1 << (q.bits - 1)
        codes = unpack_from_int32(stored[f"{name}.weight_packed"], q.bits, tuple(q.codes.shape)).to(torch.int16)
        assert torch.equal(codes + offset, q.codes.to(torch.int16)), name
        assert torch.equal(stored[f"{name}.weight_zero_point"].to(torch.int16) + offset, q.zeros.to(torch.int16))
        assert torch.equal(stored[f"{name}.weight_scale"], q.scales)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    torch.testing.assert_close(logits(packed, ids), expected, rtol=0, atol=1e-5)
    groups = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [2, 3, 4, 5, 6]


def test_sparse_hf_export_loads_with_plain_from_pretrained(tiny, windows, tmp_path):  # noqa: F811
    win, proto = windows
    solver = SparseGPTCfg()
    db = Database(tmp_path / "db", spec_for(tiny, proto, "sparse", [0.3, 0.5, 0.7], "dense", solver))
    build_database(db, tiny.adapter, win, solver, batch=4)
    alloc = Allocation(db, random_levels(db, 0))
    applier = LevelApplier(tiny.adapter, db)
    applier.apply(alloc.levels)
    try:
        tiny.model.save_pretrained(tmp_path / "model")
        ids = torch.randint(1, 250, (2, 40))
        expected = logits(tiny.model, ids)
    finally:
        applier.restore()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    for name, level in alloc.levels.items():
        w = loaded.get_submodule(name).weight
        assert torch.equal(w, db.weight(name, level))
        assert int((w == 0).sum()) == round(db.spec.grid[name][level] * w.numel())
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_local_checkpoints_with_equal_shapes_get_different_fingerprints(tiny, tmp_path):
    """Caches (dense PPL, databases) are keyed by the fingerprint: it must see the weights, not only sizes."""
    from evoexp.config import ModelCfg
    from evoexp.models.loading import _hf_checkpoint

    tiny.model.save_pretrained(tmp_path / "a")
    name = "model.layers.0.mlp.down_proj"
    original = tiny.adapter.module(name).weight.data.clone()
    try:
        tiny.adapter.module(name).weight.data[0, 0] += 1.0
        tiny.model.save_pretrained(tmp_path / "b")
    finally:
        tiny.adapter.module(name).weight.data = original
    a = _hf_checkpoint(ModelCfg(name="a", source="hf", path=str(tmp_path / "a")))[1]
    b = _hf_checkpoint(ModelCfg(name="b", source="hf", path=str(tmp_path / "b")))[1]
    assert (tmp_path / "a" / "model.safetensors").stat().st_size == (tmp_path / "b" / "model.safetensors").stat().st_size
    assert a != b
    assert a == _hf_checkpoint(ModelCfg(name="a", source="hf", path=str(tmp_path / "a")))[1]
