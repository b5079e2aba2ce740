"""Wall time and peak memory of a run over every process that worked on it: a run killed and resumed (SIGINT,
a SLURM requeue, a new session) reports the time all its parts took, not its last part's. Each timed step
appends one line to `<run dir>/timings.jsonl` when it ends (also when it is interrupted; a step cut by kill -9
counts from its restart); the result sums them per step and takes the largest peak."""
from __future__ import annotations

import logging
from pathlib import Path

from evoexp.utils import append_jsonl, peak_memory, scan_jsonl

TIMINGS = "timings.jsonl"
log = logging.getLogger(__name__)


def record_step(out_dir: Path, key: str, seconds: float) -> None:
    try:
        append_jsonl(out_dir / TIMINGS, {"key": key, "seconds": seconds, **peak_memory()})
    except OSError as ex:  # the record is a report: it never costs the run (nor hides what stopped it)
        log.warning("%s: step time not recorded (%s)", out_dir / TIMINGS, ex)


def run_totals(out_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """({step: seconds summed over every process}, {peak_rss_mib / peak_cuda_mib: the largest}), this process's
    peak included."""
    path = out_dir / TIMINGS
    records = []
    if path.exists():
        scan = scan_jsonl(path)
        if scan.damage is not None:
            log.warning("%s: %s; the step times before it are reported", path, scan.damage.why)
        records = scan.records
    timings: dict[str, float] = {}
    peak = peak_memory()
    for rec in records:
        timings[rec["key"]] = round(timings.get(rec["key"], 0.0) + rec["seconds"], 2)
        for k, v in rec.items():
            if k.startswith("peak_"):
                peak[k] = max(peak.get(k, 0.0), v)
    return timings, peak
