"""Block-sequential calibration: feed every linear of a block its real inputs, one block at a time.

Only one block's activations live at a time, so large models work with the rest of the model elsewhere. What
the next block sees is a recorded choice (`propagation`):
- dense: the dense block's outputs (EvoPress's sparsity database);
- compressed: the outputs of the block after compression (standard one-shot SparseGPT / GPTQ);
- reference: the outputs with the block at a fixed reference level (EvoPress's 3-bit quantization database).
With `true_sequential`, the linears of a block are also taken group by group (q/k/v, o, gate/up, down), each
group seeing the inputs produced by the already-compressed groups before it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Collection, Iterator

import torch

from evoexp.blockrun import BlockRunner
from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.solvers.hessian import HessianAccumulator

PROPAGATIONS = ("dense", "compressed", "reference")
# compress(block, linears, hessians) -> {linear name: weight the next inputs are computed with}; with dense
# propagation the returned weights are not used.
Compress = Callable[[int, list[LinearInfo], dict[str, HessianAccumulator]], dict[str, torch.Tensor]]
# finished(block) -> None when the block still has to be compressed, else the weights to propagate with
# (a resumed build walks finished blocks without accumulating anything).
Finished = Callable[[int], "dict[str, torch.Tensor] | None"]


@contextmanager
def replaced_weights(adapter: DecoderAdapter, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run the model with some linears' weights replaced (moved to the model's device and dtype: a
    database level is decoded on the CPU)."""
    originals = {name: adapter.module(name).weight.data for name in weights}
    for name, w in weights.items():
        adapter.module(name).weight.data = w.to(originals[name].device, originals[name].dtype)
    try:
        yield
    finally:
        for name, w in originals.items():
            adapter.module(name).weight.data = w


