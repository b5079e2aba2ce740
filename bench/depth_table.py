"""Depth pruning on the embedded model: EvoPress (CPU schedule) against every baseline, one table.

Runs `evoexp` once per search with the same calibration data, dtype and fitness, then prints a Markdown table of
held-out wikitext-2 test PPL and wall time from the run dirs' result.json files.
Usage: .venv/bin/python bench/depth_table.py [--target 0.25] [--windows 32] [--out outputs/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from evoexp.report.results import run_seconds

SEARCHES = {
    "evopress_cpu": [],
    "shortgpt": [],
    "window_cosine": [],
    "subcloning": [],
    "shortened_llama": [],
    "random": ["search.candidates=128", "search.tokens=4096"],
}
# evopress_cpu sets these itself; every other search gets them so that all share data, dtype and fitness.
COMMON = ["dtype=bfloat16", "data.calib_windows=32", "data.seq_len=1024", "logger=none"]


def run(search: str, extra: list[str], target: float, windows: int, out: Path) -> dict:
    args = ["method=drop", f"method.target={target}", f"search={search}", f"eval.windows={windows}",
            *COMMON, *extra]
    env = {**os.environ, "EVOEXP_OUT": str(out)}
    print("evoexp", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "evoexp", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    for run_dir in (out / "runs" / "drop-smollm2_135m").iterdir():
        if f"search={search}" in (run_dir / ".hydra" / "overrides.yaml").read_text().split():
            return json.loads((run_dir / "result.json").read_text())
    raise FileNotFoundError(f"no run dir for search={search} under {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    results = {s: run(s, extra, args.target, args.windows, Path(args.out)) for s, extra in SEARCHES.items()}
    spec = "wikitext2:test"
    evo = results["evopress_cpu"]
    dense = evo["models"]["dense"]
    dtype = next(d for d in dense["ppl"][spec] if d != "protocol")
    print(f"\n| model ({int(args.target * 100)}% sub-blocks) | wikitext-2 PPL | KL fitness | "
          f"wall time of the run (s) | dropped attention / MLP blocks |")
    print("|---|---|---|---|---|")
    print(f"| dense | {dense['ppl'][spec][dtype]['ppl']:.2f} | 0 | | |")
    for search, res in results.items():
        kind = res["allocation"]["search"]
        model = res["models"][kind]
        alloc = res["allocation"]
        total = run_seconds(res)
        print(f"| {kind} | {model['ppl'][spec][dtype]['ppl']:.2f} | {model['fitness']:.4f} | {total:.0f} | "
              f"{alloc['attn_dropped']} / {alloc['mlp_dropped']} |")
    proto = dense["ppl"][spec]["protocol"]
    print(f"\nPPL: first {proto['windows']} windows x {proto['seq_len']} of the test text, no BOS, {dtype}. "
          f"Fitness: KL on {dense['fitness_tokens']} held-out calibration tokens.")


if __name__ == "__main__":
    main()
