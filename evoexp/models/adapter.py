"""Architecture adapter: one view of HF decoder-only models (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1-3).

Compression code asks the adapter for blocks, sub-blocks and linear layers instead of hard-coding module paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evoexp.errors import UserError

# Linear roles by short name. Linears in one role read the same input, so they share one Hessian and can be
# fused by serving engines (vLLM fuses q/k/v and gate/up); Phi-3 ships them already fused.
ATTN_IN = ("q_proj", "k_proj", "v_proj", "qkv_proj")
ATTN_OUT = ("o_proj",)
MLP_IN = ("gate_proj", "up_proj", "gate_up_proj")
MLP_OUT = ("down_proj",)
ROLES = {"attn_in": ATTN_IN, "attn_out": ATTN_OUT, "mlp_in": MLP_IN, "mlp_out": MLP_OUT}
FUSED_NAMES = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
ALREADY_FUSED = {"qkv_proj": "qkv", "gate_up_proj": "gate_up"}
# The name the cache is passed under has changed across transformers releases (5.24 renamed it `cache`).
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


@dataclass(frozen=True)
class LinearInfo:
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int
    short: str  # "q_proj"
    role: str  # attn_in | attn_out | mlp_in | mlp_out
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


class DecoderAdapter:
    """Blocks, sub-blocks, prunable linears, embeddings, final norm and head of a causal decoder."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.arch = getattr(model.config, "model_type", type(model).__name__)
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UserError(f"model: unsupported architecture {self.arch!r} (expected model.model.layers)")
        self.body = body
        self.blocks: nn.ModuleList = layers
        for i, block in enumerate(layers):
            if not hasattr(block, "self_attn") or not hasattr(block, "mlp"):
                raise UserError(f"model: block {i} of {self.arch!r} has no self_attn/mlp sub-modules")
        self._linears = self._find_linears()

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def embed(self) -> nn.Module:
        return self.body.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.body.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    def attn(self, i: int) -> nn.Module:
        return self.blocks[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.blocks[i].mlp

    def block_prefix(self, i: int) -> str:
        return self._prefixes[i]

    def _find_linears(self) -> list[LinearInfo]:
        infos = []
        role_order = list(ROLES)
        names = {id(mod): name for name, mod in self.model.named_modules()}
        self._prefixes = [names[id(block)] for block in self.blocks]
        for b, block in enumerate(self.blocks):
            found = []
            prefix = self._prefixes[b]
            for sub, mod in block.named_modules():
                if not isinstance(mod, nn.Linear):
                    continue
                short = sub.rsplit(".", 1)[-1]
                role = next((r for r, names in ROLES.items() if short in names), None)
                if role is None:
                    raise UserError(f"model: unknown linear {prefix}.{sub} in {self.arch!r}")
                found.append(LinearInfo(f"{prefix}.{sub}", b, short, role, mod.in_features, mod.out_features))
            # Forward order, whatever order the architecture registers its modules in (Phi-3 lists o_proj first).
            infos += sorted(found, key=lambda li: (role_order.index(li.role), ROLES[li.role].index(li.short)))
        return infos

    def linears(self, block: int | None = None) -> list[LinearInfo]:
        """Prunable linears in forward order (all blocks, or one)."""
        return [li for li in self._linears if block is None or li.block == block]

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def input_groups(self, block: int) -> list[list[LinearInfo]]:
        """Linears of a block grouped by the input they read, in forward order (q/k/v, o, gate/up, down)."""
        lin = self.linears(block)
        return [g for g in ([li for li in lin if li.role == r] for r in ROLES) if g]

    def fused_groups(self, block: int) -> dict[str, list[LinearInfo]]:
        """q/k/v and gate/up as the groups a serving engine fuses (one member each when already fused)."""
        out: dict[str, list[LinearInfo]] = {}
        for li in self.linears(block):
            for group, members in FUSED_NAMES.items():
                if li.short in members or ALREADY_FUSED.get(li.short) == group:
                    out.setdefault(group, []).append(li)
        return out

    def is_fused(self, group: str) -> bool:
        """True when the architecture itself stores `group` (qkv or gate_up) as one linear."""
        return any(ALREADY_FUSED.get(li.short) == group for li in self.linears(0))

    # --- compute ---------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states, without materialising the vocabulary-sized logits."""
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Head (plus Gemma-2 style final soft-capping) on already-normalised hidden states.

        With `rows`, only those vocabulary rows of the head are computed (top-k fitness needs no more).
        """
        if rows is None:
            out = self.lm_head(hidden)
        else:
            bias = self.lm_head.bias[rows] if self.lm_head.bias is not None else None
            out = torch.nn.functional.linear(hidden, self.lm_head.weight[rows], bias)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out