class NormAccumulator:
    """Only ‖x_j‖ per input column (what Wanda-score methods need), without the cost of a Hessian."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.sq_norm += x.square().sum(0).to(self.sq_norm.device)
        self.tokens += x.shape[0]

    @property
    def act_norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt()


def activation_norms(runner: BlockRunner, windows: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """‖x_j‖₂ of every block linear's input columns over the windows, on the dense model (OWL's statistic)."""
    norms: dict[str, torch.Tensor] = {}

    def record(_block, linears, accumulators):
        norms.update({li.name: accumulators[li.name].act_norm.cpu() for li in linears})
        return {}

    sequential(runner, windows, record, "dense", batch, accumulator=NormAccumulator)
    return norms


@torch.no_grad()
def sequential(runner: BlockRunner, windows: torch.Tensor, compress: Compress, propagation: str = "dense",
               batch: int = 8, true_sequential: bool = False, finished: Finished | None = None,
               on_block: Callable[[int], None] | None = None, accumulator=HessianAccumulator,
               only: Collection[str] | None = None) -> None:
    """Walk the blocks: accumulate Hessians from hooks (one per distinct input), compress, propagate. With
    `only`, Hessians are accumulated just for the input groups holding one of those layers (a structured
    database solves o_proj and down_proj: the q/k/v and gate/up inputs would be computed for nothing)."""
    if propagation not in PROPAGATIONS:
        raise UserError(f"database.propagation: expected one of {', '.join(PROPAGATIONS)}, got {propagation!r}")
    if true_sequential and propagation == "dense":
        raise UserError("database.true_sequential: needs propagation compressed or reference (dense never "
                        "replaces weights, so there is no sequence inside a block)")
    ad = runner.adapter
    device = next(ad.model.parameters()).device
    hidden = [runner.embed(windows[i: i + batch].to(device)) for i in range(0, windows.shape[0], batch)]
    for h in hidden:  # capturing block kwargs runs the model once per shape: do it before any hook is set
        runner.block_kwargs(h.shape[0], h.shape[1], h.device)
    for b in range(ad.num_blocks):
        done = finished(b) if finished else None
        if done is not None:
            weights, outputs = done, None
        else:
            weights, outputs = _compress_block(runner, hidden, b, compress, true_sequential, accumulator, only)
        if propagation != "dense" and weights:
            outputs = None
        if outputs is None:
            with replaced_weights(ad, weights if propagation != "dense" else {}):
                outputs = [runner.run(h, b, b + 1) for h in hidden]
        hidden = outputs
        if on_block:
            on_block(b)


def _compress_block(runner: BlockRunner, hidden: list[torch.Tensor], b: int, compress: Compress,
                    true_sequential: bool, accumulator=HessianAccumulator, only: Collection[str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """Compress block b; returns the weights to propagate with and, if still valid, the dense block outputs."""
    ad = runner.adapter
    groups = [g for g in ad.input_groups(b) if only is None or any(li.name in only for li in g)]
    stages = [[g] for g in groups] if true_sequential else [groups]
    weights: dict[str, torch.Tensor] = {}
    outputs = None
    for stage in stages:
        hessians, hooks = {}, []
        for group in stage:  # q/k/v (and gate/up) read one input: accumulate it once
            acc = accumulator(group[0].in_features, hidden[0].device)
            hessians.update({li.name: acc for li in group})
            hooks.append(ad.module(group[0].name).register_forward_hook(
                lambda _m, args, _o, acc=acc: acc.add_batch(args[0])))
        try:
            with replaced_weights(ad, weights):
                outputs = [runner.run(h, b, b + 1) for h in hidden]
        finally:
            for h in hooks:
                h.remove()
        weights.update(compress(b, [li for group in stage for li in group], hessians))
    return weights, (outputs if not true_sequential else None)


# solve_group(block, group, grams) -> {level: {name: weight}}: the group's compressed weights per level, which
# the later groups of the block then see on their pruned path.
SolveGroup = Callable[[int, list[LinearInfo], list], "dict[int, dict[str, torch.Tensor]]"]


@torch.no_grad()
def paired_sequential(runner: BlockRunner, windows: torch.Tensor, levels: int, solve_group: SolveGroup,
                      batch: int = 8, finished: Callable[[int], bool] | None = None, gram_factory=None) -> None:
    """FISTAPruner's calibration: every block on dense inputs, and inside a block, group by group (q/k/v, o,
    gate/up, down), each group's input both on the dense path (X) and, per level, on the path whose earlier
    groups are already pruned at that level (X*). Blocks are independent of each other's compression."""
    ad = runner.adapter
    device = next(ad.model.parameters()).device
    hidden = [runner.embed(windows[i: i + batch].to(device)) for i in range(0, windows.shape[0], batch)]
    for h in hidden:
        runner.block_kwargs(h.shape[0], h.shape[1], h.device)
    for b in range(ad.num_blocks):
        if not (finished and finished(b)):
            pruned: list[dict[str, torch.Tensor]] = [{} for _ in range(levels)]
            for group in ad.input_groups(b):
                # before anything of the block is pruned both paths agree: one Gram serves every level
                shared = not any(pruned)
                grams = [gram_factory(group[0].in_features, hidden[0].device) for _ in range(1 if shared else levels)]
                for h in hidden:
                    dense_x = group_input(runner, ad, group[0].name, h, b, {})
                    for lvl, gram in enumerate(grams):
                        gram.add_batch(dense_x, None if shared else
                                       group_input(runner, ad, group[0].name, h, b, pruned[lvl]))
                grams = grams * levels if shared else grams
                for lvl, weights in solve_group(b, group, grams).items():
                    pruned[lvl].update(weights)
        hidden = [runner.run(h, b, b + 1) for h in hidden]  # dense propagation


def group_input(runner: BlockRunner, ad: DecoderAdapter, name: str, h: torch.Tensor, b: int,
                 weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The input of linear `name` in block b for block input h, with `weights` swapped in."""
    seen: list[torch.Tensor] = []

    def grab(_m, args):
        seen.append(args[0])
        raise _Captured  # the rest of the block is not needed

    hook = ad.module(name).register_forward_pre_hook(grab)
    try:
        with replaced_weights(ad, weights):
            runner.run(h, b, b + 1)
    except _Captured:
        pass
    finally:
        hook.remove()
    return seen[0]


class _Captured(Exception):
    pass
