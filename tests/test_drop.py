"""Depth pruning mechanics: drop configs, zero sub-blocks, the applier, materializing and exporting."""
import copy
import inspect
import json

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from evoexp.config import ModelCfg
from evoexp.errors import UserError
from evoexp.methods.drop import (DropApplier, DropConfig, ZeroAttention, ZeroMLP, trim_config, export_dropped,
                                 load_dropped, materialize)
from evoexp.models import DecoderAdapter, load_model

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # Biases on every linear (randomised below: HF initialises them to 0) so zeroing o_proj/down_proj biases counts.
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # A 4-token sliding window, so generation below runs past it on the sliding layers.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4,
                                                      "final_logit_softcapping": 3.0}),
}
# 8 blocks (tiny) / 4 blocks (families): whole-block drops (incl. block 0) mixed with partial ones.
TINY_MIX = ["attn", "attn+mlp", "none", "mlp", "none", "attn+mlp", "none", "attn"]
FAMILY_MIX = ["attn", "attn+mlp", "mlp", "none"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast, and a second one only spins when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def family_model(name):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**COMMON, **extra)).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return model


def fresh_tiny():
    return load_model(ModelCfg(name="tiny", source="tiny"), torch.device("cpu"), torch.float32)


def ids_for(vocab, shape=(2, 10), seed=1):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def capture(module):
    """Forward hook storing the module's input hidden states and output; returns (store, handle)."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    return seen, module.register_forward_hook(hook, with_kwargs=True)


# --- DropConfig ----------------------------------------------------------------------------------------------
def test_config_lines_round_trip():
    cfg = DropConfig.from_lines(TINY_MIX)
    assert cfg.num_blocks == 8 and cfg.lines() == TINY_MIX
    assert cfg.attn == [True, True, False, False, False, True, False, True]
    assert cfg.mlp == [False, True, False, True, False, True, False, False]
    assert cfg.whole_blocks() == [1, 5] and cfg.partial() == [0, 3, 7]
    assert cfg.kept_blocks() == [0, 2, 3, 4, 6, 7]
    assert cfg.without_whole_blocks().lines() == ["attn", "none", "mlp", "none", "none", "attn"]
    assert DropConfig.from_lines("\n".join(TINY_MIX) + "\n\n") == cfg  # file text with a trailing newline
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["lines"] == TINY_MIX and DropConfig.from_dict(d) == cfg
    assert DropConfig.from_dict({"lines": TINY_MIX}) == cfg
    assert DropConfig.none(3).lines() == ["none"] * 3
    assert DropConfig(list(np.array([True, False])), np.array([1, 0])).lines() == ["attn+mlp", "none"]


@pytest.mark.parametrize("make", [
    lambda: DropConfig.from_lines(["none", "attn+ffn"]),
    lambda: DropConfig.from_lines(["none", "mlp+attn"]),
    lambda: DropConfig([True, False], [False]),
    lambda: DropConfig(["yes"], [False]),
    lambda: DropConfig.from_dict({"attn": [True]}),
    lambda: DropConfig.from_dict({"attn": [True], "mlp": [False], "lines": ["mlp"]}),
])
def test_config_bad_input_raises(make):
    with pytest.raises(UserError) as err:
        make()
    assert "\n" not in str(err.value)


# --- zero sub-blocks -------------------------------------------------------------------------------------------
def test_dropped_subblocks_are_identity_on_residual(tiny):
    ad = tiny.adapter
    block = ad.blocks[3]
    ids = ids_for(259)
    seen, handle = capture(block)
    attn_seen, attn_handle = capture(block.self_attn)
    applier = DropApplier(ad)
    try:
        with applier.applied(DropConfig.from_lines(["none"] * 3 + ["attn+mlp"] + ["none"] * 4)):
            logits(tiny.model, ids)
        assert torch.equal(seen["out"], seen["in"])  # bitwise: the block passes the residual through

        with applier.applied(DropConfig.from_lines(["none"] * 3 + ["attn"] + ["none"] * 4)):
            logits(tiny.model, ids)
            with torch.no_grad():
                expected = seen["in"] + applier.mlp[3](block.post_attention_layernorm(seen["in"]))
        assert torch.equal(seen["out"], expected)

        with applier.applied(DropConfig.from_lines(["none"] * 3 + ["mlp"] + ["none"] * 4)):
            logits(tiny.model, ids)  # the original attention is back in place and hooked
        assert torch.equal(seen["out"], seen["in"] + attn_seen["out"])
    finally:
        handle.remove()
        attn_handle.remove()


def test_gemma2_zero_attention_survives_post_attention_norm():
    model = family_model("gemma2")
    block = model.model.layers[1]
    with torch.no_grad():  # non-trivial norm weights: Gemma's RMSNorm scales by (1 + w)
        block.post_attention_layernorm.weight.normal_()
    seen, handle = capture(block)
    applier = DropApplier(DecoderAdapter(model))
    ids = ids_for(96)
    try:
        with applier.applied(DropConfig.from_lines(["none", "attn", "none", "none"])):
            logits(model, ids)
            with torch.no_grad():
                h = seen["in"]
                expected = h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))
        assert torch.equal(seen["out"], expected)
        with applier.applied(DropConfig.from_lines(["none", "attn+mlp", "none", "none"])):
            logits(model, ids)
        assert torch.equal(seen["out"], seen["in"])
    finally:
        handle.remove()


# --- DropApplier -----------------------------------------------------------------------------------------------
def test_applier_restores_exact_original(tiny):
    ad = tiny.adapter
    ids = ids_for(259)
    ref = logits(tiny.model, ids)
    originals = [(b.self_attn, b.mlp) for b in ad.blocks]
    applier = DropApplier(ad)
    one = DropConfig.from_lines(TINY_MIX)
    two = DropConfig.from_lines(["mlp", "none", "attn+mlp", "attn", "none", "none", "mlp", "none"])
    try:
        applier.apply(one)
        assert isinstance(ad.blocks[0].self_attn, ZeroAttention) and ad.blocks[0].mlp is originals[0][1]
        assert isinstance(ad.blocks[1].mlp, ZeroMLP) and ad.blocks[0].self_attn.layer_idx == 0
        dropped_one = logits(tiny.model, ids)
        assert not torch.allclose(dropped_one, ref)
        applier.apply(two)  # switching candidates directly must put back what `one` dropped
        dropped_two = logits(tiny.model, ids)
        applier.apply(one)
        assert torch.equal(logits(tiny.model, ids), dropped_one)
        applier.restore()
        assert torch.equal(logits(tiny.model, ids), ref)
        assert [(b.self_attn, b.mlp) for b in ad.blocks] == originals
        with applier.applied(two):
            assert torch.equal(logits(tiny.model, ids), dropped_two)
        assert torch.equal(logits(tiny.model, ids), ref)
        with pytest.raises(UserError):
            applier.apply(DropConfig.none(7))
    finally:
        applier.restore()


# --- materialize -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", *FAMILIES])
def test_materialize_matches_applier(family):
    target = fresh_tiny() if family == "tiny" else family_model(family)
    model = target.model if family == "tiny" else target
    cfg = DropConfig.from_lines(TINY_MIX if family == "tiny" else FAMILY_MIX)
    ids = ids_for(model.config.vocab_size)
    with DropApplier(DecoderAdapter(model)).applied(cfg):
        expected = logits(model, ids)
    layer_types = getattr(model.config, "layer_types", None)

    assert materialize(target, cfg) is target
    kept = cfg.kept_blocks()
    assert len(model.model.layers) == model.config.num_hidden_layers == len(kept)
    assert [b.self_attn.layer_idx for b in model.model.layers] == list(range(len(kept)))
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in kept]
    assert torch.equal(logits(model, ids), expected)
    if family == "tiny":  # the LoadedModel's adapter describes the smaller model
        assert target.adapter.num_blocks == len(kept) and target.adapter.blocks is model.model.layers
        assert target.adapter.linears(1)[0].name == "model.layers.1.self_attn.q_proj"
    with pytest.raises(UserError):
        materialize(target, cfg)  # the config no longer matches the (smaller) model


def test_materialize_refuses_applied_model_and_dropping_everything(tiny):
    with pytest.raises(UserError, match="every block"):
        materialize(copy.deepcopy(tiny.model), DropConfig.from_lines(["attn+mlp"] * 8))
    applier = DropApplier(tiny.adapter)
    with applier.applied(DropConfig.from_lines(TINY_MIX)), pytest.raises(UserError, match="already"):
        materialize(tiny, DropConfig.none(8))


def test_trim_heterogeneous_per_layer_config():
    config = transformers.LlamaConfig(**COMMON, per_layer_config={1: {"intermediate_size": 256},
                                                                   3: {"intermediate_size": 32}})
    trim_config(config, [0, 1, 3])
    assert config.num_hidden_layers == 3
    assert config.to_dict()["per_layer_config"] == {"1": {"intermediate_size": 256}, "2": {"intermediate_size": 32}}


# --- generation with a KV cache --------------------------------------------------------------------------------
GEN_CONFIGS = {
    "attn0": ["attn"] + ["none"] * 7,
    "block0": ["attn+mlp"] + ["none"] * 7,
    "mix": TINY_MIX,
}


def greedy(model, ids, mask, use_cache):
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


def padded_prompt(vocab):
    """Two prompts, the second left-padded: its mask is what breaks when the cache miscounts tokens."""
    ids = ids_for(vocab, (2, 10), seed=3)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


@pytest.mark.parametrize("how", ["applier", "materialize"])
@pytest.mark.parametrize("name", list(GEN_CONFIGS))
def test_generate_with_cache_matches_without(name, how):
    lm = fresh_tiny()
    cfg = DropConfig.from_lines(GEN_CONFIGS[name])
    ids, mask = padded_prompt(259)
    applier = DropApplier(lm.adapter)
    if how == "applier":
        applier.apply(cfg)
    else:
        materialize(lm, cfg)
    with torch.no_grad():
        cached, uncached = greedy(lm.model, ids, mask, True), greedy(lm.model, ids, mask, False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)


def test_generate_gemma2_sliding_window_after_drop():
    model = family_model("gemma2")
    materialize(model, DropConfig.from_lines(["attn", "attn+mlp", "none", "mlp"]))
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    ids, mask = padded_prompt(96)
    with torch.no_grad():
        assert torch.equal(greedy(model, ids, mask, True), greedy(model, ids, mask, False))


def test_incremental_decoding_counts_tokens_when_block0_attention_dropped(tiny):
    """Without generate's explicit position ids the model reads positions from cache layer 0."""
    ids = ids_for(259, (2, 12))
    with DropApplier(tiny.adapter).applied(DropConfig.from_lines(GEN_CONFIGS["attn0"])), torch.no_grad():
        full = tiny.model(ids).logits
        cache = DynamicCache(config=tiny.model.config)
        # transformers 5.24 renamed `past_key_values` to `cache`; pass whichever this version takes.
        name = "cache" if "cache" in inspect.signature(tiny.model.forward).parameters else "past_key_values"
        steps = [tiny.model(ids[:, :8], **{name: cache}, use_cache=True).logits]
        for t in range(8, 12):
            steps.append(tiny.model(ids[:, t:t + 1], **{name: cache}, use_cache=True).logits)
    assert cache.get_seq_length() == 12
    assert cache.layers[0].keys.shape == (2, 1, 12, 1)  # the dummy slot costs one number per token
    assert cache.layers[1].keys.shape == (2, 2, 12, 16)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


