"""The architecture adapter on the tiny model, the embedded model and tiny random copies of other families."""
import pytest
import torch
import transformers

from evoexp.models import DecoderAdapter

SHORT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 3.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
}


def family_model(name):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**COMMON, **extra)
    return getattr(transformers, model_cls)(config).eval()


def test_tiny_structure(tiny):
    ad = tiny.adapter
    assert ad.num_blocks == 8
    assert [li.short for li in ad.linears(0)] == SHORT
    assert ad.linears(3)[0].name == "model.layers.3.self_attn.q_proj"
    assert len(ad.linears()) == 8 * 7
    assert [[li.short for li in g] for g in ad.input_groups(0)] == [SHORT[:3], ["o_proj"], SHORT[4:6], ["down_proj"]]
    fused = ad.fused_groups(0)
    assert {k: [li.short for li in v] for k, v in fused.items()} == {"qkv": SHORT[:3], "gate_up": SHORT[4:6]}
    assert not ad.is_fused("qkv")


@pytest.mark.embedded
def test_embedded_structure(embedded):
    ad = embedded.adapter
    assert ad.arch == "llama" and ad.num_blocks == 30
    assert len(ad.linears()) == 30 * 7
    shapes = {li.short: (li.out_features, li.in_features) for li in ad.linears(0)}
    assert shapes == {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                      "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    assert ad.tied_embeddings and ad.embed.weight.shape == (49152, 576)
    assert sum(li.numel for li in ad.linears()) == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert [len(g) for g in ad.input_groups(29)] == [3, 1, 2, 1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families(family):
    model = family_model(family)
    ad = DecoderAdapter(model)
    assert ad.num_blocks == 3
    shorts = [li.short for li in ad.linears(1)]
    if family == "phi3":
        assert shorts == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        assert ad.is_fused("qkv") and ad.is_fused("gate_up")
        assert {k: len(v) for k, v in ad.fused_groups(1).items()} == {"qkv": 1, "gate_up": 1}
    else:
        assert shorts == SHORT
        assert {k: len(v) for k, v in ad.fused_groups(1).items()} == {"qkv": 3, "gate_up": 2}
    assert all(li.name.startswith("model.layers.1.") for li in ad.linears(1))
    assert ad.attn(2) is model.model.layers[2].self_attn and ad.mlp(2) is model.model.layers[2].mlp
    assert ad.final_norm is model.model.norm and ad.lm_head is model.lm_head

    # Hidden states + head reproduce the model's own logits (Gemma-2 soft-capping included).
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        ours = ad.logits(ad.hidden_states(ids))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_input_groups_share_inputs(family):
    """Members of an input group really read the same tensor (so they can share one Hessian)."""
    model = family_model(family)
    ad = DecoderAdapter(model)
    seen = {}
    hooks = [ad.module(li.name).register_forward_hook(lambda m, a, o, n=li.name: seen.__setitem__(n, a[0]))
             for li in ad.linears(0)]
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 10)))
    for h in hooks:
        h.remove()
    groups = ad.input_groups(0)
    for group in groups:
        for li in group[1:]:
            torch.testing.assert_close(seen[li.name], seen[group[0].name], rtol=0, atol=0)
    firsts = [seen[g[0].name] for g in groups]
    assert not torch.equal(firsts[0], firsts[2])
