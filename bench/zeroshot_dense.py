"""Dense zero-shot accuracy of the embedded model: evoexp's in-memory evaluation against the harness loading the
same checkpoint from disk.

Both sides run lm-evaluation-harness on evoexp's offline task definitions, one task per process, with the same
dtype, batch size and seeds; they differ only in how the model reaches the harness. "memory" is
`evoexp method=dense search=none eval=zeroshot` (the model object wrapped in HFLM); "disk" is
`HFLM(pretrained=<the converted checkpoint dir>)`, as a user of the harness's CLI would load it. Every task's
result is written when it finishes, and both sides keep every answered request (the harness's response cache), so
a killed run resumes inside the task it was on. A resumed side's time is extrapolated from its last segment. Prints a Markdown table
of acc / acc_norm per task, both sides, and each side's wall time.
Usage: .venv/bin/python bench/zeroshot_dense.py [--tasks arc_easy ...] [--dtype bfloat16] [--limit N] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FIVE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"]
METRICS = ("acc", "acc_norm")


def memory_side(task: str, args, out: Path) -> dict:
    run = out / "memory" / task
    if not (run / "result.json").exists():
        overrides = ["method=dense", "search=none", "eval=zeroshot", f"eval.zeroshot.tasks=[{task}]",
                     "eval.zeroshot.cache_dense=false", f"eval.zeroshot.batch_size={args.batch_size}",
                     f"eval.zeroshot.limit={'null' if args.limit is None else args.limit}", f"dtype={args.dtype}",
                     f"threads={args.threads}", "logger=none", f"hydra.run.dir={run}"]
        env = {**os.environ, "EVOEXP_OUT": str(out / "memory"), "WANDB_MODE": "disabled"}
        proc = subprocess.run([sys.executable, "-m", "evoexp", *overrides], env=env, stdout=subprocess.DEVNULL)
        if proc.returncode:
            raise SystemExit(f"evoexp failed on {task} (exit {proc.returncode}); its log: {run}/evoexp.log")
    zs = json.loads((run / "result.json").read_text())["metrics"]["zeroshot"]
    return {**zs["tasks"][task], "seconds": zs["seconds"], "resumed_requests": zs.get("resumed_requests", 0),
            "requests": zs.get("answered_requests", 0)}


def disk_side(task: str, args, out: Path) -> dict:
    done = out / "disk" / f"{task}.json"
    if not done.exists():  # a fresh process, as the memory side gets
        cmd = [sys.executable, __file__, "--disk-task", task, "--dtype", args.dtype, "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--out", str(out)]
        if args.limit is not None:
            cmd += ["--limit", str(args.limit)]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"the from-disk harness run failed on {task}")
    return json.loads(done.read_text())


def run_from_disk(task: str, args, out: Path) -> None:
    import torch
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evoexp.config import ModelCfg
    from evoexp.eval.zeroshot import HARNESS_SEEDS, answered_requests, task_figures
    from evoexp.eval.zeroshot_data import data_dir, tasks_dir
    from evoexp.models.loading import _embedded_checkpoint
    from evoexp.utils import write_json

    torch.set_num_threads(args.threads)
    model_cfg = yaml.safe_load((Path(__file__).parents[1] / "conf" / "model" / "smollm2_135m.yaml").read_text())
    path, fingerprint, _ = _embedded_checkpoint(ModelCfg(**model_cfg))  # evoexp's default model
    data_dir()
    key = f"{task}-{fingerprint[:12]}-{args.dtype}-b{args.batch_size}-limit{args.limit}"  # what decides the answers
    requests = out / "disk" / "requests" / key
    requests.parent.mkdir(parents=True, exist_ok=True)
    resumed = answered_requests(requests)
    t0 = time.time()
    lm = HFLM(pretrained=path, device="cpu", dtype=args.dtype, batch_size=args.batch_size)
    loaded = time.time()
    results = simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=args.limit, bootstrap_iters=1000,
                              task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False),
                              use_cache=str(requests), **HARNESS_SEEDS)
    figures = task_figures(results, task)
    write_json(out / "disk" / f"{task}.json", {**figures, "seconds": round(time.time() - loaded, 2),
                                               "load_seconds": round(loaded - t0, 2), "checkpoint": path,
                                               "model": fingerprint, "resumed_requests": resumed,
                                               "requests": answered_requests(requests)})


def wall_time(side: dict) -> str:
    """The side's harness time; a resumed side's is extrapolated from its last segment's rate ("≈")."""
    if not side.get("resumed_requests"):
        return f"{side['seconds']:.0f} s"
    share = 1 - side["resumed_requests"] / side["requests"] if side.get("requests") else 0
    return f"≈ {side['seconds'] / share:.0f} s" if share > 0 else f"{side['seconds']:.0f} s + resumed"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=FIVE)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: the full splits)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    ap.add_argument("--out", default=None, help="default outputs/bench/zeroshot_dense[_limitN]")
    ap.add_argument("--disk-task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out or f"outputs/bench/zeroshot_dense{'' if args.limit is None else f'_limit{args.limit}'}")
    out = out.resolve()
    if args.disk_task:
        return run_from_disk(args.disk_task, args, out)
    print(f"| task | documents | metric | in memory (evoexp) | from disk (HFLM) | equal | time in memory | "
          f"time from disk |\n|---|---|---|---|---|---|---|---|", flush=True)
    totals = [0.0, 0.0]
    for task in args.tasks:
        mem, disk = memory_side(task, args, out), disk_side(task, args, out)
        for side in (mem, disk):
            side["time"] = wall_time(side)
        totals[0] += mem["seconds"]
        totals[1] += disk["seconds"]
        for metric in (m for m in METRICS if m in mem):
            same = mem[metric] == disk[metric] and mem["samples"] == disk["samples"]
            print(f"| {task} | {mem['samples']['effective']} | {metric} | {mem[metric]:.4f} ± "
                  f"{mem[metric + '_stderr']:.4f} | {disk[metric]:.4f} ± {disk[metric + '_stderr']:.4f} | "
                  f"{'yes' if same else 'NO'} | {mem['time']} | {disk['time']} |", flush=True)
    print(f"\nTotal harness time: in memory {totals[0]:.0f} s, from disk {totals[1]:.0f} s ({args.dtype}, batch "
          f"{args.batch_size}, {args.threads} threads; model loading excluded).")


if __name__ == "__main__":
    main()
