"""Structured units of a decoder: query heads, KV groups and MLP neurons, per block.

`geometry(adapter)` reads each block's head geometry and MLP width from its modules (Llama, Mistral, Qwen2/3,
Phi-3 with fused qkv_proj / gate_up_proj, Gemma 1-3 with an explicit head_dim). A `StructuredState` says which
query heads and MLP neurons each block keeps. Removing a query head removes its q rows and o_proj input columns;
its K/V head stays while any query head of its group is kept (as in DarwinLM), and goes with the last one. With
`kv_groups=True` the unit is a whole KV group: a KV head and all its query heads are kept or removed together.
Removing every head (every neuron) of a block removes that sub-block, input norm included: the same model as
depth pruning's dropped sub-block.

`masked_weights` is the in-memory form: the o_proj / down_proj weights with removed input columns zeroed (and
their biases zeroed where a whole sub-block goes), so the unshrunk model computes exactly the shrunk one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter


@dataclass(frozen=True)
class BlockGeometry:
    block: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    kv_of_q: tuple[int, ...]  # the KV head each query head reads
    mlp_width: int
    fused_qkv: bool  # Phi-3: one qkv_proj, rows [q heads | k heads | v heads]
    fused_gate_up: bool  # Phi-3: one gate_up_proj, rows [gate | up]
    attn_in: tuple[str, ...]  # full linear names: (q, k, v) or (qkv,)
    attn_out: str
    mlp_in: tuple[str, ...]  # (gate, up) or (gate_up,)
    mlp_out: str
    qkv_bias: bool
    o_bias: bool
    mlp_in_bias: bool
    mlp_out_bias: bool
    attn_fixed: int  # parameters that go only with the whole attention sub-block: its norms, q/k norms, o bias
    mlp_fixed: int  # ... only with the whole MLP sub-block: its norms, down bias

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_q_heads

    def heads_of_kv(self, kv: int) -> tuple[int, ...]:
        return tuple(h for h, g in enumerate(self.kv_of_q) if g == kv)

    @property
    def head_params(self) -> int:
        """One query head: its q rows (and q bias) and its o_proj input columns."""
        return self.head_dim * (2 * self.hidden + self.qkv_bias)

    @property
    def kv_head_params(self) -> int:
        """One K/V head: its k and v rows (and biases)."""
        return 2 * self.head_dim * (self.hidden + self.qkv_bias)

    @property
    def neuron_params(self) -> int:
        """One MLP neuron: its gate and up rows (and biases) and its down_proj input column."""
        return 3 * self.hidden + 2 * self.mlp_in_bias


def _norm_params(block: nn.Module) -> tuple[int, int]:
    """(attention, MLP) norm parameters of a block. Gemma 2/3 wrap each sub-block in two norms (the one named
    post_attention_layernorm is then the attention's output norm); Llama-style blocks have one input norm each."""
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in block.named_children()
             if n.endswith("layernorm")}
    if "pre_feedforward_layernorm" in sizes:
        attn = sizes.get("input_layernorm", 0) + sizes.get("post_attention_layernorm", 0)
        return attn, sizes["pre_feedforward_layernorm"] + sizes.get("post_feedforward_layernorm", 0)
    return sizes.get("input_layernorm", 0), sizes.get("post_attention_layernorm", 0)


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def block_geometry(adapter: DecoderAdapter, i: int) -> BlockGeometry:
    cfg, attn, mlp = adapter.config, adapter.attn(i), adapter.mlp(i)
    if not hasattr(attn, "o_proj") or not hasattr(mlp, "down_proj"):
        raise UserError(f"model: block {i} has a removed attention or MLP sub-block (structure unknown)")
    by_short = {li.short: li.name for li in adapter.linears(i)}
    fused_qkv, fused_gu = "qkv_proj" in by_short, "gate_up_proj" in by_short
    hidden = cfg.hidden_size
    n_q0 = getattr(cfg, "num_attention_heads")
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or hidden // n_q0
    if fused_qkv:
        n_q, n_kv = n_q0, getattr(cfg, "num_key_value_heads", None) or n_q0
        if (n_q + 2 * n_kv) * head_dim != attn.qkv_proj.out_features:
            raise UserError(f"model: block {i} qkv_proj has {attn.qkv_proj.out_features} rows, not "
                            f"({n_q} + 2*{n_kv}) heads x {head_dim}")
    else:
        n_q, n_kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    kv_of_q = getattr(attn, "kv_of_q", None)  # an evoexp shrunk layer says it (uneven GQA)
    if kv_of_q is None:
        if n_q % n_kv:
            raise UserError(f"model: block {i} has {n_q} query heads, not a multiple of its {n_kv} KV heads")
        kv_of_q = tuple(h // (n_q // n_kv) for h in range(n_q))  # HF's repeat_kv: KV head h // (n_q / n_kv)
    width = mlp.gate_up_proj.out_features // 2 if fused_gu else mlp.up_proj.out_features
    q_in = attn.qkv_proj if fused_qkv else attn.q_proj
    mlp_in = mlp.gate_up_proj if fused_gu else mlp.up_proj
    norms = _norm_params(adapter.blocks[i])
    o_bias, down_bias = attn.o_proj.bias is not None, mlp.down_proj.bias is not None
    qk_norms = _numel(getattr(attn, "q_norm", None)) + _numel(getattr(attn, "k_norm", None))
    return BlockGeometry(
        block=i, num_q_heads=n_q, num_kv_heads=n_kv, head_dim=head_dim, hidden=hidden, kv_of_q=tuple(kv_of_q),
        mlp_width=width, fused_qkv=fused_qkv, fused_gate_up=fused_gu,
        attn_in=(by_short["qkv_proj"],) if fused_qkv else tuple(by_short[s] for s in ("q_proj", "k_proj", "v_proj")),
        attn_out=by_short["o_proj"],
        mlp_in=(by_short["gate_up_proj"],) if fused_gu else (by_short["gate_proj"], by_short["up_proj"]),
        mlp_out=by_short["down_proj"], qkv_bias=q_in.bias is not None, o_bias=o_bias,
        mlp_in_bias=mlp_in.bias is not None, mlp_out_bias=down_bias,
        attn_fixed=norms[0] + qk_norms + o_bias * hidden, mlp_fixed=norms[1] + down_bias * hidden)


def geometry(adapter: DecoderAdapter) -> list[BlockGeometry]:
    """Every block's head geometry and MLP width."""
    return [block_geometry(adapter, i) for i in range(adapter.num_blocks)]


@dataclass(frozen=True)
class BlockState:
    """What one block keeps: query heads and MLP neurons, sorted original indices."""

    heads: tuple[int, ...]
    neurons: tuple[int, ...]

    def kept_kv(self, geom: BlockGeometry) -> tuple[int, ...]:
        """The KV heads some kept query head reads (the others go)."""
        return tuple(sorted({geom.kv_of_q[h] for h in self.heads}))


@dataclass(frozen=True)
class StructuredState:
    """Per block what is kept; `kv_groups`: the units are whole KV groups (each kept or removed entirely)."""

    blocks: tuple[BlockState, ...]
    kv_groups: bool = False

    @classmethod
    def full(cls, geoms: Sequence[BlockGeometry], kv_groups: bool = False) -> StructuredState:
        return cls(tuple(BlockState(tuple(range(g.num_q_heads)), tuple(range(g.mlp_width))) for g in geoms),
                   kv_groups)

    @classmethod
    def from_counts(cls, geoms: Sequence[BlockGeometry], heads: Sequence[int], neurons: Sequence[int],
                    head_order: Sequence[Sequence[int]] | None = None,
                    neuron_order: Sequence[Sequence[int]] | None = None, kv_groups: bool = False) -> StructuredState:
        """`heads[i]` units removed in block i (query heads, or KV groups with `kv_groups`) and `neurons[i]`
        neurons, taken first to last from `head_order[i]` / `neuron_order[i]` (a removal order, e.g. a solver's
        greedy path; default: the highest indices first)."""
        if not len(heads) == len(neurons) == len(geoms):
            raise UserError(f"structured state: {len(heads)} head counts and {len(neurons)} neuron counts for "
                            f"{len(geoms)} blocks")
        out = []
        for i, g in enumerate(geoms):
            units = g.num_kv_heads if kv_groups else g.num_q_heads
            _check_count("heads", i, heads[i], units)
            _check_count("neurons", i, neurons[i], g.mlp_width)
            gone_units = list(head_order[i] if head_order else range(units - 1, -1, -1))[: heads[i]]
            gone = {h for u in gone_units for h in (g.heads_of_kv(u) if kv_groups else (u,))}
            gone_n = set(list(neuron_order[i] if neuron_order else range(g.mlp_width - 1, -1, -1))[: neurons[i]])
            out.append(BlockState(tuple(h for h in range(g.num_q_heads) if h not in gone),
                                  tuple(n for n in range(g.mlp_width) if n not in gone_n)))
        return cls(tuple(out), kv_groups)

    def check(self, geoms: Sequence[BlockGeometry]) -> None:
        """One-line UserErrors for a state that does not fit the model."""
        if len(self.blocks) != len(geoms):
            raise UserError(f"structured state has {len(self.blocks)} blocks but the model has {len(geoms)}")
        if self.kv_groups and not any(g.is_gqa for g in geoms):
            g = geoms[0]
            raise UserError(f"kv_groups: KV-group removal needs a GQA model (block 0 has {g.num_q_heads} query "
                            f"heads and {g.num_kv_heads} KV heads; remove query heads instead)")
        for i, (b, g) in enumerate(zip(self.blocks, geoms)):
            _check_indices("heads", i, b.heads, g.num_q_heads)
            _check_indices("neurons", i, b.neurons, g.mlp_width)
            if self.kv_groups:
                kept = set(b.heads)
                for kv in range(g.num_kv_heads):
                    group = set(g.heads_of_kv(kv))
                    if kept & group and not group <= kept:
                        raise UserError(f"structured state: block {i} keeps part of KV group {kv} "
                                        f"({sorted(kept & group)} of {sorted(group)}) with kv_groups=true")

    def to_dict(self) -> dict:
        return {"kv_groups": self.kv_groups,
                "blocks": [{"heads": list(b.heads), "neurons": list(b.neurons)} for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: Mapping) -> StructuredState:
        try:
            blocks = tuple(BlockState(tuple(int(h) for h in b["heads"]), tuple(int(n) for n in b["neurons"]))
                           for b in d["blocks"])
        except (KeyError, TypeError, ValueError) as ex:
            raise UserError(f"structured state: expected blocks of heads and neurons lists ({ex})") from ex
        return cls(blocks, bool(d.get("kv_groups", False)))


def _check_count(what: str, block: int, n: int, total: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= total:
        raise UserError(f"structured state: block {block} {what} removed must be an integer in [0, {total}], "
                        f"got {n!r}")


def _check_indices(what: str, block: int, kept: Iterable[int], total: int) -> None:
    kept = tuple(kept)
    if kept != tuple(sorted(set(kept))) or (kept and not 0 <= kept[0] <= kept[-1] < total):
        raise UserError(f"structured state: block {block} {what} must be sorted distinct indices in [0, {total})")


def block_removed_params(g: BlockGeometry, b: BlockState) -> int:
    """Parameters the shrunk model no longer has in this block (see the module docstring for what goes)."""
    heads, neurons = g.num_q_heads - len(b.heads), g.mlp_width - len(b.neurons)
    n = heads * g.head_params + (g.num_kv_heads - len(b.kept_kv(g))) * g.kv_head_params
    n += neurons * g.neuron_params
    return n + (g.attn_fixed if not b.heads else 0) + (g.mlp_fixed if not b.neurons else 0)


def removed_params(geoms: Sequence[BlockGeometry], state: StructuredState) -> int:
    """Parameters removed from the whole model: the dense count minus the shrunk model's."""
    return sum(block_removed_params(g, b) for g, b in zip(geoms, state.blocks))


def masked_weights(adapter: DecoderAdapter, state: StructuredState, weights: Mapping[str, torch.Tensor] | None = None,
                   blocks: Iterable[int] | None = None,
                   geoms: Sequence[BlockGeometry] | None = None, check: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: new tensor} for the o_proj and down_proj of `blocks` (default: all): the weight with the
    input columns of removed heads / neurons zeroed and, where the whole sub-block goes, its bias zeroed.

    `weights[linear name]` replaces a weight's kept columns (e.g. OBS-updated ones): [out, in] (removed columns
    are zeroed anyway) or [out, kept] (the kept columns, in order). Pure: the model is not touched. A search
    applying many states passes `geoms` once, the changed `blocks`, and `check=False` for states it made itself.
    """
    geoms = geometry(adapter) if geoms is None else geoms
    if check:
        state.check(geoms)
    weights = weights or {}
    out = {}
    for i in range(len(geoms)) if blocks is None else blocks:
        g, b = geoms[i], state.blocks[i]
        cols = torch.tensor([h * g.head_dim + d for h in b.heads for d in range(g.head_dim)], dtype=torch.long)
        for name, kept in ((g.attn_out, cols), (g.mlp_out, torch.tensor(b.neurons, dtype=torch.long))):
            lin = adapter.module(name)
            w = lin.weight.detach()
            new = torch.zeros_like(w)
            src = weights.get(name)
            if src is None:
                new[:, kept] = w[:, kept]
            elif tuple(src.shape) == tuple(w.shape):
                new[:, kept] = src.to(w)[:, kept]
            elif tuple(src.shape) == (w.shape[0], len(kept)):
                new[:, kept] = src.to(w)
            else:
                raise UserError(f"weights[{name!r}]: shape {tuple(src.shape)}, expected {tuple(w.shape)} or "
                                f"{(w.shape[0], len(kept))}")
            out[name + ".weight"] = new
            if lin.bias is not None:
                out[name + ".bias"] = lin.bias.detach().clone() if len(kept) else torch.zeros_like(lin.bias)
    return out
