"""Running evoexp (or any tool) from a bench script without hiding its progress bars."""
from __future__ import annotations

import subprocess
import sys


def run_showing_progress(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run `cmd` with its progress bars on our stderr (a database or search takes hours); (exit code, stderr tail)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # chunks, not lines: tqdm redraws with \r
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    return proc.wait(), tail.decode(errors="replace")
