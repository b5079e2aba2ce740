"""Small shared helpers: atomic writes, fingerprints, cache locations, run provenance."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from evoexp.errors import DiskFull, UserError, no_space

log = logging.getLogger(__name__)


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
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp and safetensors (evoexp/sharing.py) make 0600; as open() would
        os.replace(tmp, path)
    except Exception as ex:
        if no_space(ex) and not isinstance(ex, DiskFull):
            raise DiskFull(path) from ex
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- files that check themselves ------------------------------------------------------------------------------
# Every file evoexp reads back carries a digest of its content, recorded when it was written: a JSON object its
# `_digest` key (over the canonical JSON of the other keys), each JSON line of a log the same, a safetensors file
# `evoexp_sha256` in its header metadata (over the rest of the header and every data byte). Reading verifies it,
# so a file cut short, with flipped bits or edited by hand is caught instead of read as something else. Files
# written before digests existed have none and are read as they are.
DIGEST_KEY = "_digest"
REMEDY = "delete it and run the same command again (what it held is then computed anew)"


class DamagedFile(UserError):
    """A file evoexp wrote that does not read back as written (cut short, bits flipped, edited)."""

    def __init__(self, path: str | os.PathLike, why: str, what_to_do: str | None = None):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: damaged ({why}); {what_to_do or REMEDY}")


def _json_digest(body: Any) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:32]


def near_miss(key: str, name: str) -> bool:
    """`key` is `name` with a character or two garbled (a flipped bit in the digest's own key)."""
    return key != name and len(key) == len(name) and sum(a != b for a, b in zip(key, name)) <= 2


def _with_digest(obj: Any, digest: bool = True) -> str:
    """The JSON text of `obj` (as write_json stores it: non-JSON values as str) with its digest key."""
    text = json.dumps(obj, default=str)
    if not digest:
        return text
    parsed = json.loads(text)  # the digest is over what a reader gets back (str keys, str'd objects)
    if not isinstance(parsed, dict):
        return text
    body = {k: v for k, v in parsed.items() if k != DIGEST_KEY}
    return json.dumps({**body, DIGEST_KEY: _json_digest(body)})


def _verified(obj: Any, path: Path, what_to_do: str | None, where: str = "") -> Any:
    """`obj` without its digest key, after checking it; objects without a digest (older files) pass as they are."""
    if not isinstance(obj, dict):
        return obj
    if DIGEST_KEY not in obj:
        garbled = [k for k in obj if near_miss(k, DIGEST_KEY)]
        if garbled:
            raise DamagedFile(path, f"{where}its digest key reads {garbled[0]!r}", what_to_do)
        return obj
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    if obj[DIGEST_KEY] != _json_digest(body):
        raise DamagedFile(path, f"{where}the content does not match the digest recorded when it was written",
                          what_to_do)
    return body


# An indented array that holds no array or object: a list of unit ids, levels or figures, one element per line
# with indent=2 (a Bonsai run's rounds.json was 1.4 MB so). Its "[" is followed by a newline, which a JSON string
# cannot hold unescaped, so the match never starts inside a string, and the newlines it folds are all structural.
_SCALAR_ARRAY = re.compile(r"\[\n[^\[\]{}]*?\n *\]")


def write_json(path: str | os.PathLike, obj: Any, digest: bool = True) -> None:
    """Write `obj` atomically; a dict gets a `_digest` key that `read_json` checks (digest=False: a plain file
    for other programs, e.g. an exported checkpoint's configs)."""
    text = json.dumps(json.loads(_with_digest(obj, digest)), indent=2) if digest else \
        json.dumps(obj, indent=2, sort_keys=False, default=str)
    text = _SCALAR_ARRAY.sub(lambda m: "[" + re.sub(r"\n *", " ", m.group(0)[1:-1]).strip() + "]", text)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: str | os.PathLike, what_to_do: str | None = None) -> Any:
    """The JSON in `path`, checked against its digest (the `_digest` key is not returned). A file that is not
    valid JSON or does not match raises DamagedFile, one line naming the file and `what_to_do`."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text", what_to_do) from None
    except json.JSONDecodeError as ex:
        why = "empty" if not raw.strip() else f"not valid JSON: {ex.msg} at line {ex.lineno} column {ex.colno}"
        raise DamagedFile(path, f"cut short or garbled, {why}", what_to_do) from None
    return _verified(obj, path, what_to_do)


def read_cached_json(path: str | os.PathLike) -> Any | None:
    """A cache file's JSON, or None when it is missing or damaged (then removed, with a warning): the caller
    computes it again."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
    except DamagedFile as ex:
        log.warning("%s: damaged (%s); computing it again", ex.path, ex.why)
        Path(path).unlink(missing_ok=True)
        return None


