"""Writing a per-layer compressed model in the formats users load it with.

- `hf`: a plain Hugging Face checkpoint (sparse: safetensors with the zeros; quant: the dequantized weights);
  loads with `AutoModelForCausalLM.from_pretrained` and nothing else.
- `compressed_tensors`: the packed integer codes in compressed-tensors' `pack-quantized` format, one config group
  per bit-width (targets are the exact layer names), which transformers loads (with `compressed-tensors`
  installed). Groups are written as compressed-tensors' `block` strategy with block structure [1, group_size]:
  unlike its `group` strategy, that accepts an input width the group size does not divide, e.g. 576 = 4.5 x 128
  (the last group of a row is partial: columns 512..575 share one scale and zero point).

Every export directory also gets `allocation.json` (the level of every layer) and a model card (`README.md`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from evoexp import __version__
from evoexp.errors import UserError
from evoexp.utils import write_json

log = logging.getLogger(__name__)
FORMATS = ("hf", "compressed_tensors")


def natural_format(method_kind: str) -> str:
    return "compressed_tensors" if method_kind == "quant" else "hf"


def export_allocation(recipe, alloc, allocation: dict, models: dict, fmt: str) -> Path:
    """Export `alloc` of a LayerwiseRecipe run into <run dir>/model; the recipe's model is left dense."""
    if fmt not in FORMATS:
        raise UserError(f"export: expected one of {', '.join(FORMATS)} (or none), got {fmt!r}")
    kind = alloc.db.spec.kind
    if fmt == "compressed_tensors" and kind != "quant":
        raise UserError(f"export: compressed_tensors packs quantized weights; method={kind} exports as hf")
    out = Path(recipe.out_dir) / "model"
    model, tokenizer = recipe.loaded.model, recipe.loaded.tokenizer
    try:
        recipe.put(alloc)
        if fmt == "hf":
            model.save_pretrained(out)
        else:
            save_compressed_tensors(model, alloc, out)
    finally:
        recipe.put(None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_json(out / "allocation.json", allocation)
    (out / "README.md").write_text(model_card(recipe, allocation, models, fmt))
    log.info("exported %s (%s) to %s", recipe.loaded.name, fmt, out)
    return out


# --- compressed-tensors ---------------------------------------------------------------------------------------
def save_compressed_tensors(model, alloc, out: Path) -> None:
    """Dense tensors for everything but the allocation's layers, packed codes + scales + zero points for those."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    db = alloc.db
    dtype = model.dtype
    state = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    groups: dict[int, list[str]] = {}
    gsize = db.spec.solver.get("group_size", 0)
    for name, level in alloc.levels.items():
        q = db.quantized(name, level)
        cols = q.codes.shape[1]
        width = gsize or cols
        if not torch.equal(q.g_idx.long(), torch.arange(cols) // width):
            raise UserError(f"export: {name} has act-order column groups; compressed_tensors export needs "
                            "solver.act_order=false")
        offset = 1 << (q.bits - 1)  # compressed-tensors stores signed codes (q - 2^(b-1))
        state.pop(f"{name}.weight")
        state[f"{name}.weight_packed"] = pack_to_int32((q.codes.to(torch.int16) - offset).to(torch.int8), q.bits)
        state[f"{name}.weight_scale"] = q.scales.to(dtype)
        state[f"{name}.weight_zero_point"] = (q.zeros.round().to(torch.int16) - offset).to(torch.int8)
        state[f"{name}.weight_shape"] = torch.tensor(list(q.codes.shape), dtype=torch.int64)
        groups.setdefault(q.bits, []).append(name)
    sym = bool(db.spec.solver.get("sym", False))
    config_groups = {
        f"group_{i}": {
            "targets": sorted(names),
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "block",
                        "block_structure": [1, gsize or max(db.shape(n)[1] for n in names)], "dynamic": False,
                        "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
        for i, (bits, names) in enumerate(sorted(groups.items()))}
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "version": _ct_version()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def _ct_version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")


# --- the model card -------------------------------------------------------------------------------------------
def model_card(recipe, allocation: dict, models: dict, fmt: str) -> str:
    rc = recipe.rc
    found = models.get(rc.search.kind, {})
    lines = [
        f"# {recipe.loaded.name}: {allocation['summary']}",
        "",
        f"Compressed with [evoexp](https://github.com/evoexp/evoexp) {__version__}: method `{rc.method.kind}`, "
        f"target {rc.method.target}, allocation by `{rc.search.kind}`, solver `{rc.solver.kind}`.",
        "",
        "| | |", "|---|---|",
        f"| format | `{fmt}` |",
        f"| source model | {recipe.loaded.source} (`{recipe.loaded.fingerprint}`) |",
        f"| calibration | `{rc.data.calib}`, database {rc.database.windows} x {rc.database.seq_len} tokens, "
        f"seed {rc.data.seed} |",
        f"| database | `{allocation['database']}` |",
        f"| seed | {rc.seed} |",
    ]
    if "fitness" in found:
        lines.append(f"| {found['fitness_kind']} fitness | {found['fitness']:.5f} on {found['fitness_tokens']} "
                     "calibration tokens |")
    for spec, entry in found.get("ppl", {}).items():
        for dtype, fig in entry.items():
            if dtype != "protocol":
                lines.append(f"| {spec} PPL ({dtype}) | {fig['ppl']:.3f} |")
    lines += ["", "Level of every layer: `allocation.json`.", ""]
    if fmt == "compressed_tensors":
        lines += ["Load with `AutoModelForCausalLM.from_pretrained(dir)` (needs `pip install compressed-tensors`). "
                  "Each bit-width is one config group; groups of input columns use the `block` strategy "
                  "[1, group size], whose last group per row is partial when the group size does not divide "
                  "the input width.", ""]
    return "\n".join(lines)
