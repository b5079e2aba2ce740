"""Method schemas (`method=`): one dataclass per compression method, each a subclass of `MethodCfg`.

Every `MethodCfg` subclass is registered as `schema/method/<kind>` (see `evoexp.config.register_configs`), so a
new method's config is its dataclass here plus its YAML file in conf/method/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


class MethodCfg:
    """Base of the method schemas. Each subclass has a `kind` field, which names the recipe that runs it
    (`evoexp/recipes/registry.py`) and its schema `schema/method/<kind>`."""


@dataclass
class DenseMethodCfg(MethodCfg):
    """No compression: the run evaluates the model as loaded."""

    kind: str = "dense"


@dataclass
class DropMethodCfg(MethodCfg):
    """Depth pruning: drop int(target * n) attention and as many MLP sub-blocks (or whole blocks / pairs)."""

    kind: str = "drop"
    target: float = 0.25
    unit: str = "sub_block"  # sub_block | block | pair
    droppable: Optional[List[int]] = None  # whitelist of block indices; null = every block
    export: bool = False  # write the pruned model as a Hugging Face checkpoint into the run dir


@dataclass
class SparseMethodCfg(MethodCfg):
    """Unstructured (or N:M) sparsity per linear layer, from the per-level database."""

    kind: str = "sparse"
    target: float = 0.5  # mean sparsity over all block linears (fraction of weights set to zero)
    nm: Optional[List[int]] = None  # [n, m]: prune n of every m consecutive weights per row (fixes sparsity n/m)
    # Searches: level l of a layer prunes round(target * N) + l * step weights, l in [-num_levels, num_levels].
    step: Optional[int] = None  # weights per level; null: EvoPress's 0.5 * min(s, 1 - s) / num_levels * hidden^2
    num_levels: int = 8
    export: bool = False


@dataclass
class QuantMethodCfg(MethodCfg):
    """Weight-only quantization per linear layer (bit-width per layer), from the per-level database."""

    kind: str = "quant"
    target: float = 4  # mean bits per weight over all block linears
    levels: List[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])  # bit-widths a layer may take
    # Searches: size (switch bits between layers of equal size), name (same projection type), none (any
    # layers, with moves that trade exactly equal bit counts).
    group_rule: str = "size"
    tied: bool = False  # q/k/v and gate/up share one bit-width (serving engines fuse them)
    export: bool = False


@dataclass
class StructuredMethodCfg(MethodCfg):
    """Structured pruning: whole attention heads and MLP neurons per block (ZipLM / DarwinLM), from the per-level
    database of every block's o_proj and down_proj."""

    kind: str = "structured"
    target: float = 0.3  # fraction of the decoder blocks' parameters removed (embeddings and the head excluded)
    # group: attention and MLP each remove the target fraction of their own parameters (DarwinLM's default);
    # params: the same total in one pooled budget, which searches may shift between attention and MLP
    budget: str = "group"
    attn_step: int = 1  # query heads per attention level (KV groups with kv_groups=true); must divide the count
    mlp_step: Optional[int] = None  # neurons per MLP level (must divide the width); null: width / mlp_levels
    mlp_levels: int = 16  # the MLP width in this many equal steps, when mlp_step is null
    kv_groups: bool = False  # the attention unit is a whole KV group (its query heads and K/V head): GQA models
    export: bool = False

