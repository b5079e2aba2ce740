"""How long each command of the README's "Using it" block takes on this machine: run one after the other, the
way a user types them, from one cache that starts empty (so the first command pays the embedded model's
conversion, as a user's first command does), each into its own output dir under outputs/readme_durations/.

Long commands span sessions: when this script's time budget runs out it stops the running command with SIGINT
(evoexp keeps every finished step) and records the seconds so far; run again, it resumes the same command in
the same dir and adds the time (a resume re-pays only the start-up: loading the model and the teacher). Every
record is written at once to bench/results/readme_durations.json with the CPU it was measured on; a command is
resumed only on a CPU of the same kind. Commands that need a GPU or the Hub are listed but not run.
Usage: .venv/bin/python bench/readme_durations.py [--budget-min 60] [--only ID ...] [--redo ID ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "readme_durations.json"
WORK = ROOT / "outputs" / "readme_durations"
EVOEXP = str(Path(sys.executable).with_name("evoexp"))

# (id, the README's arguments): in the README's order
COMMANDS = [
    ("main_job", []),
    ("dense_quick", ["method=dense", "search=none"]),
    ("tiny_evopress", ["model=tiny", "method=drop", "method.target=0.25", "search=evopress", "search.generations=2",
                       "logger=none"]),
    ("tiny_shortgpt", ["model=tiny", "method=drop", "method.target=0.25", "search=shortgpt", "logger=none"]),
    ("oneshot_sparsegpt", ["method=sparse", "search=uniform", "method.target=0.5", "solver=sparsegpt",
                           "database.windows=16"]),
    ("oneshot_gptq", ["method=quant", "search=uniform", "method.target=4", "solver=gptq", "database.windows=16"]),
    ("evopress_sparse", ["method=sparse", "method.target=0.6", "search=evopress_sparse_cpu"]),
    ("evopress_quant", ["method=quant", "method.target=2.5", "search=evopress_quant_cpu", "export=auto"]),
    ("tiny_owl", ["model=tiny", "method=sparse", "method.target=0.6", "search=owl", "eval.windows=2",
                  "logger=none"]),
    ("tiny_structured_uniform", ["model=tiny", "method=structured", "method.target=0.3", "search=uniform",
                                 "solver=ziplm", "eval.windows=2", "logger=none"]),
    ("tiny_structured_dp_export", ["model=tiny", "method=structured", "method.target=0.3", "search=dp",
                                   "eval.windows=2", "logger=none", "export=auto"]),
    ("tiny_darwinlm", ["model=tiny", "method=structured", "method.target=0.3", "search=darwinlm",
                       "search.generations=2", "eval.windows=2", "logger=none"]),
    ("tiny_bonsai", ["model=tiny", "method=structured", "method.target=0.3", "search=bonsai", "search.rounds_cap=2",
                     "eval.windows=2", "logger=none"]),
    ("tiny_bonsai_prior", ["model=tiny", "method=structured", "method.target=0.3", "search=bonsai",
                           "search.perturb=false", "eval.windows=2", "logger=none"]),
    ("tiny_dense", ["model=tiny", "method=dense", "search=none", "eval.windows=2", "logger=none"]),
    ("zeroshot_100", ["method=dense", "search=none", "eval=zeroshot", "eval.zeroshot.limit=100"]),
    ("oneshot_sparsegpt_zeroshot", ["method=sparse", "search=uniform", "method.target=0.5", "database.windows=16",
                                    "eval=ppl_zeroshot", "eval.zeroshot.limit=100"]),
    ("dense_c4_sample", ["method=dense", "search=none", "data=c4_sample"]),
    ("dense_every_window", ["method=dense", "search=none", "dtype=auto", "eval.windows=null"]),
    ("tiny_sweep", ["-m", "model=tiny", "seed=0,1,2"]),
    ("help", ["--help"]),
    ("cfg_job", ["model=tiny", "--cfg", "job"]),
]
NOT_RUN = {"model=/path/to/hf_checkpoint": "a local checkpoint of the user's",
           "model=llama3_8b device=cuda": "a GPU and the Hub"}


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.machine())
    native = sorted({f for f in info.split() if f in ("amx_bf16", "avx512_bf16")})
    return {"cpu": model, "cores": os.cpu_count(), "native_bf16": native or None}


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, RESULTS)


def measure(args: list[str], env: dict, limit_s: float) -> tuple[float, int | None, str]:
    """(seconds, exit code or None when stopped at the limit, stderr's tail)."""
    t0 = time.time()
    proc = subprocess.Popen([EVOEXP, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=limit_s)
        return time.time() - t0, proc.returncode, err[-600:]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # evoexp keeps what it finished: the next session resumes it
        _, err = proc.communicate()
        return time.time() - t0, None, err[-600:]


def record(prev: dict, args: list[str], took: float, rc: int | None, err: str) -> dict:
    out = {"args": args, "seconds": round(prev.get("seconds", 0.0) + took, 1),
           "segments": prev.get("segments", 0) + 1, "done": rc is not None}
    if rc:
        out.update(rc=rc, stderr=err)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=60.0, help="this invocation's time; then stop and record")
    ap.add_argument("--only", nargs="*", help="these ids only")
    ap.add_argument("--redo", nargs="*", default=[], help="measure these ids again from scratch")
    a = ap.parse_args()
    results, here = load(), machine()
    if results.get("_machine", here) != here:
        sys.exit(f"{RESULTS} was measured on {results['_machine']}; this is {here}: move it away to start over")
    results["_machine"] = here
    deadline = time.time() + a.budget_min * 60
    for cid, args in COMMANDS:
        prev = {} if cid in a.redo else results.get(cid, {})
        if (a.only and cid not in a.only) or prev.get("done") or time.time() >= deadline:
            continue
        out = WORK / "out" / cid
        if cid in a.redo:
            shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "EVOEXP_CACHE": str(WORK / "cache"), "EVOEXP_OUT": str(out), "WANDB_MODE": "offline"}
        print(f"{cid}: evoexp {' '.join(args)}" + (f" (resuming after {prev['seconds']} s)" if prev else ""),
              flush=True)
        results[cid] = record(prev, args, *measure(args, env, deadline - time.time()))
        print(f"  -> {results[cid]}", flush=True)
        save(results)
    for cid, args in COMMANDS:
        r = results.get(cid, {})
        took = "not run" if not r else f"{r['seconds']:.0f} s" + ("" if r["done"] else " so far")
        print(f"| `evoexp {' '.join(args)}` | {took} |")


if __name__ == "__main__":
    main()
