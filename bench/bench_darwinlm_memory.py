"""Peak memory of DarwinLM's training-aware search on the embedded model at 50 %: one generation of
search=darwinlm_cpu with lambda = 4 and lambda = 16 (same stages), one plain EvoPress generation for scale, and
one round of Bonsai (search=bonsai_cpu, forward passes only) against DarwinLM's candidate training.

Each run is its own process, measured by /usr/bin/time (maximum resident set size); the ZipLM database is built
once beforehand (it is shared with search=evopress_structured_cpu), so the figures are the search's. Without a
copy of the model per candidate the peak does not grow with lambda. Results go to
bench/results/darwinlm_memory.json (kept: a rerun skips what is there).
Usage: .venv/bin/python bench/bench_darwinlm_memory.py [--out outputs/bench_memory]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from evoexp.utils import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "darwinlm_memory.json"
COMMON = ["method=structured", "method.target=0.5", "logger=none", "eval.datasets=[wikitext2:test]", "eval.windows=1",
          "resume=false"]
RUNS = {
    "darwinlm_cpu_lambda4": ["search=darwinlm_cpu", "search.generations=1", "search.offspring=4"],
    "darwinlm_cpu_lambda16": ["search=darwinlm_cpu", "search.generations=1", "search.offspring=16"],
    "evopress_structured_cpu_lambda16": ["search=evopress_structured_cpu", "search.generations=1",
                                         "search.offspring=16"],
    "bonsai_cpu_round1": ["search=bonsai_cpu", "search.rounds_cap=1"],
}


def measure(args: list[str], out: Path) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M WALL_S %e", sys.executable, "-m", "evoexp", *COMMON, *args]
    proc = subprocess.run(cmd, env={**os.environ, "EVOEXP_OUT": str(out)}, capture_output=True, text=True)
    line = next((ln for ln in proc.stderr.splitlines()[::-1] if ln.startswith("MAXRSS_KB")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    parts = line.split()
    return {"peak_rss_mib": round(int(parts[1]) / 1024, 1), "wall_s": float(parts[3]), "args": [*COMMON, *args]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs/bench_memory")
    out = Path(ap.parse_args().out).resolve()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, args in RUNS.items():
        if name not in results:
            results[name] = measure(args, out)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            write_json(RESULTS, results, digest=False)  # atomic: a killed bench leaves the previous file whole
        print(f"{name}: peak RSS {results[name]['peak_rss_mib']:.0f} MiB, {results[name]['wall_s']:.0f} s", flush=True)
    a, b = results["darwinlm_cpu_lambda4"], results["darwinlm_cpu_lambda16"]
    print(f"lambda 16 / lambda 4 peak: {b['peak_rss_mib'] / a['peak_rss_mib']:.3f}")
    print(f"Bonsai round / DarwinLM lambda 4 generation peak: "
          f"{results['bonsai_cpu_round1']['peak_rss_mib'] / a['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
