"""User-facing errors: the CLI prints these as one line, never as a traceback; and the range checks that raise
them in the house style, `key: expected ..., got X`."""
from __future__ import annotations

import errno
from typing import Any, NoReturn


class UserError(Exception):
    """A mistake in the input (config, path, data), explained in one line that names the key or file."""


class Stop(Exception):
    """A job that ends early by design (e.g. one shard of a database built): reported in one line, exit 0."""


# A full disk (or quota) shows up as an OSError from Python, but as other exceptions from the libraries that write
# through their own I/O (safetensors' Rust writer, torch's zip writer): their messages carry the OS's words.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


def no_space(ex: BaseException | None) -> bool:
    """Whether `ex`, or an exception it was raised from or while handling, is a full disk."""
    seen = set()
    while ex is not None and id(ex) not in seen:
        seen.add(id(ex))
        if isinstance(ex, OSError) and ex.errno in NO_SPACE_ERRNOS or any(w in str(ex) for w in NO_SPACE_WORDS):
            return True
        ex = ex.__cause__ or ex.__context__
    return False


class DiskFull(UserError):
    """Writing a file failed for want of space. Every write is atomic, so nothing half-written is left to
    mislead a rerun: free space and run the same command again to go on from the last finished step."""

    def __init__(self, path: Any = None):
        where = f"{path}: " if path else ""
        super().__init__(f"{where}no space left on device; free space (or point EVOEXP_CACHE / EVOEXP_OUT at a "
                         "larger disk) and run the same command again: finished work is kept")


def fail(key: str, expected: str, got: Any) -> NoReturn:
    raise UserError(f"{key}: expected {expected}, got {got}")


def check_min(value, key: str, low, *, null: bool = False) -> None:
    """`value >= low` (null allowed when `null`)."""
    if value is None and null:
        return
    if value is None or not value >= low:  # `not >=` also catches nan
        fail(key, f">= {low:g}" + (" or null" if null else ""), value)


def check_positive(value, key: str, *, null: bool = False) -> None:
    """A count: an integer >= 1 (null allowed when `null`)."""
    check_min(value, key, 1, null=null)


def check_above(value, key: str, low: float = 0.0) -> None:
    if value is None or not value > low:
        fail(key, f"> {low:g}", value)


def check_choice(value, key: str, choices) -> None:
    if value not in choices:
        fail(key, f"one of {', '.join(str(c) for c in choices)}", repr(value))


def check_tokens(value, key: str) -> None:
    """A number of calibration tokens: a 1-token window predicts nothing, so at least 2."""
    check_min(value, key, 2)
