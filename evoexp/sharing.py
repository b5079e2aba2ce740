"""Files that parallel jobs and several users share: a lock so that one job builds what the others wait for,
and the file mode a plain open() would give where a writer does otherwise."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def umask_permissions(out_dir: str | os.PathLike) -> None:
    """Give the `*.safetensors` files of a saved checkpoint the mode a plain open() gives (0666 & ~umask):
    safetensors >= 0.8.1 writes them 0600 whatever the umask (safetensors/safetensors#782), which locks a shared
    exported model to the user who saved it, unlike its config.json."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(out_dir).glob("*.safetensors"):
        os.chmod(f, 0o666 & ~umask)


@contextmanager
def exclusive(lock_file: str | os.PathLike, waiting_for: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (flock: the OS drops it when the process dies, even by kill -9, so a
    crash never leaves a stale lock). If another process holds it, say so in one line naming `waiting_for`, then
    wait. Where flock is missing (not POSIX) it does not lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is %s (lock %s): waiting for it", waiting_for, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
