"""Wall time and peak memory of a run over every process that worked on it: a run killed and resumed (SIGINT,
a SLURM requeue, a new session) reports the time all its parts took, not its last part's. Each timed step
appends one line to `<run dir>/timings.jsonl` when it ends (also when it is interrupted; a step cut by kill -9
counts from its restart) with the process's peak memory so far and the step it ran inside, if any (a database
built for the search is timed inside "search"); the result sums them per step, takes the largest peak overall
and per step (the tables give a one-shot row the peak of the steps before training), and keeps apart the
seconds already counted in an enclosing step, so a run's total counts each second once."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from evoexp.utils import append_jsonl, scan_jsonl

TIMINGS = "timings.jsonl"
# Records written before steps named the step around them: these keys were always timed inside another step
# (DatabaseProvider builds inside "search" or "reference_<name>").
NESTED_BEFORE_WITHIN = ("database",)
log = logging.getLogger(__name__)


def peak_memory() -> dict:
    """This process's peak resident memory (and the peak CUDA allocation, where torch saw a GPU), in MiB."""
    import resource  # Unix only: importing evoexp.timings must not need it

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def record_step(out_dir: Path, key: str, seconds: float, within: str | None = None) -> None:
    rec = {"key": key, "seconds": seconds, **peak_memory(), **({"within": within} if within else {})}
    try:
        append_jsonl(out_dir / TIMINGS, rec)
    except OSError as ex:  # the record is a report: it never costs the run (nor hides what stopped it)
        log.warning("%s: step time not recorded (%s)", out_dir / TIMINGS, ex)


def step_records(out_dir: Path) -> list[dict]:
    """Every step record of the run dir (a damaged line costs only the records from it on, with a warning)."""
    path = out_dir / TIMINGS
    if not path.exists():
        return []
    scan = scan_jsonl(path)
    if scan.damage is not None:
        log.warning("%s: %s; the step times before it are reported", path, scan.damage.why)
    return scan.records


@dataclass
class StepTotals:
    seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds summed over every process
    nested: dict[str, float] = field(default_factory=dict)  # step -> the part of them inside another step
    # step -> its largest peak_rss_mib; None where one of its records has none (one restored by hand from a log
    # that kept only the seconds): not known, and a smaller figure would pass for it
    peaks: dict[str, float | None] = field(default_factory=dict)

    def total(self, steps) -> float:
        """Seconds of `steps`, each second once (a nested step's are in its enclosing step's already)."""
        return round(sum(self.seconds.get(k, 0.0) - self.nested.get(k, 0.0) for k in steps), 2)


def enclosing_step(rec: dict) -> str | None:
    """The step a record's seconds were timed inside, None for a top-level step. A record from before steps named
    it: a "database" build, taken as the search's (where most were built; a reference baseline's build is rare)."""
    if "within" in rec:
        return rec["within"]
    return "search" if rec["key"].startswith(NESTED_BEFORE_WITHIN) else None


def step_totals(records: list[dict]) -> StepTotals:
    out = StepTotals()
    for rec in records:
        key, peak = rec["key"], rec.get("peak_rss_mib")
        out.seconds[key] = round(out.seconds.get(key, 0.0) + rec["seconds"], 2)
        if enclosing_step(rec) is not None:
            out.nested[key] = round(out.nested.get(key, 0.0) + rec["seconds"], 2)
        known = key not in out.peaks or out.peaks[key] is not None
        out.peaks[key] = max(out.peaks.get(key) or 0.0, peak) if known and peak is not None else None
    return out


def run_totals(out_dir: Path) -> tuple[StepTotals, dict[str, float]]:
    """(the run's step totals, {peak_rss_mib / peak_cuda_mib: the largest of every process, this one's
    included})."""
    records = step_records(out_dir)
    peak = peak_memory()
    for rec in records:
        for k, v in rec.items():
            if k.startswith("peak_") and v is not None:
                peak[k] = max(peak.get(k, 0.0), v)
    return step_totals(records), peak
