"""Writing a structured allocation as a physically smaller model: each block keeps only its own query heads, K/V
heads and MLP neurons (`evoexp.models.shrink`), with the kept columns' compensated weights from the database.
"""
from __future__ import annotations

from pathlib import Path

import torch

from evoexp.methods.layerwise import Allocation
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.heads import BlockState, StructuredState, geometry
from evoexp.models.shrink import save_shrunk
from evoexp.solvers.structured import group_columns
from evoexp.utils import write_json

LOADING = ("\n## Loading\n\nPhysically shrunk: each layer keeps its own query heads, K/V heads and MLP neurons (config "
           "`evoexp_hetero`, modeling code beside config.json). Load with `AutoModelForCausalLM.from_pretrained(dir, "
           "trust_remote_code=True)`, or with evoexp (`evoexp model=<dir>`, `evoexp.models.shrink.load_shrunk(dir)`), "
           "which runs its own installed copy of that code. `evoexp_structured.json` lists what each layer keeps.\n")


def shrunk_state(adapter: DecoderAdapter, alloc: Allocation, from_model: bool = False
                 ) -> tuple[StructuredState, dict[str, torch.Tensor]]:
    """The heads and neurons every block keeps at the allocation's levels, and the kept columns' weights
    ({o_proj / down_proj name: [out, kept columns]}): as the database stores them, or (`from_model`) as the
    model holds them (a model trained with the allocation in place)."""
    db, kv_groups = alloc.db, bool(alloc.db.spec.extra.get("kv_groups"))
    blocks, weights = [], {}
    for g in geometry(adapter):
        o, down = (db.structured(name, alloc.levels[name]) for name in (g.attn_out, g.mlp_out))
        per = o.group_size // g.head_dim  # query heads per group: 1, or a KV group's
        heads = tuple(int(k) * per + j for k in o.kept.tolist() for j in range(per))
        blocks.append(BlockState(heads, tuple(down.kept.tolist())))
        for name, level in ((g.attn_out, o), (g.mlp_out, down)):
            weights[name] = level.weight if not from_model else \
                adapter.module(name).weight.detach()[:, group_columns(level.kept, level.group_size)]
    return StructuredState(tuple(blocks), kv_groups), weights


def export_structured(model, tokenizer, alloc: Allocation, allocation: dict, card: str, out: Path,
                      from_model: bool = False) -> Path:
    """The shrunk checkpoint of `alloc` in `out`, with allocation.json and the model card. The kept columns come
    from the database (`model` may then hold any levels) or, `from_model`, from the model holding `alloc` (trained);
    every other kept tensor is the model's."""
    state, weights = shrunk_state(DecoderAdapter(model), alloc, from_model)
    out = save_shrunk(model, state, out, tokenizer, weights)
    write_json(out / "allocation.json", allocation, digest=False)  # shipped with the model: plain JSON
    (out / "README.md").write_text(card + LOADING)
    return out
