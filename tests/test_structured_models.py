"""Structured units (query heads, KV groups, MLP neurons): geometry, masking, physically shrunk models and their
checkpoints. Masked and shrunk models must compute the same logits; the shrunk model has exactly the counted
number of parameters fewer."""
import json
import os
import subprocess
import sys

import pytest
import torch

from evoexp.errors import UserError
from evoexp.methods.drop import DropApplier, DropConfig
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.heads import BlockState, StructuredState, geometry, masked_weights, removed_params
from evoexp.models.hetero import MODEL_TYPE
from evoexp.models.hetero.configuration_evoexp_hetero import EvoexpHeteroConfig
from evoexp.models.shrink import META_FILE, load_shrunk, save_shrunk, shrink_model
from tests.conftest import run_cli

VOCAB = 97


def tiny(arch: str = "llama", layers: int = 4, heads: int = 9, kv: int = 3, seed: int = 0, vocab: int = VOCAB,
         tie: bool = False, **extra):
    """A random decoder of `arch` with every parameter (biases and norms too) random, in fp32."""
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
           "gemma2": "Gemma2"}[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=8 * heads, intermediate_size=40, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, max_position_embeddings=256,
                  tie_word_embeddings=tie, pad_token_id=0, **extra)
    if arch == "phi3":
        kwargs.pop("head_dim")
    config = getattr(transformers, cls + "Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls + "ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    return model


def masked_logits(model, state, x, weights=None):
    """Logits of `model` with the state's masked weights installed, then the model put back as it was."""
    adapter = DecoderAdapter(model)
    new = masked_weights(adapter, state, weights)
    old = {name: model.get_parameter(name).data for name in new}
    try:
        for name, t in new.items():
            model.get_parameter(name).data = t
        with torch.no_grad():
            return model(x).logits
    finally:
        for name, t in old.items():
            model.get_parameter(name).data = t


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_shrunk(model, state, x, atol=1e-5, weights=None):
    small = shrink_model(model, state, weights)
    with torch.no_grad():
        got = small(x).logits
    want = masked_logits(model, state, x, weights)
    assert (got - want).abs().max().item() < atol
    assert numel(model) - numel(small) == removed_params(geometry(DecoderAdapter(model)), state)
    return small


# Block 0 keeps 2 query heads of KV group 0 and 3 of group 1 and none of group 2 (uneven GQA, one KV head
# gone); block 1 keeps every head and half the neurons; block 2 loses its attention; block 3 its MLP.
UNEVEN = StructuredState((BlockState((0, 2, 3, 4, 5), tuple(range(0, 40, 3))),
                          BlockState(tuple(range(9)), tuple(range(20))),
                          BlockState((), tuple(range(40))),
                          BlockState((1, 4, 7), ())))


def test_geometry_of_tiny_model(tiny):
    geoms = geometry(tiny.adapter)
    assert len(geoms) == 8
    g = geoms[3]
    assert (g.num_q_heads, g.num_kv_heads, g.head_dim, g.hidden, g.mlp_width) == (4, 2, 16, 64, 128)
    assert g.kv_of_q == (0, 0, 1, 1) and g.is_gqa and not (g.fused_qkv or g.fused_gate_up)
    assert g.attn_out == "model.layers.3.self_attn.o_proj" and g.mlp_in == ("model.layers.3.mlp.gate_proj",
                                                                           "model.layers.3.mlp.up_proj")
    assert (g.head_params, g.kv_head_params, g.neuron_params) == (16 * 128, 2 * 16 * 64, 3 * 64)
    assert (g.attn_fixed, g.mlp_fixed) == (64, 64)  # the RMSNorm of each sub-block


def test_geometry_of_fused_phi3():
    g = geometry(DecoderAdapter(tiny("phi3", layers=1)))[0]
    assert (g.num_q_heads, g.num_kv_heads, g.head_dim, g.mlp_width) == (9, 3, 8, 40)
    assert g.fused_qkv and g.fused_gate_up and g.attn_in == ("model.layers.0.self_attn.qkv_proj",)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_masked_and_shrunk_give_equal_logits(arch):
    extra = {"sliding_window": 5} if arch in ("mistral", "phi3") else {}
    model = tiny(arch, **extra)
    x = torch.randint(1, VOCAB, (2, 12))
    small = check_shrunk(model, UNEVEN, x)
    assert small.config.layer_kv_group_sizes == [[2, 3], [3, 3, 3], [], [1, 1, 1]]
    assert small.config.layer_intermediate_sizes == [14, 20, 40, 0]
    assert not hasattr(small.model.layers[2], "input_layernorm")  # removed with its attention
    if arch == "qwen2":
        assert small.model.layers[0].self_attn.q_proj.bias.shape == (5 * 8,)
    if arch == "qwen3":
        assert hasattr(small.model.layers[0].self_attn, "q_norm")


def test_uniform_removal_and_even_groups_use_grouped_kernels():
    model = tiny()
    geoms = geometry(DecoderAdapter(model))
    state = StructuredState.from_counts(geoms, [3] * 4, [20] * 4,
                                        head_order=[[8, 5, 2]] * 4)  # one query head of each KV group
    small = check_shrunk(model, state, torch.randint(1, VOCAB, (1, 16)))
    attn = small.model.layers[0].self_attn
    assert attn.even and attn.num_key_value_groups == 2 and attn.num_heads == 6


def test_a_shrunk_model_shrinks_again():
    keep_all = StructuredState(UNEVEN.blocks[:2] + (BlockState((0, 1, 2), tuple(range(30))),
                                                    BlockState((1, 4, 7), (0, 3, 5))))
    small = shrink_model(tiny(), keep_all)
    geoms = geometry(DecoderAdapter(small))  # uneven groups read back from the shrunk layers
    assert [g.kv_of_q for g in geoms[:1]] == [(0, 0, 1, 1, 1)] and geoms[3].kv_of_q == (0, 1, 2)
    state = StructuredState.from_counts(geoms, [1, 2, 3, 1], [3, 3, 30, 1])  # block 2 goes
    smaller = check_shrunk(small, state, torch.randint(1, VOCAB, (2, 12)))
    assert smaller.config.source_layers == [0, 1, 3] and smaller.config.layer_kv_group_sizes[0] == [2, 2]


def test_generation_with_kv_cache_matches_masked_model():
    model = tiny()
    state = StructuredState((BlockState((), tuple(range(40))),) + UNEVEN.blocks[1:])  # block 0 has no attention
    small = shrink_model(model, state)
    adapter = DecoderAdapter(model)
    for name, t in masked_weights(adapter, state).items():
        model.get_parameter(name).data = t
    x = torch.randint(1, VOCAB, (1, 7))
    with torch.no_grad():
        want = model.generate(x, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
        got = small.generate(x, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert got.sequences.tolist() == want.sequences.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch(attn):
    model = tiny()
    model.config._attn_implementation = attn
    small = shrink_model(model, UNEVEN)
    assert small.config._attn_implementation == attn
    x = torch.randint(1, VOCAB, (2, 10))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    adapter = DecoderAdapter(model)
    for name, t in masked_weights(adapter, UNEVEN).items():
        model.get_parameter(name).data = t
    with torch.no_grad():
        diff = model(x, attention_mask=mask).logits - small(x, attention_mask=mask).logits
    assert diff[0, 3:].abs().max().item() < 1e-5 and diff[1].abs().max().item() < 1e-5


def test_fully_removed_sub_blocks_equal_depth_pruning():
    model = tiny(layers=5)
    full = StructuredState.full(geometry(DecoderAdapter(model)))
    blocks = list(full.blocks)
    blocks[1] = BlockState((), blocks[1].neurons)  # attention removed
    blocks[2] = BlockState(blocks[2].heads, ())  # MLP removed
    blocks[3] = BlockState((), ())  # the whole block
    state = StructuredState(tuple(blocks))
    x = torch.randint(1, VOCAB, (2, 10))
    small = check_shrunk(model, state, x)
    assert small.config.num_hidden_layers == 4 and small.config.source_layers == [0, 1, 2, 4]
    drop = DropApplier(DecoderAdapter(model))
    with drop.applied(DropConfig([False, True, False, True, False], [False, False, True, True, False])):
        with torch.no_grad():
            dropped = model(x).logits
    with torch.no_grad():
        assert (small(x).logits - dropped).abs().max().item() < 1e-5


def test_kv_group_removal():
    model = tiny(arch="qwen2")  # with k/v biases, which go with their group
    geoms = geometry(DecoderAdapter(model))
    state = StructuredState.from_counts(geoms, [1, 2, 0, 3], [0, 5, 0, 0], head_order=[[1], [0, 2], [], [2, 1, 0]],
                                        kv_groups=True)
    assert state.blocks[0].heads == (0, 1, 2, 6, 7, 8) and state.blocks[1].heads == (3, 4, 5)
    small = check_shrunk(model, state, torch.randint(1, VOCAB, (2, 9)))
    assert small.config.layer_kv_group_sizes == [[3, 3], [3], [3, 3, 3], []]
    g = geoms[0]
    assert removed_params(geoms, state) == (3 * g.head_params + g.kv_head_params) * 6 + 5 * g.neuron_params \
        + g.attn_fixed
    with pytest.raises(UserError, match="keeps part of KV group 0"):
        StructuredState((BlockState((0, 1), ()),) + state.blocks[1:], kv_groups=True).check(geoms)
    mha = geometry(DecoderAdapter(tiny(heads=4, kv=4, layers=1)))
    with pytest.raises(UserError, match="kv_groups: KV-group removal needs a GQA model"):
        StructuredState.full(mha, kv_groups=True).check(mha)


def test_replacement_weights_full_or_kept_width():
    model = tiny()
    adapter = DecoderAdapter(model)
    geoms = geometry(adapter)
    g, b = geoms[0], UNEVEN.blocks[0]
    cols = [h * 8 + d for h in b.heads for d in range(8)]
    full = torch.randn(72, 72)
    by_kept = masked_weights(adapter, UNEVEN, {g.attn_out: full[:, cols]}, blocks=[0])
    by_full = masked_weights(adapter, UNEVEN, {g.attn_out: full}, blocks=[0])
    w = by_full[g.attn_out + ".weight"]
    assert torch.equal(w, by_kept[g.attn_out + ".weight"]) and torch.equal(w[:, cols], full[:, cols])
    assert w.abs().sum(0).nonzero().flatten().tolist() == cols  # removed heads' columns are zero
    assert torch.equal(adapter.module(g.attn_out).weight, model.get_parameter(g.attn_out + ".weight"))  # pure
    check_shrunk(model, UNEVEN, torch.randint(1, VOCAB, (1, 8)), weights={g.attn_out: full[:, cols]})
    with pytest.raises(UserError, match="shape"):
        masked_weights(adapter, UNEVEN, {g.attn_out: full[:, :7]})


def test_state_checks_and_round_trip():
    geoms = geometry(DecoderAdapter(tiny(layers=2)))
    state = StructuredState.from_counts(geoms, [4, 0], [1, 39])
    assert state.blocks[0].heads == (0, 1, 2, 3, 4) and state.blocks[1].neurons == (0,)
    assert StructuredState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    with pytest.raises(UserError, match="block 1 neurons removed must be an integer in \\[0, 40\\]"):
        StructuredState.from_counts(geoms, [0, 0], [0, 41])
    with pytest.raises(UserError, match="block 0 heads must be sorted distinct"):
        StructuredState((BlockState((2, 1), ()), state.blocks[1])).check(geoms)
    with pytest.raises(UserError, match="has 1 blocks but the model has 2"):
        StructuredState(state.blocks[:1]).check(geoms)


def test_gemma2_masks_but_does_not_shrink():
    model = tiny("gemma2", layers=2)
    geoms = geometry(DecoderAdapter(model))
    g = geoms[0]
    assert (g.num_q_heads, g.num_kv_heads, g.head_dim, g.mlp_width) == (9, 3, 8, 40)
    assert (g.attn_fixed, g.mlp_fixed) == (2 * 72, 2 * 72)  # sandwich norms: two per sub-block
    state = StructuredState((BlockState((), tuple(range(40))), BlockState(tuple(range(9)), ())))
    x = torch.randint(1, VOCAB, (1, 8))
    with DropApplier(DecoderAdapter(model)).applied(DropConfig([True, False], [False, True])):
        with torch.no_grad():
            dropped = model(x).logits
    assert (masked_logits(model, state, x) - dropped).abs().max().item() < 1e-5
    with pytest.raises(UserError, match="does not support architecture 'gemma2'"):
        shrink_model(model, state)


def test_checkpoint_loads_with_plain_transformers_and_with_evoexp(tmp_path):
    from evoexp.config import ModelCfg
    from evoexp.models import load_model
    from evoexp.models.tiny import byte_tokenizer

    model = tiny(layers=4, tie=True)  # as the embedded model: the head is the embedding
    x = torch.randint(3, VOCAB, (2, 11))
    want = masked_logits(model, UNEVEN, x)
    out = save_shrunk(model, UNEVEN, tmp_path / "ckpt", tokenizer=byte_tokenizer())
    config = json.loads((out / "config.json").read_text())
    # readable as its config is (safetensors writes 0600 whatever the umask, safetensors/safetensors#782)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    assert config["model_type"] == MODEL_TYPE == EvoexpHeteroConfig.model_type and "auto_map" in config
    meta = json.loads((out / META_FILE).read_text())
    assert meta["dense_params"] - meta["params"] == meta["removed_params"]
    torch.save(x, tmp_path / "x.pt")
    plain = (f"import torch\nfrom transformers import AutoModelForCausalLM\n"
             f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
             f"assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
             f"with torch.no_grad(): torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).logits, "
             f"{str(tmp_path / 'y.pt')!r})\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (torch.load(tmp_path / "y.pt") - want).abs().max().item() < 1e-5
    with torch.no_grad():
        assert (load_shrunk(out, dtype=torch.float32)(x).logits - want).abs().max().item() < 1e-5
    loaded = load_model(ModelCfg(name="shrunk", source="hf", path=str(out)), torch.device("cpu"), torch.float32)
    assert loaded.adapter.tied_embeddings and loaded.num_params == meta["params"]
    assert type(loaded.model).__module__ == "evoexp.models.hetero.modeling_evoexp_hetero"  # not the dir's copy
    with torch.no_grad():
        hidden = loaded.adapter.hidden_states(x)
        assert (loaded.adapter.logits(hidden) - want).abs().max().item() < 1e-5


def test_load_shrunk_refuses_other_checkpoints(tmp_path):
    tiny(layers=1).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a shrunk structured checkpoint"):
        load_shrunk(tmp_path)


def test_evoexp_runs_a_shrunk_checkpoint(tmp_path):
    from evoexp.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    out = save_shrunk(tiny(vocab=len(tok)), UNEVEN, tmp_path / "ckpt", tokenizer=tok)
    proc = run_cli(f"model={out}", "model.seq_len=256", "eval.seq_len=256", "method=dense", "search=none",
                   "eval.windows=2", "logger=none", env={"EVOEXP_OUT": str(tmp_path / "runs"),
                                                         "EVOEXP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wikitext2:test PPL: float32" in proc.stdout


@pytest.mark.embedded
def test_embedded_geometry_and_uneven_shrink(embedded):
    geoms = geometry(embedded.adapter)
    assert len(geoms) == 30
    assert {(g.num_q_heads, g.num_kv_heads, g.head_dim, g.mlp_width) for g in geoms} == {(9, 3, 64, 1536)}
    blocks = list(StructuredState.full(geoms).blocks)
    blocks[4] = BlockState((0, 1, 3, 4, 5), tuple(range(0, 1536, 2)))  # 2 heads kept in one KV group, 3 in another
    blocks[7] = BlockState((), blocks[7].neurons)
    blocks[9] = BlockState(blocks[9].heads, ())
    state = StructuredState(tuple(blocks))
    x = torch.randint(0, embedded.model.config.vocab_size, (1, 64), device=embedded.model.device)
    # fp32 rounding through 30 blocks: the two differ by ~1e-4 here (logits up to ~33); in fp64 the masked and
    # shrunk embedded model at 50 % gave equal logits to the last bit (checked by hand).
    check_shrunk(embedded.model, state, x, atol=1e-3)
