"""Uniform FISTAPruner against uniform SparseGPT and Wanda on the embedded model, at 50 % and 2:4.

Every row is one `evoexp method=sparse search=uniform solver=...` run with the same calibration windows (wikitext-2
validation, `database.windows` x `database.seq_len`, data seed 0), fp32, 2 threads, evaluated the same way
(held-out wikitext-2 test PPL, the first --eval-windows windows). Each solver runs as its paper does: SparseGPT
and Wanda with compressed propagation (the next block sees the pruned block), FISTA with dense block inputs and
the pruned path inside each block. Time is the compression alone (the database build, calibration forwards
included). Run dirs are fixed, so a killed run resumes: finished rows are not recomputed.
Usage: .venv/bin/python bench/fista_uniform.py [--windows 16] [--eval-windows 16] [--rows fista50 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SPARSE = ["method=sparse", "method.target=0.5"]
NM = [*SPARSE, "method.nm=[2,4]"]
ROWS = {
    "sparsegpt50": [*SPARSE, "solver=sparsegpt"],
    "wanda50": [*SPARSE, "solver=wanda"],
    "fista50": [*SPARSE, "solver=fista"],
    "sparsegpt24": [*NM, "solver=sparsegpt"],
    "wanda24": [*NM, "solver=wanda"],
    "fista24": [*NM, "solver=fista"],
}


def evoexp(args: list[str], run: Path) -> dict:
    if not (run / "result.json").exists():
        env = {**os.environ, "EVOEXP_OUT": str(run.parent), "WANDB_MODE": "disabled"}
        # stderr passes through: the database build's progress bar shows while a row runs
        proc = subprocess.run([sys.executable, "-m", "evoexp", *args, f"hydra.run.dir={run}", "logger=none",
                               "threads=2", "dtype=float32"], env=env, stdout=subprocess.DEVNULL)
        if proc.returncode:
            raise SystemExit(f"evoexp {' '.join(args)} failed (exit {proc.returncode}); its log: {run}/evoexp.log")
    return json.loads((run / "result.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", default="outputs/bench/fista_uniform")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    evaluation = [f"eval.windows={args.eval_windows}", f"eval.seq_len={args.seq_len}"]
    common = ["search=uniform", f"database.windows={args.windows}", f"database.seq_len={args.seq_len}",
              "data.seed=0", f"database.dir={out / 'db'}", *evaluation]
    dense = evoexp(["method=dense", "search=none", *evaluation], out / "dense")
    print(f"dense PPL {dense['objective']:.3f}; calibration {args.windows} x {args.seq_len} wikitext-2 validation "
          f"tokens; PPL on the first {args.eval_windows} wikitext-2 test windows; fp32, 2 threads\n", flush=True)
    print("| row | PPL | compression time |\n|---|---|---|", flush=True)
    for name in args.rows:
        res = evoexp([*ROWS[name], *common], out / name)
        print(f"| {name} | {res['objective']:.3f} | {res['timings']['database']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
