"""Running evoexp (or any tool) from a bench script without hiding its progress bars."""
from __future__ import annotations

import subprocess
import sys
import threading

TIMED_OUT = -9  # the exit code run_showing_progress returns for a command it stopped at its timeout


def run_showing_progress(cmd: list[str], env: dict, timeout: float | None = None) -> tuple[int, str]:
    """Run `cmd` with its progress bars on our stderr (a database or search takes hours); (exit code, stderr tail).
    With `timeout` (seconds), a command still running then is killed and the exit code is TIMED_OUT."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill) if timeout is not None else None
    if timer is not None:
        timer.start()
    tail = b""
    try:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # chunks, not lines: tqdm redraws with \r
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4096:]
        code = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    return code, tail.decode(errors="replace")
