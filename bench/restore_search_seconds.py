"""Restore a run's search seconds that its timings.jsonl lost, from the search's own per-generation log.

A step's time is recorded when the step ends, also on SIGINT / SIGTERM; a process killed hard inside its search
(kill -9, a machine taken back) loses that part. Run dirs kept before keep_runs.py kept timings.jsonl lost all of
theirs. EvoPress / DarwinLM keep every generation's seconds in history.jsonl and Bonsai every round's in
bonsai/rounds.json; where they sum to more than the recorded search steps, this appends one record of the
difference, marked `restored_from`, with no peak memory (not known: the tables leave that run's peak out).
The difference is a lower bound (work outside generations and rounds, and redone parts, are not in those logs).

    python bench/restore_search_seconds.py RUN_OR_SWEEP_DIR... [--dry-run]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evoexp.timings import TIMINGS, enclosing_step, step_records, step_totals
from evoexp.utils import append_jsonl, read_json, read_jsonl

MIN_SECONDS = 60.0  # less than this apart: the logs agree within what a resume costs


def logged_search_seconds(run_dir: Path) -> tuple[float, str] | None:
    """(seconds the search's own log holds, that log's name), None where the run keeps none."""
    if (run_dir / "history.jsonl").exists():
        return sum(r["seconds"] for r in read_jsonl(run_dir / "history.jsonl")), "history.jsonl"
    if (run_dir / "bonsai" / "rounds.json").exists():
        return sum(r["seconds"] for r in read_json(run_dir / "bonsai" / "rounds.json")["rounds"]), "bonsai/rounds.json"
    return None


def restore(run_dir: Path, dry_run: bool) -> str | None:
    """Append the lost seconds of a finished run (one still running has its search's record to come)."""
    done = run_dir / "result.json"
    if not done.exists() or read_json(done).get("status") != "done":
        return None
    records = step_records(run_dir)
    logged = logged_search_seconds(run_dir)
    if logged is None or any("restored_from" in r for r in records):
        return None
    inner = sum(r["seconds"] for r in records if enclosing_step(r) == "search")  # e.g. a database build
    recorded = round(step_totals(records).seconds.get("search", 0.0) - inner, 2)
    missing = round(logged[0] - recorded, 2)
    if missing < MIN_SECONDS:
        return None
    if not dry_run:
        append_jsonl(run_dir / TIMINGS, {"key": "search", "seconds": missing, "restored_from": logged[1]})
    return f"{run_dir.name}: search recorded {recorded:.0f} s, {logged[1]} {logged[0]:.0f} s: +{missing:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    for p in map(Path, args.paths):
        for run_dir in sorted({f.parent for f in p.rglob(TIMINGS)} | ({p} if (p / TIMINGS).exists() else set())):
            line = restore(run_dir, args.dry_run)
            if line:
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
