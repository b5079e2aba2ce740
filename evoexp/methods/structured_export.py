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
from evoexp.utils import write_json

LOADING = ("\n## Loading\n\nPhysically shrunk: each layer keeps its own query heads, K/V heads and MLP neurons (config "
           "`evoexp_hetero`, modeling code beside config.json). Load with `AutoModelForCausalLM.from_pretrained(dir, "
           "trust_remote_code=True)`, or with evoexp (`evoexp model=<dir>`, `evoexp.models.shrink.load_shrunk(dir)`), "
           "which runs its own installed copy of that code. `evoexp_structured.json` lists what each layer keeps.\n")


def shrunk_state(adapter: DecoderAdapter, alloc: Allocation) -> tuple[StructuredState, dict[str, torch.Tensor]]:
    """The heads and neurons every block keeps at the allocation's levels, and the kept columns' weights
    ({o_proj / down_proj name: [out, kept columns]}), as the database stores them."""
    db, kv_groups = alloc.db, bool(alloc.db.spec.extra.get("kv_groups"))
    blocks, weights = [], {}
    for g in geometry(adapter):
        o, down = (db.structured(name, alloc.levels[name]) for name in (g.attn_out, g.mlp_out))
        per = o.group_size // g.head_dim  # query heads per group: 1, or a KV group's
        heads = tuple(int(k) * per + j for k in o.kept.tolist() for j in range(per))
        blocks.append(BlockState(heads, tuple(down.kept.tolist())))
        weights[g.attn_out], weights[g.mlp_out] = o.weight, down.weight
    return StructuredState(tuple(blocks), kv_groups), weights


def export_structured(model, tokenizer, alloc: Allocation, allocation: dict, card: str, out: Path) -> Path:
    """The shrunk checkpoint of `alloc` in `out`, with allocation.json and the model card. `model` may hold any
    levels: the kept columns come from the database, every other kept tensor is the dense model's."""
    state, weights = shrunk_state(DecoderAdapter(model), alloc)
    out = save_shrunk(model, state, out, tokenizer, weights)
    write_json(out / "allocation.json", allocation, digest=False)  # shipped with the model: plain JSON
    (out / "README.md").write_text(card + LOADING)
    return out
