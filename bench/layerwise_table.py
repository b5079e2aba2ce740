"""Per-layer sparsity and bit-widths on the embedded model: EvoPress (CPU schedules) against every baseline.

For each target, `evoexp` runs once per search (EvoPress, then uniform / OWL / DP / random as their own runs),
all with the same database (64 x 1,024 calibration tokens), search calibration data (32 x 1,024), dtype=auto
forwards (bf16 where the CPU has native bf16, else fp32) and KL fitness, so every row differs only in how the levels were chosen. Run dirs are deterministic: a re-run
skips finished jobs, so the table can be filled over several sessions. Prints one Markdown table per target
from the run dirs' result.json files.
Usage: .venv/bin/python bench/layerwise_table.py [--sparse 0.5 0.6 0.7] [--quant 3 2.5 2.25] [--rows KEY ...]
       [--out outputs/bench] [--threads N]    (--rows: a subset of the row keys below, e.g. only the compressed-propagation ones)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evoexp.report.results import run_seconds
from subproc import run_showing_progress  # bench/ is on sys.path when a script here runs

# The CPU search configs set dtype, data and database sizes; every baseline gets the same values so that all
# runs of one target share the database (same key) and the calibration windows.
COMMON = ["dtype=auto", "data.calib_windows=32", "data.seq_len=1024", "database.windows=64"]
COMPRESSED = "database.propagation=compressed"
# row key -> extra overrides; the search is the key up to "+". The second EvoPress row searches a database whose
# blocks see the previous block compressed at the target level (as one-shot SparseGPT's do), not dense outputs;
# the baselines get that database too.
SEARCHES = {
    "sparse": {"evopress_sparse_cpu": [], "evopress_sparse_cpu+compressed": [COMPRESSED],
               "uniform": [], "owl": [], "dp": [], "random": [],
               "owl+compressed": [COMPRESSED], "dp+compressed": [COMPRESSED], "random+compressed": [COMPRESSED]},
    "quant": {"evopress_quant_cpu": [], "uniform": [], "dp": [], "random": [],
              "dp+groups": ["search.budget=groups"]},
}
VARIANTS = {"compressed": "compressed-propagation database",
            "groups": "each size group of layers at the target, search.budget=groups"}
SPEC = "wikitext2:test"


def run_dir(out: Path, method: str, args: list[str]) -> Path | None:
    """The run dir whose command line was exactly `args` (hydra names it after the overrides)."""
    import yaml

    for where in (out / "runs" / f"{method}-smollm2_135m").glob("*/.hydra/overrides.yaml"):
        given = [o for o in yaml.safe_load(where.read_text()) if not o.startswith("threads=")]
        if sorted(given) == sorted(args):
            return where.parent.parent
    return None


def run(method: str, target: float, key: str, extra: list[str], out: Path, threads: int | None) -> dict | None:
    search = key.split("+")[0]
    common = [] if search.startswith("evopress") else COMMON
    args = [f"method={method}", f"method.target={target:g}", f"search={search}", "logger=none", *common, *extra]
    where = run_dir(out, method, args)
    if where is None or not (where / "result.json").exists():  # evoexp itself skips finished runs
        print("evoexp", " ".join(args), flush=True)
        env = {**os.environ, "EVOEXP_OUT": str(out)}
        speed = [] if threads is None else [f"threads={threads}"]  # not part of the run's identity
        code, tail = run_showing_progress([sys.executable, "-m", "evoexp", *args, *speed], env)
        if code:  # e.g. uniform at a fractional bit target: no such row
            print(f"  skipped: {(tail.strip().splitlines() or [f'exit {code}'])[-1]}", flush=True)
            return None
        where = run_dir(out, method, args)
    return json.loads((where / "result.json").read_text())


def ppl(model: dict) -> float:
    entry = model["ppl"][SPEC]
    return next(v["ppl"] for k, v in entry.items() if k != "protocol")


def rows(search: str, res: dict) -> list[tuple[str, dict, float]]:
    """(label, model entry, seconds choosing its levels) for every allocation a run evaluated."""
    main = res["allocation"]["search"]
    out = []
    for kind, model in res["models"].items():
        if kind == "dense":
            continue
        seconds = res["search"].get("seconds", 0) if kind == main else res["timings"].get(f"reference_{kind}", 0)
        label = kind if search != "uniform" else "uniform, one-shot (compressed propagation)"
        variant = search.partition("+")[2]
        if variant:
            label += f" ({VARIANTS[variant]})"
        base = search.split("+")[0].split("_")[0]
        out.append((label if kind == main else f"{kind} (same database as {base}"
                    f"{' ' + variant if variant else ''})", model, seconds))
    return out


def table(method: str, target: float, results: dict[str, dict]) -> str:
    evo = next((r for s, r in results.items() if s.startswith("evopress")), next(iter(results.values())))
    unit = "sparsity" if method == "sparse" else "bits"
    lines = [f"| {method} {target:g} ({unit}) | wikitext-2 PPL | KL fitness | achieved | choosing levels (s) | "
             "whole run (s) |", "|---|---|---|---|---|---|",
             f"| dense | {ppl(evo['models']['dense']):.2f} | 0 | | | |"]
    for search, res in results.items():
        for label, model, seconds in rows(search, res):
            achieved = model["achieved"].get("sparsity", model["achieved"].get("bits"))
            fitness = model.get("fitness")
            lines.append(f"| {label} | {ppl(model):.2f} | {'' if fitness is None else f'{fitness:.4f}'} | "
                         f"{achieved:.4f} | {seconds:.0f} | {run_seconds(res):.0f} |")
    proto = evo["models"]["dense"]["ppl"][SPEC]["protocol"]
    lines.append(f"\nPPL: first {proto['windows']} windows x {proto['seq_len']} tokens of the wikitext-2 test "
                 f"split, no BOS, {evo['config']['dtype']}. Fitness: KL to the dense model on held-out calibration "
                 "tokens.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparse", type=float, nargs="*", default=[0.6, 0.5, 0.7])
    ap.add_argument("--quant", type=float, nargs="*", default=[3, 2.5, 2.25])
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--rows", nargs="+", choices=sorted({k for rows in SEARCHES.values() for k in rows}),
                    help="run (and print) only these row keys; default: all of the method's rows")
    ap.add_argument("--threads", type=int, help="torch threads per run (default: evoexp's)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    for method, targets in (("sparse", args.sparse), ("quant", args.quant)):
        for target in targets:
            results = {s: run(method, target, s, extra, out, args.threads) for s, extra in SEARCHES[method].items()
                       if args.rows is None or s in args.rows}
            print(table(method, target, {s: r for s, r in results.items() if r is not None}), "\n", flush=True)


if __name__ == "__main__":
    main()
