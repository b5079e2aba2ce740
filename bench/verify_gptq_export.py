"""Does GPTQModel itself read `export=gptq` back as the model we compressed? A check with the real consumer.

A 2-block random Llama as wide as the embedded SmolLM2 (576 = 4 x 128 + 64: a partial last group) gets a GPTQ
database at 2..8 bits and a random per-layer allocation, is exported with `save_gptq`, and is loaded by GPTQModel
on the CPU (BACKEND.TORCH) in its own venv. Compared: every layer's bit-width (the `dynamic` overrides), its
dequantized weight, and the logits against the in-memory model (GPTQModel computes in fp16: the same model cast
to fp16 gives the noise floor).

GPTQModel 7.7's metadata asks for torch>=2.14.1; its CPU path runs on 2.13, so it is installed without deps:
    python3 -m venv bench/.venv-gptqmodel && bench/.venv-gptqmodel/bin/pip install torch==2.13.0
    BUILD_CUDA_EXT=0 bench/.venv-gptqmodel/bin/pip install --no-deps gptqmodel==7.7.0
    bench/.venv-gptqmodel/bin/pip install torch==2.13.0 numpy transformers accelerate threadpoolctl safetensors \
        pypcre tokenicer logbar device-smi defuser packaging pillow requests protobuf
`--loader from_pretrained` reads the exports with transformers' AutoModelForCausalLM.from_pretrained instead,
which needs optimum as well (`bench/.venv-gptqmodel/bin/pip install optimum transformers==5.25.0`; measured with
optimum 2.3.0): it ignores GPTQModel's per-layer `dynamic` widths and refuses the mixed-width CASES with a size
mismatch; `--uniform` checks one-width exports, which it loads (with GPTQModel's torch kernel on a CPU).
Usage: .venv/bin/python bench/verify_gptq_export.py [--gptqmodel-python bench/.venv-gptqmodel/bin/python]
       [--loader gptqmodel|from_pretrained] [--uniform]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from evoexp.config import GPTQCfg, TinyModelCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, DatabaseSpec, LevelApplier, build_database
from evoexp.methods.export import save_gptq
from evoexp.database.provision import resolve_propagation
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.tiny import byte_tokenizer, tiny_llama
from evoexp.methods.layerwise import Allocation

# (group size, sym, act_order, bit-widths): every checkpoint format save_gptq writes. 5/6 bits make it gptq_p
# (planar, 3 bits too); else sym -> gptq (v1 zeros: zero - 1), asym -> gptq_v2. Group 128 of 576 columns leaves a
# partial last group; 0 is one group per row.
CASES = [(128, False, False, [2, 3, 4, 5, 6, 8]), (64, True, True, [2, 3, 4, 8]), (0, False, False, [2, 3, 4, 8]),
         (32, True, False, [3, 5, 6])]
# One bit-width for every layer (no `dynamic` overrides): what a reader that ignores `dynamic` can load.
UNIFORM_CASES = [(128, True, False, [4]), (128, False, False, [4]), (128, True, False, [3]), (0, True, False, [8])]

# Runs in GPTQModel's venv: load the export and dump what it computes.
CHILD = r"""
import sys, torch
from gptqmodel import GPTQModel, BACKEND
path, ids_path, out_path, loader = sys.argv[1:]
if loader == "gptqmodel":
    hf = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
else:  # transformers' own loader, which hands GPTQ checkpoints to optimum and GPTQModel
    import json
    from transformers import AutoModelForCausalLM, GPTQConfig
    qc = json.load(open(path + "/config.json"))["quantization_config"]
    # GPTQModel's plain torch kernel: the auto-picked int4 CPU kernel needs in_features divisible by the group
    qc["backend"] = "torch"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu",
                                              quantization_config=GPTQConfig.from_dict(qc))
ids = torch.load(ids_path)
layers = {n: m for n, m in hf.named_modules() if hasattr(m, "qweight")}
with torch.no_grad():
    logits = hf(ids).logits.float()
    weights = {n: m.dequantize_weight().T.float() for n, m in layers.items()}
torch.save({"logits": logits, "weights": weights, "bits": {n: m.bits for n, m in layers.items()},
            "kernels": sorted({type(m).__name__ for m in layers.values()})}, out_path)
