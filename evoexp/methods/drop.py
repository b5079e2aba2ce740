"""Depth pruning: drop the attention and/or MLP sub-block of decoder blocks.

A drop config says, per block, which sub-blocks are gone (EvoPress `layer_drop_config.txt`: one line per block,
`none | attn | mlp | attn+mlp`). Decoder blocks are pre-norm residual, `h += attn(norm(h)); h += mlp(norm2(h))`
(Gemma 2/3 also norm the sub-block outputs, and RMSNorm(0) = 0), so a sub-block that outputs zeros leaves the
residual stream untouched. Three ways to get a dropped model:

* `DropApplier(adapter).apply(cfg)` swaps `block.self_attn` / `block.mlp` for `ZeroAttention` / `ZeroMLP` and
  back; cheap, for scoring candidates in a search loop. `restore()` gives the exact original model back.
* `materialize(model, cfg)` makes the smaller model for real, in place: blocks with both sub-blocks dropped are
  removed (config and cache bookkeeping renumbered), partial drops get the zero stand-ins.
* `export_dropped(model, tokenizer, cfg, out_dir)` writes a plain Hugging Face checkpoint. Whole blocks are
  removed (config.json has fewer layers). A partially dropped sub-block cannot be expressed in a stock config,
  so it is written with its output projection (`o_proj` / `down_proj`, and their biases) set to zero: its
  output is then exactly 0, and `AutoModelForCausalLM.from_pretrained(out_dir)` loads a model that gives the
  same logits with no evoexp code at all (it still computes the zeroed sub-blocks). `load_dropped(out_dir)`
  loads the same checkpoint and swaps those sub-blocks for the zero stand-ins (read from `evoexp_drop.json`),
  so they are not computed.

`ZeroAttention` still writes a 1-wide dummy key/value into its slot of the KV cache: transformers reads the
number of cached tokens from cache layer 0, so without it dropping block 0's attention would restart the
position ids at 0 on every decoding step.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from evoexp.errors import UserError
from evoexp.models.adapter import CACHE_KWARGS, DecoderAdapter
from evoexp.models.applier import Applier
from evoexp.sharing import umask_permissions

LINES = {(False, False): "none", (True, False): "attn", (False, True): "mlp", (True, True): "attn+mlp"}
PARSE = {line: pair for pair, line in LINES.items()}
DROP_FILE = "evoexp_drop.json"
FORMAT_VERSION = 1


@dataclass
class DropConfig:
    """Per block: is its attention (`attn[i]`) / MLP (`mlp[i]`) sub-block dropped."""

    attn: list[bool]
    mlp: list[bool]

    def __post_init__(self):
        if len(self.attn) != len(self.mlp):
            raise UserError(f"drop config: attn has {len(self.attn)} entries but mlp has {len(self.mlp)}")
        for name in ("attn", "mlp"):
            values = getattr(self, name)
            if not all(not isinstance(v, str) and v in (0, 1) for v in values):  # numpy/torch bools pass too
                raise UserError(f"drop config: {name} must be a list of booleans, got {values!r}")
            setattr(self, name, [bool(v) for v in values])

    @classmethod
    def none(cls, num_blocks: int) -> DropConfig:
        return cls([False] * num_blocks, [False] * num_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.attn)

    def lines(self) -> list[str]:
        return [LINES[pair] for pair in zip(self.attn, self.mlp)]

    @classmethod
    def from_lines(cls, lines: str | Iterable[str]) -> DropConfig:
        """Parse `layer_drop_config.txt` lines (a string is split into lines; blank lines are ignored)."""
        if isinstance(lines, str):
            lines = lines.splitlines()
        pairs = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.strip() not in PARSE:
                raise UserError(f"drop config line {n}: unknown entry {line.strip()!r} "
                                f"(expected one of {' | '.join(PARSE)})")
            pairs.append(PARSE[line.strip()])
        return cls([a for a, _ in pairs], [m for _, m in pairs])

    def to_dict(self) -> dict:
        return {"attn": list(self.attn), "mlp": list(self.mlp), "lines": self.lines()}

    @classmethod
    def from_dict(cls, d: dict) -> DropConfig:
        """From `to_dict()` output; `lines` alone is enough, and must agree with attn/mlp when both are given."""
        if not isinstance(d, dict) or not ({"attn", "mlp"} <= d.keys() or "lines" in d):
            raise UserError("drop config: expected a dict with attn and mlp lists, or lines")
        if "attn" not in d or "mlp" not in d:
            return cls.from_lines(d["lines"])
        cfg = cls(list(d["attn"]), list(d["mlp"]))
        if "lines" in d and cls.from_lines(d["lines"]) != cfg:
            raise UserError("drop config: lines disagree with attn/mlp")
        return cfg

    def whole_blocks(self) -> list[int]:
        """Blocks with both sub-blocks dropped: these can be removed from the model."""
        return [i for i, (a, m) in enumerate(zip(self.attn, self.mlp)) if a and m]

    def partial(self) -> list[int]:
        """Blocks with exactly one sub-block dropped."""
        return [i for i, (a, m) in enumerate(zip(self.attn, self.mlp)) if a != m]

    def kept_blocks(self) -> list[int]:
        """Original indices of the blocks a materialized model keeps, in order."""
        return [i for i, (a, m) in enumerate(zip(self.attn, self.mlp)) if not (a and m)]

    def without_whole_blocks(self) -> DropConfig:
        """The config of the materialized model: one entry per kept block (only partial drops remain)."""
        keep = self.kept_blocks()
        return DropConfig([self.attn[i] for i in keep], [self.mlp[i] for i in keep])


class ZeroAttention(nn.Module):
    """Stands in for a dropped attention sub-block: outputs zeros, keeps the KV cache's token count right."""

    def __init__(self, layer_idx: int | None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None:
            # [batch, 1 head, seq, 1 dim]: the cache grows by the right number of tokens at ~no memory cost.
            dummy = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(dummy, dummy, self.layer_idx)
        return torch.zeros_like(hidden), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class ZeroMLP(nn.Module):
    """Stands in for a dropped MLP sub-block: outputs zeros."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def _is_zero(module: nn.Module) -> bool:
    return isinstance(module, (ZeroAttention, ZeroMLP))


def _swap(block: nn.Module, name: str, module: nn.Module) -> None:
    if block._modules[name] is not module:  # skip the setattr bookkeeping when nothing changes
        setattr(block, name, module)


def _check_length(cfg: DropConfig, num_blocks: int) -> None:
    if cfg.num_blocks != num_blocks:
        raise UserError(f"drop config has {cfg.num_blocks} blocks but the model has {num_blocks}")


class DropApplier(Applier):
    """Swaps zero stand-ins in and out of an adapter's blocks; the modules of every block are made once.

    It installs no tensors (the stand-ins have none) and keeps the sub-blocks it takes out untouched, so nothing
    written to the model while a state is applied reaches what `restore()` puts back."""

    def __init__(self, adapter: DecoderAdapter):
        self.blocks = adapter.blocks
        self.attn = [block.self_attn for block in self.blocks]
        self.mlp = [block.mlp for block in self.blocks]
        if any(_is_zero(m) for m in self.attn + self.mlp):
            raise UserError("DropApplier: the model already has dropped sub-blocks (restore() the other applier)")
        self.zero_attn = [ZeroAttention(getattr(a, "layer_idx", i)) for i, a in enumerate(self.attn)]
        self.zero_mlp = [ZeroMLP() for _ in self.blocks]

    def apply(self, cfg: DropConfig) -> None:
        _check_length(cfg, len(self.blocks))
        for i, block in enumerate(self.blocks):
            _swap(block, "self_attn", self.zero_attn[i] if cfg.attn[i] else self.attn[i])
            _swap(block, "mlp", self.zero_mlp[i] if cfg.mlp[i] else self.mlp[i])

    def restore(self) -> None:
        self.apply(DropConfig.none(len(self.blocks)))

    @contextmanager
    def applied(self, cfg: DropConfig) -> Iterator[None]:
        self.apply(cfg)
        try:
            yield
        finally:
            self.restore()


def _unwrap(target) -> tuple[nn.Module, DecoderAdapter]:
    """(model, adapter) from a LoadedModel or a bare HF model."""
    if isinstance(target, nn.Module):
        return target, DecoderAdapter(target)
    return target.model, target.adapter


def _check_undropped(adapter: DecoderAdapter, cfg: DropConfig) -> None:
    _check_length(cfg, adapter.num_blocks)
    if any(_is_zero(b.self_attn) or _is_zero(b.mlp) for b in adapter.blocks):
        raise UserError("model already has dropped sub-blocks (restore() the DropApplier first)")
    if not cfg.kept_blocks():
        raise UserError("drop config drops every block; at least one must stay")


def _zero_partial(blocks: nn.ModuleList, cfg: DropConfig) -> None:
    for i in cfg.partial():
        if cfg.attn[i]:
            blocks[i].self_attn = ZeroAttention(getattr(blocks[i].self_attn, "layer_idx", i))
        else:
            blocks[i].mlp = ZeroMLP()


def trim_config(config, keep: list[int]) -> None:
    """Make the per-layer config match the kept blocks (models loop over layers[:num_hidden_layers])."""
    spec = getattr(config, "_heterogeneity_spec", None)  # transformers >= 5.2x per-layer overrides, keyed by index
    overrides = copy.deepcopy(spec.per_layer_overrides) if spec is not None else None
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    if overrides is not None:
        config.per_layer_config = {new: overrides[old] for new, old in enumerate(keep) if old in overrides}


def _remove_blocks(model: nn.Module, blocks: nn.ModuleList, keep: list[int]) -> None:
    for i in sorted(set(range(len(blocks))) - set(keep), reverse=True):
        del blocks[i]  # ModuleList renumbers its keys, so state_dict names follow the new indices
    for new, block in enumerate(blocks):
        # The cache is indexed by layer_idx. The block's attention_type (older transformers) needs no change:
        # it belongs to the block, and layer_types is trimmed with the same indices.
        for mod in (block, block.self_attn):
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    trim_config(model.config, keep)


def materialize(target, cfg: DropConfig):
    """Make `cfg` real, in place: whole dropped blocks removed, partial drops as zero stand-ins.

    Takes a LoadedModel (its adapter is rebuilt for the smaller model) or a bare HF model; returns it.
    Adapters or DropAppliers made before this call describe the old blocks and must not be used afterwards.
    """
    model, adapter = _unwrap(target)
    _check_undropped(adapter, cfg)
    _zero_partial(adapter.blocks, cfg)
    _remove_blocks(model, adapter.blocks, cfg.kept_blocks())
    if not isinstance(target, nn.Module):
        target.adapter = DecoderAdapter(model)
    return target


def _structural_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree and config that shares every parameter and buffer (no extra memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _zero_output_projections(model: nn.Module, adapter: DecoderAdapter, cfg: DropConfig) -> None:
    """Fresh zero weights (and biases) for the output linear of every partially dropped sub-block."""
    for i in cfg.partial():
        role = "attn_out" if cfg.attn[i] else "mlp_out"
        for li in adapter.linears(i):
            if li.role == role:
                lin = model.get_submodule(li.name)
                # New Parameters, not in-place zeroing: the copy shares its tensors with the caller's model.
                for name in ("weight", "bias"):
                    if getattr(lin, name, None) is not None:
                        setattr(lin, name, nn.Parameter(torch.zeros_like(getattr(lin, name)), requires_grad=False))


def export_dropped(model, tokenizer, cfg: DropConfig, out_dir: str | Path) -> Path:
    """Write a plain HF checkpoint of the dropped model (see the module docstring); the caller's model is unchanged."""
    model, adapter = _unwrap(model)
    _check_undropped(adapter, cfg)
    out = _structural_copy(model)
    _zero_output_projections(out, adapter, cfg)
    copy_blocks = out.get_submodule(adapter.block_prefix(0).rsplit(".", 1)[0])
    _remove_blocks(out, copy_blocks, cfg.kept_blocks())
    out_dir = Path(out_dir)
    out.save_pretrained(out_dir)
    umask_permissions(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    meta = {"format": FORMAT_VERSION, "drop": cfg.to_dict(), "original_num_hidden_layers": cfg.num_blocks,
            "kept_blocks": cfg.kept_blocks()}
    (out_dir / DROP_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


def load_dropped(path: str | Path, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load an `export_dropped` checkpoint with its zeroed sub-blocks swapped for zero stand-ins (not computed).

    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    meta_file = Path(path) / DROP_FILE
    if not meta_file.is_file():
        raise UserError(f"{path}: no {DROP_FILE} (not written by export_dropped)")
    cfg = DropConfig.from_dict(json.loads(meta_file.read_text())["drop"]).without_whole_blocks()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    adapter = DecoderAdapter(model)
    _check_length(cfg, adapter.num_blocks)
    _zero_partial(adapter.blocks, cfg)
    return model
