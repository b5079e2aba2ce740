"""What a model is like before it is loaded: its config.json where that can be read without loading the model,
so that config checks (window lengths against the context, blocks to drop) run before the load."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from evoexp.config import ModelCfg
from evoexp.models.loading import CONVERSION_VERSION, hub_reachable
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


def hub_config_download(m: ModelCfg) -> Path | None:
    """A Hub model's config.json fetched alone (into the HF cache, where the load finds it) when the Hub can be
    reached; None offline or on any failure, which the load then reports in its own words."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    return _fetch_hub_config(m.path, m.revision)


@functools.lru_cache(maxsize=4)
def _fetch_hub_config(repo_id: str, revision: str | None) -> Path | None:
    """Once per process: the checks peek at the config several times."""
    if not hub_reachable():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "config.json", revision=revision, etag_timeout=10))
    except Exception:  # noqa: BLE001 - a private, missing or malformed repo: the load says which
        return None


def packaged_gguf_config(m: ModelCfg) -> dict | None:
    """The embedded model's context length, block count and head / MLP shape from its GGUF's metadata, as
    config.json names them (the conversion maps `<arch>.context_length` to max_position_embeddings)."""
    spec = importlib.util.find_spec(m.package) if m.package else None
    if spec is None or not spec.submodule_search_locations or not m.gguf_file:
        return None
    gguf = Path(spec.submodule_search_locations[0]) / m.gguf_file
    return _gguf_config(str(gguf), gguf.stat().st_mtime_ns) if gguf.is_file() else None


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, mtime_ns: int) -> dict | None:
    """Read once per process: the reader indexes every tensor of the file (about 3 s for the embedded model)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        wanted = {"max_position_embeddings": f"{arch}.context_length", "num_hidden_layers": f"{arch}.block_count",
                  "hidden_size": f"{arch}.embedding_length", "intermediate_size": f"{arch}.feed_forward_length",
                  "num_attention_heads": f"{arch}.attention.head_count",
                  "num_key_value_heads": f"{arch}.attention.head_count_kv"}
        found = {key: int(fields[name].parts[-1][0]) for key, name in wanted.items() if name in fields}
        return {"model_type": arch, **found}
    except Exception:  # noqa: BLE001 - an unreadable GGUF is the conversion's to report
        return None


def peek_config(m: ModelCfg) -> dict | None:
    """The model's config.json when it can be read without loading the model: the tiny model's settings, a local
    checkpoint's, a Hub model's (from the HF cache, else fetched alone when the Hub is reachable), the embedded
    model's (converted, else its GGUF's header); None otherwise."""
    if m.source == "tiny":
        t = m.tiny
        return {"model_type": "llama", "num_hidden_layers": t.num_layers, "max_position_embeddings":
                t.max_position_embeddings, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads}
    path = None
    if m.source == "hf" and m.path:
        local = Path(os.path.expanduser(m.path), "config.json")
        path = local if local.is_file() else hub_config(m) if m.path.count("/") == 1 else None
    elif m.source == "embedded":
        found = list((cache_root() / "models").glob(f"{m.name}-*-v{CONVERSION_VERSION}/config.json"))
        path = found[0] if len(found) == 1 else None
        if path is None:  # not converted yet: the packaged GGUF's header holds the same figures
            return packaged_gguf_config(m)
    if m.source == "hf" and path is None and m.path and m.path.count("/") == 1:
        path = hub_config_download(m)  # the load would download it first thing anyway
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def peek_context(m: ModelCfg) -> int | None:
    """The model's context length (max_position_embeddings) when known before loading it (see peek_config)."""
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
