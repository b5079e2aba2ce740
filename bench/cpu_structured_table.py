"""`experiment=cpu_structured_table` job by job, most needed first, in parallel lanes, keeping every job's work in
the repo: the sweep takes several sessions on 2 cores, so it is run as a queue that a session can stop and the
next one resume.

Each job is the sweep's own (`evoexp -m experiment=cpu_structured_table seed=S search=X method.target=T
dtype=float32 threads=1`: the same run dir as the full multirun's, so `evoexp-table` reads them together);
`dtype=float32` pins what `auto` gives on an AVX2-only CPU, so sessions on other CPUs add to the same table.
Before starting, the kept runs are put back into outputs/ (bench/keep_runs.py); after each job, and when stopped,
they are kept again. `--stop-at HH:MM` (UTC) stops the running jobs with SIGINT at that time (evoexp keeps its
finished steps) so a session can end cleanly.
Order: 50 % for seeds 0, 1, 2 (DarwinLM first: the longest), then 20 %, EvoPress at 20 % last (`optional`).
Usage: .venv/bin/python bench/cpu_structured_table.py [--lanes 2] [--stop-at 21:05] [--only-target 0.5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import signal
import subprocess
import sys
import time
from pathlib import Path

from keep_runs import finished, keep as keep_tree  # bench/ is on sys.path when a script here runs

from evoexp.utils import cache_root, read_cached_json

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "outputs" / "sweeps" / "cpu_structured_table"
KEPT = ROOT / "bench" / "results" / "sweeps" / "cpu_structured_table"
SEARCHES = ["darwinlm_cpu", "uniform", "evopress_darwinlm_cpu", "bonsai_cpu", "bonsai_prior_cpu",
            "bonsai_random_cpu"]
FIXED = ["experiment=cpu_structured_table", "dtype=float32"]
NEEDS_DATABASE = {"darwinlm_cpu", "uniform", "evopress_darwinlm_cpu"}  # the rest (Bonsai's) use none


def queue(targets: list[float]) -> list[list[str]]:
    jobs = [[*FIXED, f"seed={seed}", f"search={search}", f"method.target={target:g}"]
            for target in targets for seed in (0, 1, 2) for search in SEARCHES]
    return sorted(jobs, key=optional)  # stable: the order above within each group


def optional(job: list[str]) -> bool:
    """EvoPress without training-aware selection is required at 50 % only (issue 34's ablation; issue 35's
    20 % rows are Bonsai's and its baselines'): at 20 % it runs after every required job."""
    return "search=evopress_darwinlm_cpu" in job and "method.target=0.2" in job


def run_dir(job: list[str]) -> Path:
    return SWEEP / ",".join(sorted(job))  # evoexp names a sweep job's dir after its sorted overrides


def database_ready() -> bool:
    """A complete ZipLM database of the embedded model is in the cache: every job that uses one shares it."""
    for manifest in (cache_root() / "databases").glob("smollm2_135m-structured-ziplm-*/manifest.json"):
        stored = read_cached_json(manifest)
        if isinstance(stored, dict) and stored.get("complete"):
            return True
    return False


def next_job(todo: list[list[str]], running: list[list[str]]) -> list[str] | None:
    """The first job that may start: while the shared database is being built by a running job, the other lanes
    take jobs that do not need it (two lanes building the same database would each take the whole build)."""
    needs = lambda job: any(f"search={s}" in job for s in NEEDS_DATABASE)  # noqa: E731
    building = any(needs(job) for job in running) and not database_ready()
    return next((job for job in todo if not (building and needs(job))), None)


def keep(src: Path, dest: Path) -> None:
    print("kept:", keep_tree(src, dest, 5 * 2**20), flush=True)


def launch(job: list[str], log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / (",".join(job[2:]).replace("/", "_") + ".log"), "ab")
    print(time.strftime("%H:%M:%S"), "start", " ".join(job[2:]), flush=True)
    return subprocess.Popen([str(Path(sys.executable).with_name("evoexp")), "-m", *job, "threads=1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=default_sigint)


def default_sigint() -> None:
    """A script started with `&` from a non-interactive shell ignores SIGINT, and so would the jobs it starts
    (Python keeps an ignored SIGINT ignored): give them the default, so --stop-at's SIGINT stops them cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--stop-at", help="HH:MM UTC: SIGINT the running jobs then")
    ap.add_argument("--only-target", type=float, nargs="*", default=[0.5, 0.2])
    args = ap.parse_args()
    stop = None
    if args.stop_at:
        h, m = map(int, args.stop_at.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        stop = now.replace(hour=h, minute=m, second=0, microsecond=0)
        stop += dt.timedelta(days=1) if stop < now else dt.timedelta()
    if KEPT.exists():
        keep(KEPT, SWEEP)
    log_dir = ROOT / "outputs" / "bench" / "cpu_structured_table_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in queue(args.only_target) if not finished(run_dir(j))]
    running: list[tuple[list[str], subprocess.Popen]] = []
    while todo or running:
        if stop is not None and dt.datetime.now(dt.timezone.utc) >= stop:
            for _, p in running:
                p.send_signal(signal.SIGINT)
            for _, p in running:
                p.wait()
            print("stopped at", args.stop_at, "with", len(todo) + len(running), "jobs left", flush=True)
            break
        while len(running) < args.lanes:
            job = next_job(todo, [j for j, _ in running])
            if job is None:
                break
            todo.remove(job)
            running.append((job, launch(job, log_dir)))
        time.sleep(5)
        for job, p in [r for r in running if r[1].poll() is not None]:
            running.remove((job, p))
            print(time.strftime("%H:%M:%S"), "exit", p.returncode, " ".join(job[2:]), flush=True)
            keep(SWEEP, KEPT)
    keep(SWEEP, KEPT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
