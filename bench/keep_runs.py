"""Copy the finished runs of a sweep (or any tree of run dirs) to another tree: into the repo, so a sweep too long
for one session keeps its finished jobs, and back into `outputs/`, so the re-launched sweep skips them.

A run is finished when its `result.json` says so. Its small files are copied (result, config, allocation,
history, figures, log; nothing over --max-mb, no response caches), with their paths relative to SRC; a run
already finished in DEST is left alone. Databases live in the cache and are not part of a run. evoexp refuses
to report a kept run whose settings differ from the re-launched job's (e.g. `dtype=auto` resolved to another
dtype on another CPU), so a table never mixes them silently.
Usage: .venv/bin/python bench/keep_runs.py outputs/sweeps/cpu_depth_table bench/results/sweeps/cpu_depth_table
       .venv/bin/python bench/keep_runs.py bench/results/sweeps/cpu_depth_table outputs/sweeps/cpu_depth_table
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SKIP_DIRS = {"zeroshot_requests"}


def finished(run: Path) -> bool:
    try:
        return json.loads((run / "result.json").read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def keep(src: Path, dest: Path, max_bytes: int) -> tuple[int, int]:
    copied = present = 0
    for result in sorted(src.rglob("result.json")):
        run = result.parent
        if not finished(run):
            continue
        target = dest / run.relative_to(src)
        if finished(target):
            present += 1
            continue
        for f in sorted(run.rglob("*"), key=lambda f: f.name == "result.json"):  # result last: it marks done
            rel = f.relative_to(run)
            if f.is_file() and not SKIP_DIRS & set(rel.parts) and f.stat().st_size <= max_bytes:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target / rel.parent / (rel.name + ".tmp"))
                (target / rel.parent / (rel.name + ".tmp")).rename(target / rel)
        copied += 1
    return copied, present


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--max-mb", type=float, default=5.0, help="larger files are not copied")
    args = ap.parse_args()
    if not args.src.is_dir():
        raise SystemExit(f"{args.src}: no such directory")
    copied, present = keep(args.src, args.dest, int(args.max_mb * 2**20))
    print(f"{copied} finished runs copied to {args.dest}, {present} already there")


if __name__ == "__main__":
    main()
