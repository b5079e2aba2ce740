"""Physically shrunk structured models: each layer keeps only its own query heads, K/V heads and MLP neurons.

`shrink_model(model, state)` builds the smaller model in memory as an `EvoexpHeteroForCausalLM`
(`evoexp/models/hetero/`): query heads are stored grouped by the KV head they read, a layer keeps the K/V heads
some kept query head reads, a sub-block with nothing left is skipped with its norm, and a block with neither
sub-block left is removed (as depth pruning's export does). `save_shrunk` writes it as a Hugging Face checkpoint
with the two modeling files beside config.json (`auto_map`), so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads it with transformers alone; evoexp (`load_shrunk`, or `evoexp model=<dir>`)
loads it with its own installed copy of those files and runs nothing from the directory.

Supported sources: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Phi-3 (fused qkv_proj and
gate_up_proj are stored split) with full rotary embeddings. Gemma's scaled embeddings, sandwich norms and
soft-capping are not in the shrunk format: structured Gemma models stay masked.

The shrunk model's classes (and with them transformers' Llama modeling, seconds to import on 2 cores) are
imported when a model is shrunk or loaded, not with this module: every `evoexp` start imports it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.heads import BlockGeometry, BlockState, StructuredState, geometry, masked_weights, removed_params
from evoexp.models.hetero import AUTO_MAP, FILES, MODEL_TYPE, configuration, modeling, register
from evoexp.sharing import umask_permissions

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", MODEL_TYPE)  # a shrunk model can shrink further
META_FILE = "evoexp_structured.json"
# Source config keys the shrunk config carries over unchanged (when the source has them).
COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
          "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
          "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "sliding_window")


def check_shrinkable(model: nn.Module) -> None:
    arch = getattr(model.config, "model_type", type(model).__name__)
    if arch not in SUPPORTED:
        raise UserError(f"model: the shrunk structured export does not support architecture {arch!r} "
                        f"(supported: {', '.join(SUPPORTED)}); keep it masked")
    rope = getattr(model.config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"model: the shrunk structured export needs full rotary embeddings, {arch!r} has "
                        f"partial_rotary_factor={rope['partial_rotary_factor']}")


def head_order(g: BlockGeometry, b: BlockState) -> list[int]:
    """Kept query heads grouped by KV head (the shrunk layout), each group in index order."""
    return sorted(b.heads, key=lambda h: (g.kv_of_q[h], h))


def shrunk_config(model: nn.Module, geoms: list[BlockGeometry], state: StructuredState):
    src = model.config
    keep = [i for i, b in enumerate(state.blocks) if b.heads or b.neurons]
    if not keep:
        raise UserError("structured state removes every head and every neuron of every block; one must stay")
    types = getattr(src, "layer_types", None)
    if types is None:  # Mistral / Phi-3: one sliding window for every layer, when set
        types = ["sliding_attention" if getattr(src, "sliding_window", None) else "full_attention"] * len(geoms)
    sizes = []
    for i in keep:
        g, b = geoms[i], state.blocks[i]
        heads = [g.kv_of_q[h] for h in head_order(g, b)]
        sizes.append([heads.count(kv) for kv in b.kept_kv(g)])
    g0 = geoms[0]
    kwargs = {k: getattr(src, k) for k in COPIED if hasattr(src, k)}
    cfg = configuration()
    return cfg.EvoexpHeteroConfig(
        **kwargs, num_hidden_layers=len(keep), head_dim=g0.head_dim, layer_types=[types[i] for i in keep],
        layer_kv_group_sizes=sizes, layer_intermediate_sizes=[len(state.blocks[i].neurons) for i in keep],
        attention_in_bias=g0.qkv_bias, attention_out_bias=g0.o_bias, mlp_in_bias=g0.mlp_in_bias,
        mlp_out_bias=g0.mlp_out_bias, qk_norm=hasattr(model.get_submodule(g0.attn_out.rsplit(".", 1)[0]), "q_norm"),
        source_model_type=getattr(src, "source_model_type", src.model_type),
        source_layers=[getattr(src, "source_layers", range(len(geoms)))[i] for i in keep],
        evoexp_format=cfg.FORMAT_VERSION, use_cache=True)


def _rows(heads: list[int], width: int) -> torch.Tensor:
    return torch.tensor([h * width + d for h in heads for d in range(width)], dtype=torch.long)


def _split_in(adapter: DecoderAdapter, g: BlockGeometry) -> dict[str, nn.Linear | tuple]:
    """q/k/v and gate/up as (weight, bias) pairs, fused Phi-3 linears split by rows."""
    out = {}
    if g.fused_qkv:
        lin = adapter.module(g.attn_in[0])
        q, kv = g.num_q_heads * g.head_dim, g.num_kv_heads * g.head_dim
        for name, sl in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
            out[name] = (lin.weight[sl], None if lin.bias is None else lin.bias[sl])
    else:
        for name in g.attn_in:
            lin = adapter.module(name)
            out[name.rsplit(".", 1)[1]] = (lin.weight, lin.bias)
    if g.fused_gate_up:
        lin, w = adapter.module(g.mlp_in[0]), g.mlp_width
        for name, sl in (("gate_proj", slice(0, w)), ("up_proj", slice(w, 2 * w))):
            out[name] = (lin.weight[sl], None if lin.bias is None else lin.bias[sl])
    else:
        for name in g.mlp_in:
            lin = adapter.module(name)
            out[name.rsplit(".", 1)[1]] = (lin.weight, lin.bias)
    return out


def _put(sd: dict, prefix: str, pair: tuple, index: torch.Tensor, dim: int = 0) -> None:
    weight, bias = pair
    sd[prefix + ".weight"] = weight.detach().index_select(dim, index.to(weight.device)).clone()
    if bias is not None:
        sd[prefix + ".bias"] = bias.detach().index_select(0, index.to(bias.device)).clone() if dim == 0 else \
            bias.detach().clone()


def _layer_tensors(adapter: DecoderAdapter, g: BlockGeometry, b: BlockState, masked: dict, prefix: str) -> dict:
    sd, block = {}, adapter.blocks[g.block]
    parts = _split_in(adapter, g)
    if b.heads:
        order = head_order(g, b)
        q_rows = _rows(order, g.head_dim)
        kv_rows = _rows(list(b.kept_kv(g)), g.head_dim)
        attn = f"{prefix}.self_attn"
        _put(sd, f"{attn}.q_proj", parts["q_proj"], q_rows)
        _put(sd, f"{attn}.k_proj", parts["k_proj"], kv_rows)
        _put(sd, f"{attn}.v_proj", parts["v_proj"], kv_rows)
        _put(sd, f"{attn}.o_proj", (masked[g.attn_out + ".weight"], masked.get(g.attn_out + ".bias")), q_rows, dim=1)
        for norm in ("q_norm", "k_norm"):
            if hasattr(block.self_attn, norm):
                sd[f"{attn}.{norm}.weight"] = getattr(block.self_attn, norm).weight.detach().clone()
        sd[f"{prefix}.input_layernorm.weight"] = block.input_layernorm.weight.detach().clone()
    if b.neurons:
        cols = torch.tensor(b.neurons, dtype=torch.long)
        mlp = f"{prefix}.mlp"
        _put(sd, f"{mlp}.gate_proj", parts["gate_proj"], cols)
        _put(sd, f"{mlp}.up_proj", parts["up_proj"], cols)
        _put(sd, f"{mlp}.down_proj", (masked[g.mlp_out + ".weight"], masked.get(g.mlp_out + ".bias")), cols, dim=1)
        sd[f"{prefix}.post_attention_layernorm.weight"] = block.post_attention_layernorm.weight.detach().clone()
    return sd


def shrunk_state_dict(adapter: DecoderAdapter, geoms: list[BlockGeometry], state: StructuredState,
                      weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The shrunk model's tensors (fresh copies), by its parameter names."""
    masked = masked_weights(adapter, state, weights, geoms=geoms)
    sd = {"model.embed_tokens.weight": adapter.embed.weight.detach().clone(),
          "model.norm.weight": adapter.final_norm.weight.detach().clone()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if adapter.tied_embeddings else \
        adapter.lm_head.weight.detach().clone()
    keep = [i for i, b in enumerate(state.blocks) if b.heads or b.neurons]
    for new, i in enumerate(keep):
        sd.update(_layer_tensors(adapter, geoms[i], state.blocks[i], masked, f"model.layers.{new}"))
    return sd


def shrink_model(model: nn.Module, state: StructuredState,
                 weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A new, physically smaller model computing what `model` with `masked_weights(state, weights)` computes.

    `model` is not changed; the new one has its own copies of the kept tensors, in the same dtype and device.
    """
    check_shrinkable(model)
    adapter = DecoderAdapter(model)
    geoms = geometry(adapter)
    state.check(geoms)
    config = shrunk_config(model, geoms, state)
    config._attn_implementation = model.config._attn_implementation
    sd = shrunk_state_dict(adapter, geoms, state, weights)
    with torch.device("meta"):  # no initialisation of weights that are replaced at once
        out = modeling().EvoexpHeteroForCausalLM(config)
    out.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    device = adapter.embed.weight.device
    out.model.rotary_emb = modeling().LlamaRotaryEmbedding(config=config).to(device)  # its buffers were made on meta
    if getattr(model, "generation_config", None) is not None:
        out.generation_config = model.generation_config
    return out.eval()


def save_shrunk(model: nn.Module, state: StructuredState, out_dir: str | Path, tokenizer=None,
                weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the shrunk model as a Hugging Face checkpoint (modeling files included) plus `evoexp_structured.json`
    (the state, the source's block of each layer and the parameter counts)."""
    out = shrink_model(model, state, weights)
    out.config.auto_map = dict(AUTO_MAP)
    out_dir = Path(out_dir)
    out.save_pretrained(out_dir)
    umask_permissions(out_dir)
    for f in FILES:
        shutil.copyfile(f, out_dir / f.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    geoms = geometry(DecoderAdapter(model))
    meta = {"format": out.config.evoexp_format, "source_model_type": model.config.model_type,
            "source_layers": out.config.source_layers, "state": state.to_dict(),
            "dense_params": sum(p.numel() for p in model.parameters()),
            "removed_params": removed_params(geoms, state),
            "params": sum(p.numel() for p in out.parameters())}
    (out_dir / META_FILE).write_text(json.dumps(meta) + "\n")
    return out_dir


def load_shrunk(path: str | Path, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a `save_shrunk` checkpoint with evoexp's own modeling code (nothing from `path` runs). Extra keyword
    arguments go to `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM

    config = Path(path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type != MODEL_TYPE:
        raise UserError(f"{path}: not a shrunk structured checkpoint (config.json model_type {model_type!r})")
    register()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
