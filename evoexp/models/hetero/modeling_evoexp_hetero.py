"""An evoexp structurally pruned decoder: Llama-family blocks, each with its own number of query heads, its own
query-head -> KV-head map (uneven GQA) and its own MLP width; a layer without heads skips attention and its input
norm, a layer without neurons skips the MLP and its norm. See configuration_evoexp_hetero.py for the layout.

Shipped inside the checkpoints evoexp writes: it needs transformers (5.x) and torch only.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_evoexp_hetero import EvoexpHeteroConfig


class EvoexpHeteroAttention(nn.Module):
    def __init__(self, config: EvoexpHeteroConfig, layer_idx: int):
        super().__init__()
        sizes = config.kv_group_sizes(layer_idx)
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_key_value_heads = sum(sizes), len(sizes)
        self.kv_of_q = tuple(kv for kv, n in enumerate(sizes) for _ in range(n))
        # Even groups: the attention kernels repeat (or natively share) K/V heads. Uneven ones: K/V are gathered
        # to one head per query head first, and the kernel sees plain multi-head attention.
        self.even = len(set(sizes)) == 1
        self.num_key_value_groups = sizes[0] if self.even else 1
        self._gather: dict[torch.device, torch.Tensor] = {}
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        layer_types = getattr(config, "layer_types", None)
        self.sliding_window = (config.sliding_window if layer_types and layer_types[layer_idx] == "sliding_attention"
                               else None)
        hidden, in_bias = config.hidden_size, config.flag("attention_in_bias")
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=in_bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=in_bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=in_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.flag("attention_out_bias"))
        if config.flag("qk_norm"):
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _per_query_head(self, states: torch.Tensor) -> torch.Tensor:
        if self.even:
            return states
        index = self._gather.get(states.device)
        if index is None:
            index = self._gather[states.device] = torch.tensor(self.kv_of_q, device=states.device)
        return states.index_select(1, index)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:  # the cache holds the kept K/V heads only: uneven GQA costs no cache memory
            k, v = cache.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(self, q, self._per_query_head(k), self._per_query_head(v), attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class EvoexpHeteroMLP(nn.Module):
    def __init__(self, config: EvoexpHeteroConfig, width: int):
        super().__init__()
        hidden, in_bias = config.hidden_size, config.flag("mlp_in_bias")
        self.gate_proj = nn.Linear(hidden, width, bias=in_bias)
        self.up_proj = nn.Linear(hidden, width, bias=in_bias)
        self.down_proj = nn.Linear(width, hidden, bias=config.flag("mlp_out_bias"))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EvoexpHeteroNoAttention(nn.Module):
    """A layer's removed attention sub-block. It is not computed; it only grows the KV cache by a 1-wide dummy
    per token, because transformers reads the number of cached tokens (the next position) from cache layer 0."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, **kwargs):
        if cache is not None:
            dummy = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(dummy, dummy, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class EvoexpHeteroNoMLP(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class EvoexpHeteroDecoderLayer(nn.Module):
    def __init__(self, config: EvoexpHeteroConfig, layer_idx: int):
        super().__init__()
        self.has_attn = bool(config.kv_group_sizes(layer_idx))
        width = config.intermediate(layer_idx)
        self.has_mlp = width > 0
        if self.has_attn:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = EvoexpHeteroAttention(config, layer_idx)
        else:
            self.self_attn = EvoexpHeteroNoAttention(layer_idx)
        if self.has_mlp:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = EvoexpHeteroMLP(config, width)
        else:
            self.mlp = EvoexpHeteroNoMLP()

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        kwargs.pop("past_key_values", None)
        if self.has_attn:
            attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, cache=cache, **kwargs)
            hidden_states = hidden_states + attn
        elif cache is not None:  # through forward: a stand-in swapped in by evoexp's depth pruning works too
            self.self_attn(hidden_states, cache=cache)
        if self.has_mlp:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class EvoexpHeteroPreTrainedModel(PreTrainedModel):
    config_class = EvoexpHeteroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EvoexpHeteroDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class EvoexpHeteroModel(EvoexpHeteroPreTrainedModel):
    def __init__(self, config: EvoexpHeteroConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(EvoexpHeteroDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask_args = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                         position_ids=position_ids)
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * len(self.layers)
        masks = {"full_attention": create_causal_mask(**mask_args) if "full_attention" in layer_types else None}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden = layer(hidden, attention_mask=masks[layer_types[i]], position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache if use_cache else None)


class EvoexpHeteroForCausalLM(EvoexpHeteroPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EvoexpHeteroConfig):
        super().__init__(config)
        self.model = EvoexpHeteroModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["EvoexpHeteroForCausalLM", "EvoexpHeteroModel", "EvoexpHeteroPreTrainedModel"]
