"""Low-rank adapters for post-compression training (`train.lora.rank > 0`), with peft's LoRA.

    with LoraAdapters(model, names, LoraSettings(rank=8), seed, masks) as lora:
        PostTrainer(model, lora.params, windows, settings, lora.masks, ...).run()
        lora.merge()     # W += (alpha / rank) B·A for every adapted layer; the adapters are gone, pruned entries zero
    # on leaving: adapters not merged are removed, every parameter's requires_grad is as it was

Why a compressed model's structure survives exactly: a structured model's pruned entries are whole input columns
(removed heads and neurons, in o_proj / down_proj) or whole output rows; the A factor's columns at pruned inputs and
the B factor's rows at pruned outputs are zeroed at the start and masked through training like any pruned entry
(`MaskedAdamW`), so B·A is exactly zero there and the merged weight keeps its zeros. A per-entry mask (method=sparse)
cannot be kept by a product of two dense factors: refused with one line. Dropped blocks are not in the forward:
their B stays zero and their merged weights do not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evoexp.errors import UserError

ADAPTER = "default"


@dataclass
class LoraSettings:
    rank: int
    alpha: float | None = None  # None: 2 x rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)  # short names (q_proj, ...); empty: every linear given

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def record(self) -> dict:
        """What result.json and the checkpoint / evaluation keys hold of it."""
        return {"rank": self.rank, "alpha": self.lora_alpha, "dropout": self.dropout, "targets": list(self.targets)}


def adapted_layers(adapter, targets: list[str]) -> list[str]:
    """Full names of the decoder blocks' linear layers whose short name (q_proj, ...) is in `targets` (all for
    none); checked right after the model loads, so a name it lacks fails before the search."""
    linears = [(li.name, li.short) for li in adapter.linears()]
    if not targets:
        return [name for name, _ in linears]
    shorts = sorted({short for _, short in linears})
    unknown = [t for t in targets if t not in shorts]
    if unknown:
        raise UserError(f"train.lora.targets: {', '.join(unknown)} is not a linear layer of this model's blocks "
                        f"(it has {', '.join(shorts)})")
    return [name for name, short in linears if short in targets]


def factor_mask(mask: torch.Tensor, shape: torch.Size, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept input columns [in], kept output rows [out]) of a mask that is their outer product."""
    full = mask.to(torch.bool).expand(shape)
    rows, cols = full.any(1), full.any(0)
    if not torch.equal(full, rows[:, None] & cols[None, :]):
        raise UserError(f"train.lora: {name} has pruned entries that are not whole rows or columns; a LoRA update "
                        "cannot keep them zero (use train.lora.rank=0)")
    return cols, rows


class LoraAdapters:
    """peft LoRA adapters on the named linear layers of `model`, trained in place of their weights."""

    def __init__(self, model: nn.Module, names: list[str], s: LoraSettings, seed: int,
                 masks: dict[nn.Parameter, torch.Tensor]):
        from peft import LoraConfig, LoraModel

        self.model, self.merged = model, False
        self.flags = [(p, p.requires_grad) for p in model.parameters()]  # peft freezes every non-adapter parameter
        config = LoraConfig(r=s.rank, lora_alpha=s.lora_alpha, lora_dropout=s.dropout, target_modules=list(names),
                            bias="none")
        with torch.random.fork_rng(devices=[]):  # A's random init from the run's seed, not from the global stream
            torch.manual_seed(seed)
            self.tuner = LoraModel(model, config, ADAPTER)
        self.params: list[nn.Parameter] = []
        self.masks: dict[nn.Parameter, torch.Tensor] = {}
        self.base_masks = {}
        for name in names:
            layer = model.get_submodule(name)
            a, b, w = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.get_base_layer().weight
            self.params += [a, b]
            if w in masks:
                cols, rows = factor_mask(masks[w], w.shape, name)
                self.base_masks[w] = masks[w]
                self.masks[a] = cols[None, :].to(a.device)
                self.masks[b] = rows[:, None].to(b.device)
                with torch.no_grad():
                    a.mul_(self.masks[a])  # no path from a pruned input, not even in the first step's gradients

    def merge(self) -> None:
        """Fold every adapter into its layer's weight and remove the adapters (the original modules are back)."""
        self.tuner.merge_and_unload()
        with torch.no_grad():  # B·A is exactly zero at pruned entries; re-applied all the same
            for w, mask in self.base_masks.items():
                w.mul_(mask.to(w.device))
        self.merged = True

    def __enter__(self) -> "LoraAdapters":
        return self

    def __exit__(self, *exc) -> bool:
        if not self.merged:
            self.tuner.unload()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        return False
