"""Copy the runs of a sweep (or any tree of run dirs) to another tree: into the repo, so a sweep too long for one
session keeps its work, and back into `outputs/`, so the re-launched sweep skips the finished jobs and resumes
the unfinished ones where they stopped.

A run is finished when its `result.json` says so; it is unfinished when it holds progress (`search_state.json`,
`history.jsonl` or `scores/`, with the `progress_config.json` they were made under). Its small files are copied
(result, config, allocation, history, scores, search state, Bonsai's rounds, figures, log; nothing over --max-mb, no response
caches), with their paths relative to SRC. A run finished in DEST is left alone; an unfinished one is replaced only
by a finished run or by one further on (more history and score lines), so copying the wrong way round loses
nothing. Each run dir is written whole beside its target and then swapped in. Databases live in the cache and are
not part of a run. evoexp refuses to report or resume a kept run whose settings differ from the re-launched job's
(e.g. `dtype=auto` resolved to another dtype on another CPU), so a table never mixes them silently.
Usage: .venv/bin/python bench/keep_runs.py outputs/sweeps/cpu_depth_table bench/results/sweeps/cpu_depth_table
       .venv/bin/python bench/keep_runs.py bench/results/sweeps/cpu_depth_table outputs/sweeps/cpu_depth_table
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from evoexp.run import PROGRESS  # what evoexp resumes from (a post-training checkpoint is over --max-mb: redone)

SKIP_DIRS = {"zeroshot_requests"}


def finished(run: Path) -> bool:
    try:
        return json.loads((run / "result.json").read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def unfinished(run: Path) -> bool:
    return (not finished(run) and (run / "progress_config.json").is_file()
            and any((run / name).exists() for name in PROGRESS))


def progress(run: Path) -> int:
    """How far an unfinished run got: its generations and scored candidates / sub-models (one line each)."""
    files = [run / "history.jsonl", *sorted((run / "scores").glob("*.jsonl")), *sorted((run / "bonsai").glob("*"))]
    return sum(f.read_bytes().count(b"\n") for f in files if f.is_file())


def runs(src: Path) -> list[Path]:
    """Every run dir under src: those with a result, a config record or progress."""
    marks = ("result.json", "progress_config.json")
    found = {f.parent for mark in marks for f in src.rglob(mark)}
    return sorted(r for r in found if not r.name.endswith((".tmp", ".old")))  # not a copy cut short by a kill


def copy_run(run: Path, target: Path, max_bytes: int) -> None:
    """Write the run's small files into a fresh dir beside target, then swap it in (no half-copied run)."""
    fresh, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for d in (fresh, old):
        shutil.rmtree(d, ignore_errors=True)
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if f.is_file() and not SKIP_DIRS & set(rel.parts) and f.stat().st_size <= max_bytes:
            (fresh / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, fresh / rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def keep(src: Path, dest: Path, max_bytes: int) -> dict[str, int]:
    counts = {"finished": 0, "unfinished": 0, "already there": 0}
    for run in runs(src):
        target = dest / run.relative_to(src)
        if finished(run):
            kind, wanted = "finished", not finished(target)
        elif unfinished(run):
            kind, wanted = "unfinished", not finished(target) and (not unfinished(target)
                                                                   or progress(run) > progress(target))
        else:
            continue  # started but nothing to resume: the re-launched job starts it again anyway
        if wanted:
            copy_run(run, target, max_bytes)
            counts[kind] += 1
        else:
            counts["already there"] += 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--max-mb", type=float, default=5.0, help="larger files are not copied")
    args = ap.parse_args()
    if not args.src.is_dir():
        raise SystemExit(f"{args.src}: no such directory")
    counts = keep(args.src, args.dest, int(args.max_mb * 2**20))
    print(f"copied to {args.dest}: {counts['finished']} finished runs, {counts['unfinished']} unfinished runs "
          f"(with their progress); {counts['already there']} as far or further there already")


if __name__ == "__main__":
    main()
