"""Structured pruning (heads and neurons) on the embedded model: EvoPress over the ZipLM database against every
baseline, at 25 % and 50 % of the decoder blocks' parameters removed.

Per target, `evoexp` runs
- `evopress`: `search=evopress_structured_cpu` over the ZipLM database (dense propagation, 64 x 1,024 tokens),
  which also evaluates uniform (the database's uniform level), DP (error additivity) and the best of 32 random
  allocations as references, all on the same search calibration tokens;
- `oneshot_<solver>`: `search=uniform` with solver=magnitude | wanda_sp | ziplm, each with its own one-level
  database calibrated as a one-shot pipeline is (compressed propagation, same windows).
Every run evaluates wikitext-2 and the C4 sample on the same windows, in the dtype `auto` picks. Run dirs are
deterministic and evoexp resumes an unfinished one, so the table fills over several sessions (keep the runs in the
repo with bench/keep_runs.py). Prints one Markdown table per target from the run dirs' result.json files.
Usage: .venv/bin/python bench/structured_table.py [--targets 0.5 0.25] [--rows evopress oneshot_ziplm ...]
       [--out outputs/bench] [--threads N] [--print-only]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evoexp.report.results import run_seconds
from layerwise_table import run_dir  # bench/ is on sys.path when a script here runs
from subproc import run_showing_progress

EVAL = ["eval.datasets=[wikitext2:test,c4_sample:eval]", "eval.windows=16", "logger=none"]
# what evopress_structured_cpu sets, for the one-shot rows (the same calibration windows and dtype)
DATA = ["dtype=auto", "data.calib_windows=32", "data.seq_len=1024", "database.windows=64"]
ROWS = {
    "evopress": ["search=evopress_structured_cpu", "search.references=[uniform,dp,random]",
                 "search.reference_settings={random:{candidates:32,tokens:4096}}", "search.track_every=10"],
    "oneshot_magnitude": ["search=uniform", "solver=magnitude", *DATA],
    "oneshot_wanda_sp": ["search=uniform", "solver=wanda_sp", *DATA],
    "oneshot_ziplm": ["search=uniform", "solver=ziplm", *DATA],
}
LABELS = {
    "oneshot_magnitude": "uniform magnitude (one-shot)",
    "oneshot_wanda_sp": "uniform Wanda-sp (one-shot)",
    "oneshot_ziplm": "uniform ZipLM (one-shot, compressed propagation)",
    "uniform": "uniform ZipLM (the database's level)",
    "dp": "DP (error additivity over the ZipLM database)",
    "random": "random (best of 32 over the ZipLM database)",
    "evopress": "**EvoPress** over the ZipLM database (40 generations, lambda 16)",
}
SPECS = ("wikitext2:test", "c4_sample:eval")


def args_of(key: str, target: float) -> list[str]:
    return ["method=structured", f"method.target={target:g}", *ROWS[key], *EVAL]


def run(key: str, target: float, out: Path, threads: int | None, launch: bool) -> dict | None:
    args = args_of(key, target)
    where = run_dir(out, "structured", args)
    if launch and (where is None or not (where / "result.json").exists()):  # evoexp itself skips finished runs
        print("evoexp", " ".join(args), flush=True)
        env = {**os.environ, "EVOEXP_OUT": str(out)}
        speed = [] if threads is None else [f"threads={threads}"]  # not part of the run's identity
        code, tail = run_showing_progress([sys.executable, "-m", "evoexp", *args, *speed], env)
        if code:
            print(f"  failed: {(tail.strip().splitlines() or [f'exit {code}'])[-1]}", flush=True)
            return None
        where = run_dir(out, "structured", args)
    if where is None or not (where / "result.json").exists():
        return None
    return json.loads((where / "result.json").read_text())


def ppl(model: dict, spec: str) -> str:
    entry = model.get("ppl", {}).get(spec)
    if not entry:
        return "–"
    return f"{next(v['ppl'] for k, v in entry.items() if k != 'protocol'):.2f}"


def rows(key: str, res: dict) -> list[tuple[str, dict, float, float]]:
    """(label, model entry, seconds choosing its levels, seconds of the whole run) per evaluated allocation."""
    whole = run_seconds(res)
    if key != "evopress":
        build = (res.get("database") or {}).get("build") or {}  # stored with the database, also when reused
        if "database" not in res["timings"]:  # built by an earlier, killed process of this run: count it
            whole += build.get("seconds", 0.0)
        return [(LABELS[key], res["models"]["uniform"], build.get("seconds", 0.0), whole)]
    # the references first, EvoPress last
    main = res["allocation"]["search"]
    return [(LABELS[kind], model, res["search"].get("seconds", 0) if kind == main else
             res["timings"].get(f"reference_{kind}", 0), whole)
            for kind, model in sorted(((k, m) for k, m in res["models"].items() if k != "dense"),
                                      key=lambda km: list(LABELS).index(km[0]))]


def table(target: float, results: dict[str, dict]) -> str:
    any_run = next(iter(results.values()))
    dense = any_run["models"]["dense"]
    block = next(m["achieved"]["block_params"] for r in results.values() for k, m in r["models"].items()
                 if k != "dense")
    lines = [f"| {target * 100:g} % of block parameters | wikitext-2 PPL | C4-sample PPL | KL fitness | "
             "parameters removed | choosing levels (s) | whole run (s) |", "|---|---|---|---|---|---|---|",
             f"| dense | {ppl(dense, SPECS[0])} | {ppl(dense, SPECS[1])} | 0 | 0 of {block:,} | | |"]
    order = ["oneshot_magnitude", "oneshot_wanda_sp", "oneshot_ziplm", "evopress"]
    for key in [k for k in order if k in results]:
        for label, model, seconds, whole in rows(key, results[key]):
            a, fit = model["achieved"], model.get("fitness")
            lines.append(f"| {label} | {ppl(model, SPECS[0])} | {ppl(model, SPECS[1])} | "
                         f"{'' if fit is None else f'{fit:.4f}'} | {a['removed_params']:,} ({a['fraction']:.2%}) | "
                         f"{seconds:.0f} | {whole:.0f} |")
    proto = dense["ppl"][SPECS[0]]["protocol"]
    lines.append(f"\nPPL: first {proto['windows']} windows x {proto['seq_len']} tokens of each split, no BOS, "
                 f"{any_run['config']['dtype']}. Parameters: of the {block:,} in the 30 decoder blocks (embeddings "
                 "and head excluded), counted on the model with the q/k/v/gate/up rows each removed unit takes along. "
                 "One-shot rows: 'choosing levels' is their database build.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--threads", type=int, help="torch threads per run (default: evoexp's)")
    ap.add_argument("--print-only", action="store_true", help="print the tables of the finished runs, run nothing")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    for target in args.targets:
        results = {k: run(k, target, out, args.threads, not args.print_only) for k in args.rows}
        results = {k: r for k, r in results.items() if r is not None}
        if results:
            print(table(target, results), "\n", flush=True)


if __name__ == "__main__":
    main()
