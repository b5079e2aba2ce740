"""Dense zero-shot accuracy of the embedded model: evoexp's in-memory evaluation against the harness loading the
same checkpoint from disk.

Both sides run lm-evaluation-harness on evoexp's offline task definitions, one task per process, with the same
dtype, batch size and seeds; they differ only in how the model reaches the harness. "memory" is
`evoexp method=dense search=none eval=zeroshot` (the model object wrapped in HFLM); "disk" is
`HFLM(pretrained=<the converted checkpoint dir>)`, as a user of the harness's CLI would load it. Every task's
result is written when it finishes, and both sides keep every answered request (the harness's response cache), so
a killed run resumes inside the task it was on. A resumed side's time is extrapolated from its last segment (a
lower bound). Prints a Markdown table of acc / acc_norm per task, both sides, and each side's wall time.

A task too long for one sitting (HellaSwag: 40,168 requests, hours per side on 2 cores) runs in parts:
`--part i/n` scores the i-th of n contiguous parts of each task's documents on both sides, side by side on the
same machine, and writes both sides' per-document scores to `--results` (kept in the repo, so parts measured in
different sessions add up). Once every part of a task is there, its row is the combination of the parts
(`evoexp.eval.zeroshot.combine_parts`), equal only if every document scored the same on both sides.
Usage: .venv/bin/python bench/zeroshot_dense.py [--tasks arc_easy ...] [--dtype bfloat16] [--limit N] [--threads 2]
       [--part i/n] [--results bench/results/zeroshot_dense]
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


def part_name(part: str | None) -> str:
    return "" if part is None else "-part-{}-of-{}".format(*part.split("/"))


def memory_side(task: str, args, out: Path) -> dict:
    run = out / "memory" / f"{task}{part_name(args.part)}"
    if not (run / "result.json").exists():
        overrides = ["method=dense", "search=none", "eval=zeroshot", f"eval.zeroshot.tasks=[{task}]",
                     f"eval.zeroshot.shard={'null' if args.part is None else args.part}",
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


def disk_command(task: str, args, out: Path) -> list[str] | None:
    """The from-disk run of `task` as its own process (as the memory side gets), or None when it is done."""
    if (out / "disk" / f"{task}{part_name(args.part)}.json").exists():
        return None
    cmd = [sys.executable, __file__, "--disk-task", task, "--dtype", args.dtype, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--out", str(out)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if args.part is not None:
        cmd += ["--part", args.part]
    return cmd


def both_sides(task: str, args, out: Path) -> tuple[dict, dict]:
    """Memory then disk, or (--together) both at once, each with --threads."""
    cmd = disk_command(task, args, out)
    disk = subprocess.Popen(cmd) if cmd and args.together else None
    mem = memory_side(task, args, out)
    code = disk.wait() if disk else subprocess.run(cmd).returncode if cmd else 0
    if code:
        raise SystemExit(f"the from-disk harness run failed on {task}")
    return mem, json.loads((out / "disk" / f"{task}{part_name(args.part)}.json").read_text())


def keep_part(task: str, args, mem: dict, disk: dict) -> None:
    """Both sides' figures and per-document scores of one part, where later sessions find them."""
    from evoexp.models.loading import cpu_flags
    from evoexp.utils import atomic_path

    i, n = args.part.split("/")
    where = Path(args.results) / f"{task}-{args.dtype}-b{args.batch_size}" / f"part-{i}-of-{n}.json"
    record = {"task": task, "part": args.part, "dtype": args.dtype, "batch_size": args.batch_size,
              "threads": args.threads, "together": args.together,
              "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))),
              "date": time.strftime("%Y-%m-%d"), "memory": mem, "disk": disk}
    where.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(where) as tmp:  # one line per side: the per-document lists are long
        tmp.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")
    print(f"kept {where}", flush=True)


def print_parts(task: str, args) -> None:
    """One line per kept part of `task`: its documents, the CPU, both sides' figures and times."""
    folder = Path(args.results) / f"{task}-{args.dtype}-b{args.batch_size}"
    print("\n| part | documents | CPU | acc memory / disk | acc_norm memory / disk | documents equal | "
          "time memory / disk |\n|---|---|---|---|---|---|---|")
    kept = [json.loads(f.read_text()) for f in folder.glob("part-*-of-*.json")]
    for k in sorted(kept, key=lambda k: tuple(int(x) for x in k["part"].split("/")[::-1])):
        mem, disk = k["memory"], k["disk"]
        ids = mem["documents"]["doc_id"]
        same = sum(all(mem["documents"][m][j] == disk["documents"][m][j] for m in METRICS if m in mem["documents"])
                   for j in range(len(ids))) if mem["documents"]["doc_id"] == disk["documents"]["doc_id"] else 0
        i, n = k["part"].split("/")
        print(f"| {i} of {n} | {ids[0]:,}–{ids[-1]:,} | {'+'.join(k['cpu_flags']) or '?'}, {k['dtype']} | "
              + " | ".join(f"{mem[m]:.4f} / {disk[m]:.4f}" for m in METRICS if m in mem)
              + f" | {same:,} of {len(ids):,} | {wall_time(mem)} / {wall_time(disk)} |")
    print()


