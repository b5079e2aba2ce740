"""Run a decoder one block at a time, the way searches and layer-wise solvers need it.

The keyword arguments a block receives (position embeddings, masks, cache positions...) are captured from a
real forward of the model with pre-hooks, so no architecture's internals are re-implemented here.
"""
from __future__ import annotations

import torch

from evoexp.models.adapter import CACHE_KWARGS, DecoderAdapter


class _Stop(Exception):
    pass


class BlockRunner:
    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self._kwargs: dict[tuple[int, int], list[dict]] = {}

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The hidden states entering block 0 (embedding plus any model-specific scaling)."""
        captured = {}

        def hook(_mod, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.adapter.body(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"]

    @torch.inference_mode()
    def block_kwargs(self, batch: int, length: int, device: torch.device) -> list[dict]:
        """Per-block keyword arguments for inputs of this shape, captured once per shape by one forward of the
        model on dummy tokens (call it before registering hooks that must see only real data). Only block 0
        computes in that forward: the others pass their input through, which leaves their kwargs unchanged."""
        key = (batch, length)
        if key not in self._kwargs:
            per_block: list[dict] = [{} for _ in range(self.num_blocks)]
            first_out = {}
            handles = [
                blk.register_forward_pre_hook(
                    lambda _m, _a, kw, i=i: per_block[i].update(
                        {k: v for k, v in kw.items() if k != "hidden_states" and k not in CACHE_KWARGS}), with_kwargs=True)
                for i, blk in enumerate(self.adapter.blocks)
            ]
            handles.append(self.adapter.blocks[0].register_forward_hook(
                lambda _m, _a, out: first_out.update(out=out)))

            def passthrough(*args, **kwargs):  # returns what block 0 returned, with the input as hidden state
                hidden = args[0] if args else kwargs["hidden_states"]
                out = first_out["out"]
                return hidden if torch.is_tensor(out) else (hidden, *out[1:])

            skipped = list(self.adapter.blocks)[1:]
            for blk in skipped:
                blk.forward = passthrough
            try:
                ids = torch.zeros((batch, length), dtype=torch.long, device=device)
                self.adapter.body(input_ids=ids, use_cache=False)
            finally:
                for blk in skipped:
                    del blk.forward
                for h in handles:
                    h.remove()
            self._kwargs[key] = per_block
        return self._kwargs[key]

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, start: int, stop: int | None = None,
            inputs_out: list | None = None) -> torch.Tensor:
        """Blocks [start, stop) on `hidden`; with `inputs_out`, each block's input is appended to it."""
        stop = self.num_blocks if stop is None else stop
        kwargs = self.block_kwargs(hidden.shape[0], hidden.shape[1], hidden.device)
        for i in range(start, stop):
            if inputs_out is not None:
                inputs_out.append(hidden)
            out = self.adapter.blocks[i](hidden, **kwargs[i])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.final_norm(hidden)
