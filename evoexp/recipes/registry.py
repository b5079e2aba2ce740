"""Which recipe runs each method kind (`method.kind`): adding a method is one line here (see recipes/contract.py)."""
from __future__ import annotations

from evoexp.errors import UserError
from evoexp.recipes.contract import Recipe
from evoexp.recipes.dense import DenseRecipe
from evoexp.recipes.depth import DepthPruningRecipe
from evoexp.recipes.layerwise import LayerwiseRecipe
from evoexp.recipes.structured import StructuredRecipe

RECIPES: dict[str, type[Recipe]] = {
    "dense": DenseRecipe,
    "drop": DepthPruningRecipe,
    "sparse": LayerwiseRecipe,
    "quant": LayerwiseRecipe,
    "structured": StructuredRecipe,
}


def recipe_for(kind: str) -> type[Recipe]:
    if kind not in RECIPES:
        raise UserError(f"method: unknown kind {kind!r} (expected one of {', '.join(RECIPES)})")
    return RECIPES[kind]