"""


def model_and_windows():
    tok = byte_tokenizer()
    cfg = TinyModelCfg(num_layers=2, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3)
    model = tiny_llama(cfg, vocab_size=len(tok)).eval()
    win, proto = calibration_windows(load_tokens("wikitext2:validation", tok), tok, 64, 8, seed=0, bos=False)
    return model, tok, win, proto


def database(model, win, proto, root, group_size, sym, act_order, bits):
    adapter = DecoderAdapter(model)
    solver = GPTQCfg(group_size=group_size, sym=sym, act_order=act_order)
    grid = {li.name: list(bits) for li in adapter.linears()}
    ref = 3 if 3 in bits else bits[0]  # one width: the export of one-shot GPTQ
    prop, reference = resolve_propagation("reference", "quant", grid, ref, ref)
    spec = DatabaseSpec(kind="quant", model={"name": "tiny576", "fingerprint": "tiny576"},
                        calibration=proto.as_dict(), solver=asdict(solver), propagation=prop, reference=reference,
                        grid=grid, dtype="float32", compute_dtype="float32")
    db = Database(root, spec)
    build_database(db, adapter, win, solver, batch=4)
    return adapter, db


def expected_weight(q) -> torch.Tensor:
    """What a GPTQ reader decodes: the database's codes and zeros with fp16 scales."""
    idx = q.g_idx.long()
    return q.scales.half().float()[:, idx] * (q.codes.float() - q.zeros[:, idx])


def check(case, model, tok, win, proto, child_python: str, work: Path, loader: str) -> dict:
    group_size, sym, act_order, bits = case
    adapter, db = database(model, win, proto, work / "db", group_size, sym, act_order, bits)
    rng = np.random.default_rng(group_size)
    alloc = Allocation(db, {n: int(rng.integers(len(bits))) for n in db.spec.grid})
    ids = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(0))
    applier = LevelApplier(adapter, db)
    applier.apply(alloc.levels)
    try:
        with torch.no_grad():
            ref32 = model(ids).logits
            ref16 = model.half()(ids).logits.float()  # the same weights computed in fp16: the noise floor
        model.float()
        save_gptq(model, alloc, work / "model")
    finally:
        applier.restore()
    tok.save_pretrained(work / "model")
    torch.save(ids, work / "ids.pt")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")  # no torch.compile of every layer's dequant on 2 CPUs
    run = subprocess.run([child_python, "-c", CHILD, str(work / "model"), str(work / "ids.pt"), str(work / "out.pt"),
                          loader],
                         env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{loader} failed to load the export:\n{run.stderr[-4000:]}")
    got = torch.load(work / "out.pt")
    config = json.loads((work / "model" / "config.json").read_text())["quantization_config"]
    widths = {n: db.spec.grid[n][i] for n, i in alloc.levels.items()}
    wdiff = max((got["weights"][n] - expected_weight(db.quantized(n, i))).abs().max().item()
                for n, i in alloc.levels.items())
    wdiff32 = max((got["weights"][n] - db.quantized(n, i).dequantize()).abs().max().item()
                  for n, i in alloc.levels.items())
    return {"group_size": config["group_size"], "sym": sym, "desc_act": config["desc_act"],
            "checkpoint_format": config["checkpoint_format"], "default_bits": config["bits"],
            "dynamic_entries": len(config["dynamic"]), "kernels": got["kernels"],
            "bits_match": got["bits"] == widths, "layers": len(widths),
            "bit_widths": sorted(set(widths.values())),
            "weight_max_abs_diff_vs_fp16_scales": wdiff, "weight_max_abs_diff_vs_database": wdiff32,
            "logits_max_abs_diff_vs_fp32": (got["logits"] - ref32).abs().max().item(),
            "fp16_noise_floor_logits_max_abs_diff": (ref16 - ref32).abs().max().item(),
            "logits_max_abs": ref32.abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gptqmodel-python", default="bench/.venv-gptqmodel/bin/python")
    ap.add_argument("--loader", choices=["gptqmodel", "from_pretrained"], default="gptqmodel",
                    help="GPTQModel.load, or transformers' AutoModelForCausalLM.from_pretrained (needs optimum)")
    ap.add_argument("--uniform", action="store_true", help="only exports with one bit-width for every layer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, win, proto = model_and_windows()
    results = []
    for case in UNIFORM_CASES if args.uniform else CASES:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(check(case, model, tok, win, proto, args.gptqmodel_python, Path(tmp), args.loader))
            print(json.dumps(results[-1]), flush=True)
    ok = all(r["bits_match"] and r["logits_max_abs_diff_vs_fp32"] < 10 * max(r["fp16_noise_floor_logits_max_abs_diff"],
                                                                              1e-3) for r in results)
    print(f"OK: {args.loader} reads every case back" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
