"""Sweeps on a real SLURM cluster: `evoexp -m ... hydra/launcher=slurm` with the shipped profile, its resources
shrunk to the single-node cluster of `.ci/slurm_cluster.sh up` (skipped, with the reason, where it is not up; see
tests/slurm_cluster.py). The jobs are short EvoPress depth searches on the tiny model: the results equal the
basic launcher's, a preempted job is requeued and resumes from its checkpoint, a killed job fails the sweep in one
line and the relaunch runs only that job, and every job has its own run dir and W&B run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evoexp.utils import read_json
from tests.conftest import ROOT
from tests.slurm_cluster import PARTITION, cluster_env, job_id, job_state, slurm, wait_for, wait_idle

pytestmark = pytest.mark.slurm

SWEEP = "slurm_test"
# ~1 s per generation with two jobs on two cores: long enough to preempt a job mid-search, short enough that a job
# takes seconds. threads=1: one core per job (threads does not change results, nor the run dir's name).
JOB = ["model=tiny", "method=drop", "search=evopress_cpu", "search.generations=10", "search.offspring=8",
       "eval.windows=2", "fitness.report_tokens=2048", "dtype=float32", "threads=1", f"sweep_name={SWEEP}"]
# The shipped profile (conf/hydra/launcher/slurm.yaml) on this node. submitit takes a USR2 after min(0.8 T,
# T - 10 min) of a T-minute limit for a timeout (which uses up max_num_timeout), earlier for a preemption: with the
# 5-minute limit a test might pick, every signal would be a timeout.
SLURM = ["hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=60"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**cluster_env(), "EVOEXP_CACHE": str(tmp_path_factory.mktemp("cache")), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


@pytest.fixture(autouse=True)
def no_job_left(env):
    """A test that fails midway leaves no job behind to run into the next one."""
    yield
    if slurm("squeue", "-h", "-n", "evoexp", "-t", "pending,running").strip():
        slurm("scancel", "-n", "evoexp")
        wait_idle()


def command(args, launcher) -> list[str]:
    return [sys.executable, "-m", "evoexp", "-m", *JOB, *args, *launcher]


def sweep(out: Path, *args: str, env: dict, launcher=SLURM) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, launcher), env={**os.environ, **env, "EVOEXP_OUT": str(out)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


class Started:
    """`evoexp -m` going on in the background, its output in files (a pipe nobody reads could fill and block it)."""

    def __init__(self, out: Path, *args: str, env: dict):
        self.stdout, self.stderr = out.parent / f"{out.name}.out", out.parent / f"{out.name}.err"
        with self.stdout.open("w") as stdout, self.stderr.open("w") as stderr:
            self.proc = subprocess.Popen(command(args, SLURM), env={**os.environ, **env, "EVOEXP_OUT": str(out)},
                                         cwd=ROOT, stdout=stdout, stderr=stderr, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float) -> tuple[int, str]:
        """Its exit code and stderr, once it ends (fails the test if that takes over `timeout` seconds)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"evoexp -m still running after {timeout:.0f} s; stderr: {self.stderr.read_text()[-2000:]}")
        return self.proc.returncode, self.stderr.read_text()


def sweep_dir(out: Path) -> Path:
    return out / "sweeps" / SWEEP


def run_dir(out: Path, seed: int) -> Path | None:
    """The job's run dir: named after its overrides, the same under every launcher (seed sorts last)."""
    found = list(sweep_dir(out).glob(f"*,seed={seed}"))
    assert len(found) <= 1, found
    return found[0] if found else None


def generations(run: Path) -> int:
    history = run / "history.jsonl"
    return len(history.read_text().splitlines()) if history.exists() else 0


def job_log(run: Path) -> str:
    """What the job printed, over all its starts: submitit's stdout and stderr files of its SLURM job."""
    job = job_id(run)
    return "".join(p.read_text() for p in sorted((run.parent / ".submitit" / job).glob(f"{job}_0_log.*")))


