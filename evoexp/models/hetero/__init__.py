"""The modeling code of evoexp's structurally pruned checkpoints (a Llama-family decoder whose layers differ in
shape). The two modules are copied into each checkpoint `save_shrunk` writes; evoexp itself registers them with
the transformers Auto classes (`register()`), so it loads such checkpoints without running code from the
checkpoint directory.

This package's own import stays light (no transformers): model loading imports it on every run, and the two
modules are imported only when `register()` runs or `evoexp.models.shrink` is used.
"""
from __future__ import annotations

import importlib
from pathlib import Path

MODEL_TYPE = "evoexp_hetero"
CONFIG_MODULE = "configuration_evoexp_hetero"
MODELING_MODULE = "modeling_evoexp_hetero"
FILES = tuple(Path(__file__).with_name(m + ".py") for m in (CONFIG_MODULE, MODELING_MODULE))
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.EvoexpHeteroConfig",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.EvoexpHeteroForCausalLM"}


def configuration():
    """The configuration module (imports transformers' Llama config), on first use."""
    return importlib.import_module(f"{__name__}.{CONFIG_MODULE}")


def modeling():
    """The modeling module (imports transformers' Llama modeling, seconds on 2 cores), on first use."""
    return importlib.import_module(f"{__name__}.{MODELING_MODULE}")


def register() -> None:
    """Let AutoConfig / AutoModelForCausalLM resolve `model_type: evoexp_hetero` to the classes installed with
    evoexp (idempotent). transformers then uses them for such a checkpoint unless trust_remote_code=True asks for
    the checkpoint's own copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_cls, model_cls = configuration().EvoexpHeteroConfig, modeling().EvoexpHeteroForCausalLM
    try:
        AutoConfig.register(MODEL_TYPE, config_cls)
    except ValueError:  # already registered by an earlier call
        pass
    try:
        AutoModelForCausalLM.register(config_cls, model_cls)
    except ValueError:
        pass


__all__ = ["AUTO_MAP", "FILES", "MODEL_TYPE", "configuration", "modeling", "register"]
