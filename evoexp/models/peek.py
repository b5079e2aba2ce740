"""What a model is like before it is loaded: its config.json where that can be read without loading the model,
so that config checks (window lengths against the context, blocks to drop) run before the load."""
from __future__ import annotations

import json
import os
from pathlib import Path

from evoexp.config import ModelCfg
from evoexp.models.loading import CONVERSION_VERSION
from evoexp.utils import cache_root

# config.json keys that hold a model's context length, most common first
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def hub_config(m: ModelCfg) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # optional and slow to import: only when needed

        found = try_to_load_from_cache(m.path, "config.json", revision=m.revision)
    except Exception:  # noqa: BLE001 - a malformed id or an unreadable cache: not known here
        return None
    return Path(found) if isinstance(found, str) else None


def peek_config(m: ModelCfg) -> dict | None:
    """The model's config.json when it can be read without loading the model: the tiny model's settings, a local
    checkpoint's, a Hub model's in the HF cache or an already converted embedded model's; None otherwise."""
    if m.source == "tiny":
        return {"num_hidden_layers": m.tiny.num_layers, "max_position_embeddings": m.tiny.max_position_embeddings}
    path = None
    if m.source == "hf" and m.path:
        local = Path(os.path.expanduser(m.path), "config.json")
        path = local if local.is_file() else hub_config(m) if m.path.count("/") == 1 else None
    elif m.source == "embedded":
        found = list((cache_root() / "models").glob(f"{m.name}-*-v{CONVERSION_VERSION}/config.json"))
        path = found[0] if len(found) == 1 else None
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def peek_context(m: ModelCfg) -> int | None:
    """The model's context length (max_position_embeddings) when known before loading it (see peek_config).
    The embedded model's is known once it has been converted (its first run); before that it is not checked."""
    config = peek_config(m)
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None


def peek_blocks(m: ModelCfg) -> int | None:
    """The model's number of decoder blocks when known before loading it (see peek_config)."""
    layers = (peek_config(m) or {}).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None
