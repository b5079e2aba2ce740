"""Small shared helpers: atomic writes, fingerprints, cache locations, run provenance."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def cache_root() -> Path:
    """Where converted models, token caches and dense reference metrics live (shared by all runs)."""
    root = os.environ.get("EVOEXP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "evoexp"
    )
    return Path(root)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


class KeyedLog:
    """Values computed one at a time and kept as JSON lines in `path` ({"context", "key", <field>}), so a killed
    run redoes only what is missing. A line counts only if its context (what the value depends on besides its
    key: data, settings, what a state means) matches, so a resumed run with other settings recomputes instead of
    reusing numbers that are not its own. A cut last line is dropped."""

    def __init__(self, path: str | os.PathLike, context: Any, field: str = "value"):
        self.path, self.context, self.field = Path(path), stable_hash(context), field
        self.done: dict[str, Any] = {}
        if not self.path.exists():
            return
        text = self.path.read_text()
        good = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            good.append(line)
            if isinstance(rec, dict) and rec.get("context") == self.context and field in rec:
                self.done[rec["key"]] = rec[field]
        if text and text != "".join(f"{line}\n" for line in good):  # or the next line would be glued to a cut one
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in good))

    def add(self, key: str, value: Any) -> None:
        self.done[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, {"context": self.context, "key": key, self.field: value})


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict ordering."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def cached_file_hash(path: str | os.PathLike) -> str:
    """file_hash, remembered under the cache root by (path, size, mtime): a checkpoint is read in full once."""
    p = Path(path).resolve()
    st = p.stat()
    memo = cache_root() / "file_hashes" / f"{stable_hash([str(p), st.st_size, st.st_mtime_ns])}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = file_hash(p)
    memo.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(memo) as tmp:
        Path(tmp).write_text(digest)
    return digest


def git_sha() -> str | None:
    """Commit of the evoexp checkout (with '+dirty' when it has local changes); None outside git."""
    src = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("evoexp", "torch", "transformers", "hydra-core", "omegaconf", "wandb", "datasets",
                "safetensors", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def progress(iterable=None, **kwargs):
    """A tqdm bar; when stderr is not a terminal (SLURM logs, CI) it redraws at most every 30 s."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
