"""The single-node SLURM cluster of `.ci/slurm_cluster.sh` as the `slurm` tests see it (tests/test_slurm.py).

`.ci/run` starts it (as root on Debian) before the test suite and stops it afterwards. Elsewhere the tests are
skipped with the reason, unless EVOEXP_REQUIRE_SLURM=1 (set by `.ci/run`), which turns the skip into a failure so
that CI cannot pass without running them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

STATE = Path(os.environ.get("EVOEXP_SLURM_DIR", "/tmp/evoexp-slurm"))  # where `.ci/slurm_cluster.sh up` writes
PARTITION = "debug"
REQUIRE = "EVOEXP_REQUIRE_SLURM"
UP = "`bash .ci/slurm_cluster.sh up` as root starts a single-node one on Debian"


def why_not_up() -> str | None:
    """Why the fixture cluster cannot run jobs now (None: it can)."""
    if shutil.which("sbatch") is None:
        return f"sbatch not found: the slurm tests need a SLURM cluster; {UP}"
    if not (STATE / "bin" / "sacct").exists():
        return f"the single-node SLURM cluster is not up ({STATE}/bin/sacct missing); {UP}"
    try:
        out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 30 s: slurmctld is not running; {UP}"
    states = out.stdout.split()
    if out.returncode or not states or not all(s in ("idle", "mixed", "allocated") for s in states):
        return (f"partition {PARTITION} cannot run jobs (sinfo: {(out.stdout + out.stderr).strip() or 'nothing'}); "
                f"{UP}")
    return None


def cluster_env() -> dict[str, str]:
    """Environment additions for commands that submit to the cluster (its sacct stand-in first on PATH); skips
    (or, under EVOEXP_REQUIRE_SLURM=1, fails) the calling test when the cluster is not up."""
    reason = why_not_up()
    if reason is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return {"PATH": f"{STATE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


def job_state(job_id: str) -> str:
    """The job's SLURM state (PENDING, RUNNING, COMPLETED, CANCELLED, ...); finished jobs stay listed (MinJobAge)."""
    return slurm("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").strip()


def job_id(run_dir: Path) -> str:
    """The SLURM job (array task) that runs a sweep's run dir, as Hydra recorded it (`hydra.job.id`)."""
    return str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.1):
    """Poll `check()` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_idle(timeout: float = 120.0) -> None:
    """Until no job is queued or running (a failed multirun leaves the sweep's other jobs going on)."""
    wait_for("the queue to empty", lambda: not slurm("squeue", "-h", "-t", "pending,running,completing").strip(),
             timeout, every=0.5)
