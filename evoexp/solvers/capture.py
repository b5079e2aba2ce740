"""Block-sequential calibration: feed every linear of a block its real inputs, one block at a time.

Only one block's activations live at a time, so large models work with the rest of the model elsewhere. What
the next block sees is a recorded choice (`propagation`):
- dense: the dense block's outputs (EvoPress's sparsity database);
- compressed: the outputs of the block after compression (standard one-shot SparseGPT / GPTQ);
- reference: the outputs with the block at a fixed reference level (EvoPress's 3-bit quantization database).
"""
from __future__ import annotations

from typing import Callable

import torch

from evoexp.blockrun import BlockRunner
from evoexp.models.adapter import LinearInfo

PROPAGATIONS = ("dense", "compressed", "reference")
# compress(block, linears, solvers) -> {linear name: weight for the next block's inputs (or None = dense)}
Compress = Callable[[int, list[LinearInfo], dict], dict]


@torch.no_grad()
def sequential(runner: BlockRunner, windows: torch.Tensor, make_solver: Callable[[LinearInfo], object],
               compress: Compress, propagation: str = "dense", batch: int = 8) -> None:
    """Walk the blocks: accumulate each linear's solver from hooks, compress, then propagate as chosen."""
    if propagation not in PROPAGATIONS:
        from evoexp.errors import UserError

        raise UserError(f"database.propagation: expected one of {', '.join(PROPAGATIONS)}, got {propagation!r}")
    ad = runner.adapter
    device = next(ad.model.parameters()).device
    hidden = [runner.embed(windows[i: i + batch].to(device)) for i in range(0, windows.shape[0], batch)]
    for h in hidden:  # capturing block kwargs runs the model once per shape: do it before any hook is set
        runner.block_kwargs(h.shape[0], h.shape[1], h.device)
    for b in range(ad.num_blocks):
        linears = ad.linears(b)
        solvers = {li.name: make_solver(li) for li in linears}
        hooks = [ad.module(li.name).register_forward_hook(
            lambda _m, args, _o, s=solvers[li.name]: s.add_batch(args[0])) for li in linears]
        try:
            outputs = [runner.run(h, b, b + 1) for h in hidden]
        finally:
            for h in hooks:
                h.remove()
        replaced = compress(b, linears, solvers)
        if propagation != "dense" and replaced:
            originals = {name: ad.module(name).weight.data for name in replaced}
            for name, w in replaced.items():
                ad.module(name).weight.data = w.to(originals[name].dtype)
            try:
                outputs = [runner.run(h, b, b + 1) for h in hidden]
            finally:
                for name, w in originals.items():
                    ad.module(name).weight.data = w
        hidden = outputs
