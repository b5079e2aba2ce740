"""Structured pruning end to end (method=structured): the per-layer recipe over every block's o_proj and
down_proj, whose levels remove whole heads and neurons (methods/structured.py), and a physically smaller model
as its export.

Everything else is the per-layer recipe's: the database (ZipLM, Wanda-sp, magnitude or random levels, stored as
kept columns), `search=uniform|evopress|random|dp` over the exact parameter budget, candidates applied by
masking columns from the in-memory database (`LevelApplier`), and the same evaluation as every run.
"""
from __future__ import annotations

from evoexp.config import RunCfg
from evoexp.errors import UserError
from evoexp.methods.export import model_card
from evoexp.methods.layerwise import Allocation
from evoexp.methods.level_kinds import LEVEL_KINDS
from evoexp.methods.structured import check_geometry, structured_budget, structured_units, uniform_values
from evoexp.methods.structured_export import export_structured
from evoexp.models.adapter import LinearInfo
from evoexp.models.heads import geometry
from evoexp.models.peek import peek_config
from evoexp.models.shrink import check_shrinkable
from evoexp.recipes.contract import RecipeResult
from evoexp.recipes.bonsai import BonsaiRun, check_bonsai
from evoexp.recipes.darwinlm import PrunedMasks, darwinlm_search
from evoexp.recipes.layerwise import LayerwiseRecipe
from evoexp.recipes.layerwise_checks import EXPORTS, check_layerwise


class StructuredRecipe(LayerwiseRecipe):
    kinds = ("structured",)

    @classmethod
    def validate(cls, rc: RunCfg) -> None:
        if rc.search.kind == "bonsai":  # no database: its own checks (recipes/bonsai.py)
            check_bonsai(rc)
            LEVEL_KINDS["structured"].check(rc.method, ["bonsai"], rc.export.kind)
            if rc.export.kind not in EXPORTS:
                raise UserError(f"export: expected none, auto or hf, got {rc.export.kind!r}")
            check_geometry(rc.method, peek_config(rc.model))
            return
        check_layerwise(rc)
        if rc.database.propagation == "reference":
            raise UserError("database.propagation: reference propagates a bit-width (method=quant); method="
                            "structured takes auto, dense or compressed")
        check_geometry(rc.method, peek_config(rc.model))

    def unit_layers(self) -> list[LinearInfo]:
        return structured_units(geometry(self.adapter), self.rc.method)

    def database_options(self) -> dict:
        """Each unit's group of input columns for its solver; the uniform spread stands for the target when the
        next block is calibrated on compressed blocks (propagation=compressed)."""
        m = self.rc.method
        return {"extra": {"group_size": {u.name: u.group_size for u in self.layers}, "kv_groups": m.kv_groups},
                "targets": uniform_values(self.layers, m)}

    def run(self) -> RecipeResult:
        if self.export_format() != "none" or self.rc.search.kind == "bonsai":  # an architecture the shrunk format
            check_shrinkable(self.ctx.loaded.model)  # lacks stops now, not after the search (Bonsai shrinks)
        if self.rc.search.kind == "bonsai":
            return BonsaiRun(self).run()
        return super().run()

    def choose(self, kind: str, cfg) -> Allocation:
        if kind == "darwinlm":  # EvoPress with training-aware selection (recipes/darwinlm.py)
            return darwinlm_search(self, cfg)
        return super().choose(kind, cfg)

    def kept_entries(self, alloc: Allocation) -> dict:
        """The kept columns of every o_proj / down_proj at the allocation's levels (the database's kept groups)."""
        return PrunedMasks(self.adapter, alloc.db, self.level_space()).of_levels(alloc.levels)

    def details(self, alloc: Allocation | None) -> dict:
        out = super().details(alloc)
        if alloc is not None:  # what every allocation of the run spends on heads and neurons, by construction
            out["achieved"]["budget_params"] = structured_budget(self.layers, self.rc.method).params
        return out

    def export(self, found: Allocation, allocation: dict, entry: dict, held: bool = False) -> None:
        """The shrunk model: kept columns from the database, or (`held`: trained) from the model as it is."""
        loaded = self.ctx.loaded
        if self.export_format() == "none":
            return
        with self.ctx.timed("export"):
            if not held:
                self.put(None)
            export_structured(loaded.model, loaded.tokenizer, found, allocation,
                              model_card(self.card_facts(), allocation, entry, "hf"), self.ctx.out_dir / "model",
                              from_model=held)