# --- export ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", *FAMILIES])
def test_export_round_trip(family, tmp_path):
    lm = fresh_tiny() if family == "tiny" else None
    model = lm.model if lm else family_model(family)
    lines = TINY_MIX if family == "tiny" else FAMILY_MIX
    cfg = DropConfig.from_lines(lines)
    ids = ids_for(model.config.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = model.config.num_hidden_layers
    with DropApplier(DecoderAdapter(model)).applied(cfg):
        expected = logits(model, ids)

    out = export_dropped(lm if lm else model, lm.tokenizer if lm else None, cfg, tmp_path / "ckpt")
    # The caller's model is untouched: same weights, same blocks, same config.
    assert model.config.num_hidden_layers == len(model.model.layers) == n_layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (ZeroAttention, ZeroMLP)) for m in model.modules())

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(cfg.kept_blocks()) < n_layers
    assert (out / "model.safetensors").is_file()
    meta = json.loads((out / "evoexp_drop.json").read_text())
    assert meta["drop"]["lines"] == lines and meta["original_num_hidden_layers"] == n_layers
    assert meta["kept_blocks"] == cfg.kept_blocks()

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)
    # The zeroed output projections are really in the file (the first kept block had its attention dropped).
    o_proj = plain.model.layers[0].self_attn.o_proj
    assert not o_proj.weight.any() and (o_proj.bias is None or not o_proj.bias.any())

    fast = load_dropped(out, dtype=torch.float32).eval()
    kept_cfg = cfg.without_whole_blocks()
    assert [isinstance(b.self_attn, ZeroAttention) for b in fast.model.layers] == kept_cfg.attn
    assert [isinstance(b.mlp, ZeroMLP) for b in fast.model.layers] == kept_cfg.mlp
    torch.testing.assert_close(logits(fast, ids), expected, rtol=0, atol=1e-5)
    if lm:
        tok = AutoTokenizer.from_pretrained(out)
        assert tok("héllo")["input_ids"] == lm.tokenizer("héllo")["input_ids"]


def test_export_refuses_applied_model(tiny, tmp_path):
    with DropApplier(tiny.adapter).applied(DropConfig.from_lines(TINY_MIX)), pytest.raises(UserError):
        export_dropped(tiny, None, DropConfig.from_lines(TINY_MIX), tmp_path)
    with pytest.raises(UserError, match="evoexp_drop.json"):
        load_dropped(tmp_path)
