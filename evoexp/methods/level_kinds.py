"""What differs between the per-layer level methods, one small object per kind: unstructured sparsity,
bit-widths and structured pruning (whole heads and neurons, see methods/structured.py).

A kind knows its config checks, the level space its searches walk, the one-level grid of its one-shot
pipeline, what a model holding an allocation achieves (measured in the weights), how to say it in one line,
the export formats it can be written in and its default number of EvoPress generations.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from evoexp.errors import UserError, check_choice, check_positive, fail
from evoexp.methods.layerwise import (Allocation, LayerLevels, default_step, quant_levels, sparse_levels,
                                      uniform_grid)
from evoexp.methods.structured import measure_structured, structured_levels, structured_summary, uniform_values
from evoexp.models.adapter import DecoderAdapter, LinearInfo

EXPORTS = ("hf", "compressed_tensors", "gptq")  # every format a per-layer allocation can be written in


@dataclass(frozen=True)
class LevelKind(ABC):
    """The interface every per-layer kind implements (the abstract methods) on top of the shared defaults."""

    name: str
    default_generations: int  # EvoPress generations when search.generations is null (the paper's schedules)
    natural_format: str  # what export=auto (or method.export=true) writes
    formats: tuple[str, ...]  # the export formats that apply

    def check(self, method, searches: list[str], export: str) -> None:
        """Config mistakes of this kind, before the model loads (`searches`: the search and its references)."""
        if export in EXPORTS and export not in self.formats:
            raise UserError(f"export: {export} packs quantized weights; method={self.name} exports as hf")

    def fractional(self, method) -> bool:
        """Whether the target lies between levels, so that no uniform allocation meets it."""
        return False

    @abstractmethod
    def level_space(self, method, layers: list[LinearInfo], hidden: int) -> LayerLevels:
        """The levels searches move between, and the database grid behind them."""

    def grid(self, method, layers: list[LinearInfo]) -> dict[str, list]:
        """The one-level grid of the standard one-shot pipeline (search=uniform, nothing to compare)."""
        return uniform_grid(method, layers)

    @abstractmethod
    def measure(self, adapter: DecoderAdapter, alloc: Allocation) -> dict:
        """What the model, now holding `alloc`, achieves, counted in its weights."""

    @abstractmethod
    def summary(self, achieved: dict, layers: int) -> str:
        """`achieved` in one line for the summary and the model card."""


class SparseKind(LevelKind):
    def check(self, method, searches: list[str], export: str) -> None:
        super().check(method, searches, export)
        if method.nm and any(k != "uniform" for k in searches):
            raise UserError(f"method.nm: {method.nm[0]}:{method.nm[1]} fixes every layer at the same sparsity; "
                            "only search=uniform applies")

    def level_space(self, method, layers: list[LinearInfo], hidden: int) -> LayerLevels:
        step = method.step or default_step(method.target, hidden, method.num_levels)
        return sparse_levels(layers, method.target, step, method.num_levels)

    def measure(self, adapter: DecoderAdapter, alloc: Allocation) -> dict:
        """The zero fraction, counted in the weights the model holds."""
        names = list(alloc.levels)
        total = sum(adapter.module(n).weight.numel() for n in names)
        zeros = sum(int((adapter.module(n).weight == 0).sum()) for n in names)
        return {"sparsity": zeros / total, "zeros": zeros, "params": total}

    def summary(self, achieved: dict, layers: int) -> str:
        return f"sparsity {achieved['sparsity']:.4f} over {layers} layers ({achieved['params'] / 1e6:.1f}M weights)"


class QuantKind(LevelKind):
    def check(self, method, searches: list[str], export: str) -> None:
        super().check(method, searches, export)
        if "owl" in searches:
            raise UserError("search: owl allocates sparsity; it does not apply to method=quant")
        if self.fractional(method) and searches[0] == "uniform":
            raise UserError(f"method.target: search=uniform needs a whole bit-width, got {method.target} "
                            "(fractional targets need a search over bit-widths, e.g. search=evopress)")

    def fractional(self, method) -> bool:
        return method.target != int(method.target)

    def level_space(self, method, layers: list[LinearInfo], hidden: int) -> LayerLevels:
        # a fractional target gets its budgets from its start state (see the recipe's evopress); groups are equal
        return quant_levels(layers, math.ceil(method.target), method.levels, method.group_rule, method.tied)

    def measure(self, adapter: DecoderAdapter, alloc: Allocation) -> dict:
        """Mean bits per weight of the allocation's layers."""
        names = list(alloc.levels)
        total = sum(adapter.module(n).weight.numel() for n in names)
        values = alloc.values()
        bits = sum(adapter.module(n).weight.numel() * values[n] for n in names)
        return {"bits": bits / total, "params": total}

    def summary(self, achieved: dict, layers: int) -> str:
        return (f"{achieved['bits']:.3f} bits per weight over {layers} layers "
                f"({achieved['params'] / 1e6:.1f}M weights)")


class StructuredKind(LevelKind):
    """Whole heads and neurons: the layers are StructuredUnits (o_proj, down_proj), levels count removed groups."""

    def check(self, method, searches: list[str], export: str) -> None:
        if export in EXPORTS and export not in self.formats:
            raise UserError(f"export: {export} packs quantized weights and cannot hold a shrunk model; "
                            f"method={self.name} exports as hf (export=auto)")
        if not 0 < method.target < 1:
            fail("method.target", "a fraction of the decoder blocks' parameters in (0, 1)", method.target)
        check_choice(method.budget, "method.budget", ("group", "params"))
        check_positive(method.attn_step, "method.attn_step")
        check_positive(method.mlp_step, "method.mlp_step", null=True)
        check_positive(method.mlp_levels, "method.mlp_levels")
        if "owl" in searches:
            raise UserError("search: owl allocates sparsity; it does not apply to method=structured")

    def level_space(self, method, layers: list[LinearInfo], hidden: int) -> LayerLevels:
        return structured_levels(layers, method)

    def grid(self, method, layers: list[LinearInfo]) -> dict[str, list]:
        return {name: [v] for name, v in uniform_values(layers, method).items()}

    def measure(self, adapter: DecoderAdapter, alloc: Allocation) -> dict:
        return measure_structured(adapter, bool(alloc.db.spec.extra.get("kv_groups")))

    def summary(self, achieved: dict, layers: int) -> str:
        return structured_summary(achieved)


LEVEL_KINDS = {
    "sparse": SparseKind("sparse", default_generations=400, natural_format="hf", formats=("hf",)),
    "quant": QuantKind("quant", default_generations=150, natural_format="compressed_tensors", formats=EXPORTS),
    "structured": StructuredKind("structured", default_generations=200, natural_format="hf", formats=("hf",)),
}
