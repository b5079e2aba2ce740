"""One workflow (recipe) per method kind, behind the contract in `contract.py`; `registry.py` maps kinds to
recipes and `common.py` holds the building blocks they share. Kept free of imports, so that reading a result's
schema (`evoexp.recipes.contract`) does not load every recipe."""
