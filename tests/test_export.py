"""Exports round-trip: loaded back the way users load them, they give the in-memory compressed model's logits."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evoexp.config import GPTQCfg, SparseGPTCfg
from evoexp.database import Database, LevelApplier, build_database
from evoexp.errors import UserError
from evoexp.methods.export import gptq_pack, save_compressed_tensors, save_gptq
from evoexp.methods.layerwise import Allocation
from evoexp.solvers.quant import QuantizedWeight
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


# --- GPTQ: an unpacker written from GPTQModel's layout description, bit by bit (not the packer's arithmetic) ---
PLANES = {3: [(2, 0), (1, 2)], 5: [(4, 0), (1, 4)], 6: [(4, 0), (2, 4)], 7: [(4, 0), (2, 4), (1, 6)]}


def bits_of(words):
    """int32 words [w, m] -> their bits [w * 32, m], bit t of word i at row 32 i + t."""
    u = words.long() & 0xFFFFFFFF
    return ((u.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, words.shape[1])


def read_stream(words, width, n):
    """Continuous layout: value k is bits k*width .. k*width + width - 1 of the column's bit stream."""
    stream = bits_of(words)
    return torch.stack([sum(stream[k * width + t] << t for t in range(width)) for k in range(n)])


def gptq_unpack(words, bits, n, planar=False):
    """[ceil(n*bits/32), m] int32 -> the n unsigned values of each column (`planar`: a gptq_p checkpoint)."""
    if bits not in PLANES or (bits == 3 and not planar):
        return read_stream(words, bits, n)
    row = 0
    blocks = words.view(n // 32, bits, -1)  # per 32 values: the low plane's words, then the higher planes'
    values = torch.zeros(n // 32, 32, words.shape[1], dtype=torch.int64)
    for width, offset in PLANES[bits]:
        for b in range(n // 32):
            values[b] |= read_stream(blocks[b, row:row + width], width, 32) << offset
        row += width
    return values.view(n, -1)


def test_gptq_3bit_packing_is_gptqmodels_10_1_10_1_10_layout():
    """GPTQModel's pack loop for 3 bits (PackableQuantLinear.pack_original), written out for one column."""
    codes = torch.randint(0, 8, (32, 1), generator=torch.Generator().manual_seed(0))
    c = [int(x) for x in codes[:, 0]]
    w0 = sum(c[j] << (3 * j) for j in range(10)) | (c[10] << 30)
    w1 = (c[10] >> 2) & 1 | sum(c[j] << (3 * (j - 11) + 1) for j in range(11, 21)) | (c[21] << 31)
    w2 = (c[21] >> 1) & 3 | sum(c[j] << (3 * (j - 22) + 2) for j in range(22, 32))
    expected = [w & 0xFFFFFFFF for w in (w0, w1, w2)]
    assert [int(w) & 0xFFFFFFFF for w in gptq_pack(codes, 3)[:, 0]] == expected


@pytest.mark.parametrize("bits,planar", [(2, False), (3, False), (3, True), (4, False), (5, True), (6, True),
                                         (7, True), (8, False), (8, True)])
def test_gptq_pack_round_trips_every_width(bits, planar):
    values = torch.randint(0, 1 << bits, (64, 5), generator=torch.Generator().manual_seed(bits))
    packed = gptq_pack(values, bits, planar)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 5)
    assert torch.equal(gptq_unpack(packed, bits, 64, planar), values)
    if bits in (2, 4, 8):  # one plane: the planar words are the continuous ones
        assert torch.equal(packed, gptq_pack(values, bits, not planar))


# 32 divides the tiny model's 64 / 128 inputs, 48 does not (128 = 2 x 48 + 32: the last group is partial).
# 5/6-bit layers make the checkpoint gptq_p (planar, zeros as they are); without them sym=true writes gptq (v1:
# zero - 1) and sym=false gptq_v2.
@pytest.mark.parametrize("group_size,sym,act_order,bits,fmt", [
    (32, False, False, [2, 3, 4, 5, 6, 8], "gptq_p"),
    (48, True, True, [2, 3, 4, 8], "gptq"),
    (48, False, False, [2, 3, 4, 8], "gptq_v2"),
])
def test_gptq_export_decodes_exactly_with_per_layer_bits(tiny, windows, tmp_path,  # noqa: F811
                                                         group_size, sym, act_order, bits, fmt):
    win, proto = windows
    solver = GPTQCfg(group_size=group_size, sym=sym, act_order=act_order)
    db = Database(tmp_path / "db", spec_for(tiny, proto, "quant", bits, "reference", solver, 3))
    build_database(db, tiny.adapter, win, solver, batch=4)
    alloc = Allocation(db, random_levels(db, group_size))
    widths = {name: db.spec.grid[name][i] for name, i in alloc.levels.items()}
    assert sorted(set(widths.values())) == bits  # every bit-width in use
    save_gptq(tiny.model, alloc, tmp_path / "model")
    stored = load_file(str(tmp_path / "model" / "model.safetensors"))
    config = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == config["format"] == fmt
    planar, v1 = fmt == "gptq_p", fmt == "gptq"
    assert config["group_size"] == group_size and config["sym"] is sym and config["desc_act"] is act_order
    for name, level in alloc.levels.items():  # every packed tensor decodes to exactly the database's
        q = db.quantized(name, level)
        rows, cols = q.codes.shape
        assert q.scales.shape[1] == -(-cols // group_size)
        assert f"{name}.weight" not in stored
        assert stored[f"{name}.qweight"].dtype == torch.int32
        assert torch.equal(gptq_unpack(stored[f"{name}.qweight"], q.bits, cols, planar), q.codes.long().T), name
        zeros = gptq_unpack(stored[f"{name}.qzeros"].T.contiguous(), q.bits, rows, planar).T + int(v1)
        assert torch.equal(zeros, q.zeros.long().T), name
        assert torch.equal(stored[f"{name}.scales"], q.scales.T.half())
        assert torch.equal(stored[f"{name}.g_idx"], q.g_idx.to(torch.int32))
        sequential = torch.equal(q.g_idx.long(), torch.arange(cols) // group_size)
        assert sequential is not act_order, name  # act-order permutes the columns' groups
    assert json.loads((tmp_path / "model" / "quantize_config.json").read_text()) == config


def test_gptq_dynamic_names_exactly_the_layers_off_the_default_width(tiny, windows, tmp_path):  # noqa: F811
    win, proto = windows
    solver = GPTQCfg(group_size=128)
    db = Database(tmp_path / "db", spec_for(tiny, proto, "quant", [2, 3, 4], "reference", solver, 3))
    build_database(db, tiny.adapter, win, solver, batch=4)
    alloc = Allocation(db, random_levels(db, 7))
    left_dense = "model.layers.1.mlp.up_proj"  # a linear outside the allocation stays dense: a `-:` entry
    alloc.levels.pop(left_dense)
    widths = {name: db.spec.grid[name][i] for name, i in alloc.levels.items()}
    save_gptq(tiny.model, alloc, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == "gptq_v2"
    counts = {b: list(widths.values()).count(b) for b in set(widths.values())}
    assert counts[config["bits"]] == max(counts.values())
    off = {name for name, b in widths.items() if b != config["bits"]}
    assert off and len(off) < len(widths)
    dynamic = config["dynamic"]
    assert set(dynamic) == {f"+:^{re.escape(n)}$" for n in off} | {f"-:^{re.escape(left_dense)}$"}
    modules = [n for n, _ in tiny.model.named_modules()]
    for key, override in dynamic.items():  # each regex matches its one module, as GPTQModel's matcher reads it
        matched = [n for n in modules if re.match(key[2:], n)]
        assert len(matched) == 1, key
        assert override == ({"bits": widths[matched[0]]} if key.startswith("+:") else {})
    stored = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert f"{left_dense}.weight" in stored and f"{left_dense}.qweight" not in stored


def test_gptq_export_refuses_unpackable_layers(tiny, tmp_path):
    def one_layer(bits, rows, cols):
        q = QuantizedWeight(torch.zeros(rows, cols, dtype=torch.uint8), torch.ones(rows, 1), torch.zeros(rows, 1),
                            torch.zeros(cols, dtype=torch.int32), bits, False)
        db = SimpleNamespace(spec=SimpleNamespace(solver={"group_size": 0}), quantized=lambda name, level: q)
        return SimpleNamespace(db=db, levels={"model.layers.0.mlp.down_proj": 0})

    with pytest.raises(UserError, match="down_proj is 1-bit; GPTQ stores 2, 3, 4, 5, 6, 7, 8 bits"):
        save_gptq(tiny.model, one_layer(1, 64, 128), tmp_path / "a")
    with pytest.raises(UserError, match="down_proj is 64x48; GPTQ packs 5-bit codes in runs of 32"):
        save_gptq(tiny.model, one_layer(5, 64, 48), tmp_path / "b")


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
    from evoexp.models.loading import hf_checkpoint

    tiny.model.save_pretrained(tmp_path / "a")
    name = "model.layers.0.mlp.down_proj"
    original = tiny.adapter.module(name).weight.data.clone()
    try:
        tiny.adapter.module(name).weight.data[0, 0] += 1.0
        tiny.model.save_pretrained(tmp_path / "b")
    finally:
        tiny.adapter.module(name).weight.data = original
    a = hf_checkpoint(ModelCfg(name="a", source="hf", path=str(tmp_path / "a")))[1]
    b = hf_checkpoint(ModelCfg(name="b", source="hf", path=str(tmp_path / "b")))[1]
    assert (tmp_path / "a" / "model.safetensors").stat().st_size == (tmp_path / "b" / "model.safetensors").stat().st_size
    assert a != b
    assert a == hf_checkpoint(ModelCfg(name="a", source="hf", path=str(tmp_path / "a")))[1]