def combined(task: str, args) -> tuple[dict, dict] | None:
    """Both sides of `task` combined over every kept part of one split into n parts, once all n are there."""
    from evoexp.eval.zeroshot import combine_parts

    parts = sorted((Path(args.results) / f"{task}-{args.dtype}-b{args.batch_size}").glob("part-*-of-*.json"))
    by_n: dict[str, list[dict]] = {}
    for f in parts:
        by_n.setdefault(f.stem.rsplit("-", 1)[1], []).append(json.loads(f.read_text()))
    for n, kept in by_n.items():
        if len(kept) == int(n):
            sides = []
            for side in ("memory", "disk"):
                whole = combine_parts([k[side] for k in kept])
                times = [estimated_seconds(k[side]) for k in kept]
                whole["seconds"] = sum(t for t, _ in times)
                whole["time"] = f"{'≥ ' if any(e for _, e in times) else ''}{whole['seconds']:,.0f} s ({n} parts)"
                sides.append(whole)
            same_docs = all(k["memory"]["documents"] == k["disk"]["documents"] for k in kept)
            sides[0]["documents_equal"] = sides[1]["documents_equal"] = same_docs
            return sides[0], sides[1]
    return None


def run_from_disk(task: str, args, out: Path) -> None:
    import torch
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evoexp.config import ModelCfg
    from evoexp.eval.zeroshot import HARNESS_SEEDS, answered_requests, per_document, shard_documents, task_figures
    from evoexp.eval.zeroshot_data import data_dir, tasks_dir
    from evoexp.models.loading import embedded_checkpoint
    from evoexp.utils import write_json

    torch.set_num_threads(args.threads)
    model_cfg = yaml.safe_load((Path(__file__).parents[1] / "conf" / "model" / "smollm2_135m.yaml").read_text())
    path, fingerprint, _ = embedded_checkpoint(ModelCfg(**model_cfg))  # evoexp's default model
    data_dir()
    key = f"{task}-{fingerprint[:12]}-{args.dtype}-b{args.batch_size}-limit{args.limit}{part_name(args.part)}"
    requests = out / "disk" / "requests" / key
    requests.parent.mkdir(parents=True, exist_ok=True)
    resumed = answered_requests(requests)
    t0 = time.time()
    lm = HFLM(pretrained=path, device="cpu", dtype=args.dtype, batch_size=args.batch_size)
    loaded = time.time()
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    samples = None if args.part is None else {task: shard_documents(task, manager, args.part)}
    results = simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=args.limit, samples=samples,
                              bootstrap_iters=1000, task_manager=manager, use_cache=str(requests),
                              log_samples=args.part is not None, **HARNESS_SEEDS)
    figures = task_figures(results, task)
    if args.part is not None:
        figures["documents"] = per_document(results, task)
    write_json(out / "disk" / f"{task}{part_name(args.part)}.json",
               {**figures, "seconds": round(time.time() - loaded, 2), "load_seconds": round(loaded - t0, 2),
                "checkpoint": path, "model": fingerprint, "resumed_requests": resumed,
                "requests": answered_requests(requests)})


def estimated_seconds(side: dict) -> tuple[float, bool]:
    """The side's harness time and whether it is an estimate. A resumed side's is extrapolated from its last
    segment's rate; the harness answers the longest requests first, so the left-over ones were the quickest and
    the figure is a lower bound ("≥")."""
    if not side.get("resumed_requests"):
        return side["seconds"], False
    share = 1 - side["resumed_requests"] / side["requests"] if side.get("requests") else 0
    return (side["seconds"] / share, True) if share > 0 else (side["seconds"], True)


def wall_time(side: dict) -> str:
    seconds, estimate = estimated_seconds(side)
    return f"≥ {seconds:,.0f} s" if estimate else f"{seconds:,.0f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=FIVE)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: the full splits)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    ap.add_argument("--out", default=None, help="default outputs/bench/zeroshot_dense[_limitN]")
    ap.add_argument("--part", help="i/n: only the i-th of n contiguous parts of each task's documents, kept in --results")
    ap.add_argument("--results", default="bench/results/zeroshot_dense", help="where parts are kept (in the repo)")
    ap.add_argument("--together", action="store_true", help="run the two sides at the same time")
    ap.add_argument("--disk-task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out or f"outputs/bench/zeroshot_dense{'' if args.limit is None else f'_limit{args.limit}'}")
    out = out.resolve()
    if args.disk_task:
        return run_from_disk(args.disk_task, args, out)
    print("| task | documents | metric | in memory (evoexp) | from disk (HFLM) | equal | time in memory | "
          "time from disk |\n|---|---|---|---|---|---|---|---|", flush=True)
    totals = [0.0, 0.0]
    for task in args.tasks:
        mem, disk = both_sides(task, args, out)
        for side in (mem, disk):
            side["time"] = wall_time(side)
        rows = [(task if args.part is None else f"{task} (part {args.part})", mem, disk)]  # a part, then the whole
        if args.part is not None:
            keep_part(task, args, mem, disk)
            print_parts(task, args)
            whole = combined(task, args)
            if whole:
                rows.append((task, *whole))
        totals[0] += mem["seconds"]
        totals[1] += disk["seconds"]
        for task, mem, disk in rows:
            print_rows(task, mem, disk)
    print(f"\nTotal harness time: in memory {totals[0]:.0f} s, from disk {totals[1]:.0f} s ({args.dtype}, batch "
          f"{args.batch_size}, {args.threads} threads; model loading excluded).")


def print_rows(task: str, mem: dict, disk: dict) -> None:
    for metric in (m for m in METRICS if m in mem):
        same = mem[metric] == disk[metric] and mem["samples"] == disk["samples"]
        same = same and mem.get("documents_equal", True) and mem.get("documents") == disk.get("documents")
        print(f"| {task} | {mem['samples']['effective']} | {metric} | {mem[metric]:.4f} ± "
              f"{mem[metric + '_stderr']:.4f} | {disk[metric]:.4f} ± {disk[metric + '_stderr']:.4f} | "
              f"{'yes' if same else 'NO'} | {mem['time']} | {disk['time']} |", flush=True)


if __name__ == "__main__":
    main()