def outcome(run: Path) -> tuple[dict, list]:
    """What a run found and measured: result.json and the search history without times, places, digests and
    provenance (a PPL figure read from the dense cache carries its cache key: only its numbers are compared)."""
    def strip(x):
        if isinstance(x, dict) and "nll" in x:
            return {k: x[k] for k in ("ppl", "nll", "predicted_tokens")}
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "cached", "resumed", "_digest")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    result = read_json(run / "result.json")
    kept = strip({k: v for k, v in result.items() if k not in ("started", "finished", "run_dir", "timings",
                                                                "timings_nested", "memory", "git_sha", "_digest")})
    kept["config"].pop("logger")
    return kept, [strip(json.loads(line)) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def basic(env, tmp_path_factory):
    """The reference: seeds 0 and 1 one after another in this process's launcher (Hydra's basic one)."""
    out = tmp_path_factory.mktemp("basic")
    done = sweep(out, "seed=0,1", "logger=none", env=env, launcher=[])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def on_slurm(env, tmp_path_factory):
    """Seeds 0 and 1 as one SLURM job array, each job logging to W&B (offline)."""
    out = tmp_path_factory.mktemp("slurm")
    done = sweep(out, "seed=0,1", "logger=wandb", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_sweep_on_slurm_gives_the_basic_launchers_results(basic, on_slurm):
    for seed in (0, 1):
        assert outcome(run_dir(on_slurm, seed)) == outcome(run_dir(basic, seed))
    # each job ran this virtualenv's python (submitit submits sys.executable)
    scripts = list((sweep_dir(on_slurm) / ".submitit").rglob("*_submission.sh"))
    assert scripts and all(f" {sys.executable} -u -m submitit" in s.read_text() for s in scripts)


def test_each_job_has_its_own_run_dir_and_wandb_run(on_slurm):
    runs = [run_dir(on_slurm, seed) for seed in (0, 1)]
    assert runs[0] != runs[1] and all(r.parent == sweep_dir(on_slurm) for r in runs)
    wandb_ids, jobs = set(), set()
    for run in runs:
        assert read_json(run / "result.json")["run_dir"] == str(run)
        wandb_id = (run / "wandb_id.txt").read_text().strip()
        offline = list((run / "wandb").glob("offline-run-*"))
        assert [p.name.rsplit("-", 1)[1] for p in offline] == [wandb_id]
        assert (offline[0] / f"run-{wandb_id}.wandb").stat().st_size > 0
        wandb_ids.add(wandb_id)
        jobs.add(job_id(run))
    assert len(wandb_ids) == 2 and len(jobs) == 2  # two W&B runs, two SLURM array tasks


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(env, basic, tmp_path):
    out = tmp_path / "out"
    started = Started(out, "seed=1", "logger=none", env=env)
    run = wait_for("the job's run dir", lambda: run_dir(out, 1))
    wait_for("two generations", lambda: generations(run) >= 2 or not started.running())
    job = job_id(run)
    assert job_state(job) == "RUNNING" and generations(run) < 10, "the search ended before it was preempted"
    slurm("scancel", "--signal=USR2", job)  # how SLURM preempts: submitit checkpoints and requeues the job
    wait_for("the job to be requeued", lambda: job_state(job) == "PENDING", timeout=60)
    assert not (run / "FAILED").exists()  # preempted, not failed
    returncode, stderr = started.finish(timeout=180)
    assert returncode == 0, stderr[-3000:]
    assert "Restarts=1" in slurm("scontrol", "show", "job", job)
    log = job_log(run)
    assert "this job is preempted" in log and f"Requeued job {job}" in log
    assert "resuming search at generation" in log  # the requeued job went on from its checkpoint
    assert "resuming search at generation" in (run / "evoexp.log").read_text()
    assert outcome(run) == outcome(run_dir(basic, 1))  # what the uninterrupted job found


def test_a_killed_job_fails_the_sweep_in_one_line_and_the_relaunch_runs_only_it(env, basic, tmp_path):
    out = tmp_path / "out"
    for seed in (0, 1):  # two jobs of the sweep finished earlier (here by the basic launcher)
        shutil.copytree(run_dir(basic, seed), sweep_dir(out) / run_dir(basic, seed).name)
    finished = {seed: run_dir(out, seed) / "result.json" for seed in (0, 1)}
    before = {seed: (f.read_bytes(), f.stat().st_mtime_ns) for seed, f in finished.items()}
    args = ("seed=3,0,1", "logger=none")  # seed 3 first: the array's task 0, which starts at once
    started = Started(out, *args, env=env)
    run = wait_for("the job's run dir", lambda: run_dir(out, 3))
    wait_for("a generation", lambda: generations(run) >= 1 or not started.running())
    job = job_id(run)
    assert job_state(job) == "RUNNING", "the search ended before it was killed"
    slurm("scancel", job)
    returncode, stderr = started.finish(timeout=150)  # the sweep fails instead of waiting for a result
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"evoexp: error: a SLURM job of the sweep ended without a result: Job {job} (task: 0)")
    assert "(state: CANCELLED)" in last and "relaunching the same command" in last
    assert not (run / "result.json").exists()
    wait_idle()  # the sweep's other jobs go on after it failed
    finishes = {seed: (f.parent / "evoexp.log").read_text().count("already finished") for seed, f in finished.items()}

    again = sweep(out, *args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    for seed, f in finished.items():
        assert (f.read_bytes(), f.stat().st_mtime_ns) == before[seed]  # reported, not recomputed
        assert (f.parent / "evoexp.log").read_text().count("already finished") == finishes[seed] + 1
    assert read_json(run / "result.json")["status"] == "done"
    assert "resuming search at generation" in (run / "evoexp.log").read_text()  # from the killed job's checkpoint