def jsonl_line(obj: Any, digest: bool = True) -> str:
    return _with_digest(obj, digest) + "\n"


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    try:
        with open(path, "a") as f:
            f.write(jsonl_line(obj))
            f.flush()
            os.fsync(f.fileno())
    except OSError as ex:  # a torn last line is what scan_jsonl already expects of a killed append
        if no_space(ex):
            raise DiskFull(path) from ex
        raise


@dataclass
class JsonlScan:
    """A JSON-lines file read up to its first bad line: `lines` / `records` before it (digests checked and
    removed), `damage` what is wrong there (None: nothing), `torn` whether the unterminated last line of a
    killed append was left off (the normal end of a killed run, not damage)."""

    lines: list[str]
    records: list
    damage: DamagedFile | None = None
    damaged_line: int = 0
    dropped: int = 0  # lines at and after the damage
    torn: bool = False


def scan_jsonl(path: str | os.PathLike) -> JsonlScan:
    path = Path(path)
    raw = path.read_bytes()
    parts = raw.split(b"\n")
    last = parts.pop()  # b"" when the file ends with a newline, else an unterminated (torn) last line
    scan = JsonlScan([], [])
    for i, part in enumerate(parts + ([last] if last else [])):
        unterminated = i == len(parts)
        try:
            line = part.decode("utf-8")
            rec = _verified(json.loads(line), path, None, where=f"line {i + 1}: ") if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError, DamagedFile) as ex:
            if unterminated:  # a kill in the middle of an append
                scan.torn = True
                break
            scan.damage = ex if isinstance(ex, DamagedFile) else DamagedFile(
                path, f"line {i + 1}: cut short or garbled, not valid JSON")
            scan.damaged_line, scan.dropped = i + 1, len(parts) + bool(last) - i
            break
        if rec is None:  # a blank line
            continue
        scan.lines.append(line)
        scan.records.append(rec)
    return scan


def read_jsonl(path: str | os.PathLike, what_to_do: str | None = None) -> list:
    """Every record of a JSON-lines file, each line checked against its digest; the torn last line of a killed
    append is left off, any other bad line raises DamagedFile."""
    scan = scan_jsonl(path)
    if scan.damage is not None:
        raise DamagedFile(path, scan.damage.why, what_to_do)
    return scan.records


class KeyedLog:
    """Values computed one at a time and kept as JSON lines in `path` ({"context", "key", <field>}), so a killed
    run redoes only what is missing. A line counts only if its context (what the value depends on besides its
    key: data, settings, what a state means) matches, so a resumed run with other settings recomputes instead of
    reusing numbers that are not its own. A cut last line is dropped silently; a damaged line elsewhere (its
    digest does not match) is dropped with the lines after it, with a warning: those values are computed again."""

    def __init__(self, path: str | os.PathLike, context: Any, field: str = "value"):
        self.path, self.context, self.field = Path(path), stable_hash(context), field
        self.done: dict[str, Any] = {}
        if not self.path.exists():
            return
        scan = scan_jsonl(self.path)
        if scan.damage is not None:
            log.warning("%s: damaged (%s); dropping that line and the %d after it, which are computed again",
                        self.path, scan.damage.why, scan.dropped - 1)
        for rec in scan.records:
            if isinstance(rec, dict) and rec.get("context") == self.context and field in rec:
                self.done[rec["key"]] = rec[field]
        good = "".join(f"{line}\n" for line in scan.lines)
        if self.path.read_text(errors="replace") != good:  # or the next line would be glued to a cut one
            with atomic_path(self.path) as tmp:
                tmp.write_text(good)

    def add(self, key: str, value: Any) -> None:
        self.done[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, {"context": self.context, "key": key, self.field: value})


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
    memo = cache_root() / "file_hashes" / f"{stable_hash([str(p), st.st_size, st.st_mtime_ns])}.json"
    kept = read_cached_json(memo)
    if isinstance(kept, dict) and isinstance(kept.get("sha256_16"), str):
        return kept["sha256_16"]
    digest = file_hash(p)
    write_json(memo, {"path": str(p), "sha256_16": digest})
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


def close_progress_bars() -> None:
    """Close the bars an exception left open (their frames live on in its traceback), so that a message printed
    next starts on a line of its own instead of after a half-drawn bar."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
