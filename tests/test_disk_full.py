"""A full disk (issue 31): the run stops with one line naming the file it could not write and exit 2, no
traceback; after space is freed the same command finishes with the result of a run that never ran out of space.

The disks are real: small tmpfs mounts (root only; skipped elsewhere with the reason), one for EVOEXP_CACHE
(the token cache does not fit) and one for EVOEXP_OUT (filled so that the run dir runs out part-way).
"""
import json
import subprocess

import pytest

from tests.conftest import run_cli
from tests.test_interrupts import SEARCH, outcome


def _mount(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(name, size)` mounts a tmpfs of `size` at tmp_path/name; all are unmounted at the end."""
    mounted = []

    def mount(name: str, size: str):
        path = tmp_path / name
        if not _mount(path, size):
            pytest.skip("needs root to mount a small tmpfs as a disk that fills up")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _assert_disk_full_line(out, under) -> None:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = lines[-1].split("\r")[-1]  # a progress bar may share the line, ended by a carriage return
    assert last.startswith(f"evoexp: error: {under}/"), out.stderr[-3000:]
    assert "no space left on device; free space" in last and "run the same command again" in last


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The same search on a disk with room: cache and run dir."""
    root = tmp_path_factory.mktemp("clean")
    env = {"EVOEXP_CACHE": str(root / "cache")}
    out = run_cli(*SEARCH, "dtype=float32", f"hydra.run.dir={root}/run", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return root


def test_a_full_cache_disk_is_one_line_and_the_rerun_after_freeing_space_finishes(clean, small_disk):
    cache = small_disk("cache", "2m")  # the tokenized text alone is larger
    run = cache.parent / "run"
    args = [*SEARCH, "dtype=float32", f"hydra.run.dir={run}"]
    full = run_cli(*args, env={"EVOEXP_CACHE": str(cache)})
    _assert_disk_full_line(full, cache)
    assert not list(cache.rglob("*.tmp")), "a half-written temp file was left"
    subprocess.run(["mount", "-o", "remount,size=200m", str(cache)], check=True)
    again = run_cli(*args, env={"EVOEXP_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert outcome(run) == outcome(clean / "run")


def test_a_run_dir_disk_filling_part_way_is_one_line_and_the_rerun_goes_on(clean, small_disk):
    out_disk = small_disk("out", "1m")
    filler = out_disk / "filler"
    filler.write_bytes(b"\0" * (1024 - 24) * 1024)  # 24 KiB left: the run dir outgrows it part-way through
    run = out_disk / "run"
    args = [*SEARCH, "dtype=float32", f"hydra.run.dir={run}"]
    env = {"EVOEXP_CACHE": str(clean / "cache")}
    full = run_cli(*args, env=env)
    _assert_disk_full_line(full, out_disk)
    assert not (run / "result.json").exists()
    filler.unlink()
    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert outcome(run) == outcome(clean / "run")
    assert json.loads((run / "result.json").read_text())["objective"] is not None
    assert (run / "figures").is_dir()
