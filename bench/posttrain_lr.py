"""Choose `experiment=cpu_structured_table`'s post-training learning rate on text the table never evaluates.

The table's uniform ZipLM model at 50 % (seed 0; the ZipLM database shared with the table) is trained with the
table's `train=distill` budget (32,768 tokens, 32 steps of one 1,024-token window) at each learning rate, and its
PPL measured on the first 4 windows x 2,048 tokens of the Wikipedia sample's held-out split (`wiki_sample:eval`):
the table's own figures are on wikitext-2 test and the C4 sample, and its training text is wikitext-2 validation.
Each rate is its own resumable `evoexp` run under outputs/bench/posttrain_lr/; the figures are written to
bench/results/posttrain_lr.json.
Usage: .venv/bin/python bench/posttrain_lr.py [--lrs 5e-4 2e-4 1e-3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from evoexp.utils import write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "bench" / "posttrain_lr"
RESULT = ROOT / "bench" / "results" / "posttrain_lr.json"
JOB = ["experiment=cpu_structured_table", "search=uniform", "method.target=0.5", "seed=0", "dtype=float32",
       "eval.datasets=[wiki_sample:eval]", "eval.windows=4", "eval.zeroshot.tasks=[]", "logger=none"]


def run(lr: float, threads: int) -> dict:
    run_dir = OUT / f"lr_{lr:g}"  # no "=": Hydra reads it in an override
    cmd = [str(Path(sys.executable).with_name("evoexp")), *JOB, f"train.lr={lr:g}", f"threads={threads}",
           f"hydra.run.dir={run_dir}"]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    models = json.loads((run_dir / "result.json").read_text())["models"]
    ppl = {name: models[name]["ppl"]["wiki_sample:eval"]["float32"]["ppl"] for name in ("uniform", "uniform_trained")}
    train = models["uniform_trained"]["train"]
    return {"lr": lr, "one_shot_ppl": ppl["uniform"], "trained_ppl": ppl["uniform_trained"],
            "final_loss": train["final_loss"], "steps": train["steps"], "tokens": train["tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-4, 1e-3])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    done = json.loads(RESULT.read_text())["rows"] if RESULT.exists() else []
    for lr in args.lrs:  # each rate recorded as it finishes: a session may end between them
        row = run(lr, args.threads)
        print(f"lr {lr:g}: wiki_sample PPL {row['one_shot_ppl']:.2f} -> {row['trained_ppl']:.2f}", flush=True)
        done = sorted([r for r in done if r["lr"] != lr] + [row], key=lambda r: r["lr"])
        write_json(RESULT, {"job": JOB, "rows": done})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
