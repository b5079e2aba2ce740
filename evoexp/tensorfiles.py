"""safetensors files that carry a sha256 of their own bytes, so that truncation and bit flips are caught when
they are read back (database layers, token caches): `save_safetensors` writes one, `check_safetensors` checks it,
`load_cached` reads a cache file back or says why it is to be computed again."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evoexp.utils import DamagedFile, atomic_path, near_miss

log = logging.getLogger(__name__)

ST_DIGEST_KEY = "evoexp_sha256"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy where it is on the CPU and contiguous (bf16 too: viewed as bytes)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: a cache key for what it holds (windows of token ids)."""
    h = hashlib.sha256(f"{t.dtype} {list(t.shape)}".encode())
    h.update(tensor_bytes(t))
    return h.hexdigest()


def _st_header(f) -> tuple[int, dict]:
    head = f.read(8)
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    size = os.fstat(f.fileno()).st_size
    if n > size - 8 or n > 1 << 27:
        raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
    header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return n, header


def _st_digest(header: dict, f) -> str:
    """sha256 over the header (without the digest itself, canonical JSON) and every byte after it."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != ST_DIGEST_KEY}
    h = hashlib.sha256(json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode())
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomically, with the file's digest in its metadata (checked by
    `check_safetensors`). The data are hashed as written: the digest field is reserved, then filled in place."""
    placeholder = "0" * 64
    meta = {k: v for k, v in (metadata or {}).items() if k != ST_DIGEST_KEY}
    meta[ST_DIGEST_KEY] = placeholder
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "r+b") as f:
            n, header = _st_header(f)
            digest = _st_digest(header, f)
            f.seek(8)
            raw = f.read(n)
            field = f'"{ST_DIGEST_KEY}":"{placeholder}"'.encode()
            if raw.count(field) != 1:
                raise RuntimeError(f"safetensors header of {path}: digest field not found once")
            f.seek(8 + raw.index(field) + len(field) - len(placeholder) - 1)
            f.write(digest.encode())


def check_safetensors(path: str | os.PathLike, what_to_do: str | None = None) -> bool:
    """True when the file matches the digest written with it, False when it has none (written before digests;
    only its size is checked); raises DamagedFile otherwise."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            n, header = _st_header(f)
        except (ValueError, UnicodeDecodeError) as ex:
            raise DamagedFile(path, f"cut short or garbled: {ex}", what_to_do) from None
        meta = header.get("__metadata__") or {}
        try:
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (TypeError, KeyError, IndexError):
            raise DamagedFile(path, "garbled header", what_to_do) from None
        if end != os.fstat(f.fileno()).st_size - 8 - n:
            raise DamagedFile(path, "cut short or grown: its data do not fill the sizes in its header", what_to_do)
        recorded = meta.get(ST_DIGEST_KEY) if isinstance(meta, dict) else None
        if recorded is None:
            garbled = [k for k in meta if near_miss(k, ST_DIGEST_KEY)] if isinstance(meta, dict) else ["__metadata__"]
            if garbled:
                raise DamagedFile(path, f"its digest key reads {garbled[0]!r}", what_to_do)
            return False
        if _st_digest(header, f) != recorded:
            raise DamagedFile(path, "the content does not match the digest recorded when it was written",
                              what_to_do)
    return True


def load_cached(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file written by `save_safetensors` and unchanged since; None, with a log line naming
    the file and `what` is done instead (e.g. "tokenizing again"), when it is missing, was written without a
    digest (an older evoexp) or is damaged: a cache is always recomputable, so damage costs time, never a result."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if check_safetensors(path):
            return load_file(str(path))
        log.info("%s: written without a digest (an older evoexp); %s", path, what)
    except DamagedFile as ex:
        log.warning("%s: damaged (%s); %s", path, ex.why, what)
    return None
