"""Where an evaluation figure that every run shares is kept: the dense model's per model fingerprint and
protocol (`dense_<kind>/`), a compressed model's per protocol and state digest (`state_<kind>/`, see
models/digest.py), so that a model several runs hold is evaluated once."""
from __future__ import annotations

from pathlib import Path

from evoexp.utils import cache_root, stable_hash


def shared_figure(kind: str, key: str, dense: bool, cache_dense: bool, digest: str | None) -> Path | None:
    """The cache file of the figure `key` (fingerprint, protocol, dtype / task) of kind "ppl" or "zeroshot";
    None where it is not shared (the dense cache off, or a compressed model without a digest)."""
    if dense:
        return cache_root() / f"dense_{kind}" / f"{key}.json" if cache_dense else None
    if digest is None:
        return None
    return cache_root() / f"state_{kind}" / f"{stable_hash({'figure': key, 'state': digest})}.json"
