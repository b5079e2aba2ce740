"""Writing a per-layer compressed model in the formats users load it with.

- `hf`: a plain Hugging Face checkpoint (sparse: safetensors with the zeros; quant: the dequantized weights);
  loads with `AutoModelForCausalLM.from_pretrained` and nothing else.
- `compressed_tensors`: the packed integer codes in compressed-tensors' `pack-quantized` format, one config group
  per bit-width (targets are the exact layer names), which transformers loads (with `compressed-tensors`
  installed). Groups are written as compressed-tensors' `block` strategy with block structure [1, group_size]:
  unlike its `group` strategy, that accepts an input width the group size does not divide, e.g. 576 = 4.5 x 128
  (the last group of a row is partial: columns 512..575 share one scale and zero point).
- `gptq`: the packed codes in the GPTQ checkpoint layout (`qweight`, `qzeros`, `scales`, `g_idx`) that GPTQModel
  loads, one default bit-width in `quantization_config` and GPTQModel's per-module `dynamic` overrides for the
  layers at other widths (details in `save_gptq`).

Every export directory also gets `allocation.json` (the level of every layer) and a model card (`README.md`).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from evoexp import __version__
from evoexp.errors import UserError
from evoexp.sharing import umask_permissions
from evoexp.utils import write_json

log = logging.getLogger(__name__)
FORMATS = ("hf", "compressed_tensors", "gptq")


def export_allocation(model, tokenizer, alloc, allocation: dict, card: str, fmt: str, out: Path) -> Path:
    """Write `alloc` (an Allocation) into `out` in format `fmt`, with allocation.json and the model card.

    `model` must hold the allocation's weights (the caller applies it): `hf` saves the model as it is, the packed
    formats take the allocation's layers from the database and every other tensor from the model."""
    if fmt not in FORMATS:
        raise UserError(f"export: expected one of {', '.join(FORMATS)} (or none), got {fmt!r}")
    kind = alloc.db.spec.kind
    if fmt in ("compressed_tensors", "gptq") and kind != "quant":
        raise UserError(f"export: {fmt} packs quantized weights; method={kind} exports as hf")
    out = Path(out)
    if fmt == "hf":
        model.save_pretrained(out)
    elif fmt == "gptq":
        save_gptq(model, alloc, out)
    else:
        save_compressed_tensors(model, alloc, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_json(out / "allocation.json", allocation, digest=False)  # shipped with the model: plain JSON
    (out / "README.md").write_text(card)
    umask_permissions(out)
    log.info("exported %s to %s", fmt, out)
    return out


# --- compressed-tensors ---------------------------------------------------------------------------------------
def save_compressed_tensors(model, alloc, out: Path) -> None:
    """Dense tensors for everything but the allocation's layers, packed codes + scales + zero points for those."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    db = alloc.db
    dtype = model.dtype
    state = _dense_state(model)
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
    _write_checkpoint(model, out, state, {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "version": _ct_version()})


def _ct_version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")


def _dense_state(model) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    return state


def _write_checkpoint(model, out: Path, state: dict, quantization_config: dict) -> None:
    """config.json with `quantization_config`, the generation config and one model.safetensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


# --- GPTQ -----------------------------------------------------------------------------------------------------
GPTQ_BITS = (2, 3, 4, 5, 6, 7, 8)
# GPTQModel's planar layout: per 32 codes, bit planes whose widths divide 32, (plane width, bit offset) low to high
# (gptqmodel/utils/planar_packing.py `_PLANES`). 5/6/7 bits exist only planar; 3 bits is planar in a `gptq_p`
# checkpoint; 2/4/8-bit planes are bit-identical to the continuous layout.
GPTQ_PLANES = {3: ((2, 0), (1, 2)), 5: ((4, 0), (1, 4)), 6: ((4, 0), (2, 4)), 7: ((4, 0), (2, 4), (1, 6))}
PLANAR_ONLY = (5, 6, 7)
# Group sizes GPTQModel's kernels accept (TorchLinear.SUPPORTS_GROUP_SIZE); others pack fine but do not load.
GPTQ_KERNEL_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)


def save_gptq(model, alloc, out: Path) -> None:
    """The allocation in GPTQ's checkpoint layout, as GPTQModel (7.7) loads it; per quantized linear:

    - `qweight` int32 [ceil(in·b/32), out]: codes packed along the input dimension. Continuous layout (2/3/4/8
      bits): the codes of a column form one little-endian bit stream over its 32-bit words (code k = bits
      [k·b, (k+1)·b)), i.e. 32/b codes per word at shifts b·j and, for 3 bits, AutoGPTQ's 10-1-10-1-10 words in
      which codes 10 and 21 of every 32 straddle two words. Planar layout (5/6/7 bits, and 3 bits beside them):
      per 32 codes the words of each bit plane, low plane first (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1).
    - `qzeros` int32 [groups, ceil(out·b/32)]: zero points packed the same way along the output dimension.
    - `scales` fp16 [groups, out], `g_idx` int32 [in] (group of each input column; act-order permutes it, then
      desc_act is true), `bias` if the layer has one. groups = ceil(in / group size): 576 wide with group 128
      has a partial last group (columns 512..575).

    The checkpoint format follows from the widths and the grid, because GPTQModel reads them so:
    - any 5/6/7-bit layer: `gptq_p` (GPTQModel switches a config with such a layer to it, and then reads 3-bit
      layers as planar too), zero points stored as they are;
    - else sym=true: `gptq` (v1), whose stored zero is zero − 1 (AutoGPTQ's convention, added back on load;
      symmetric zeros are 2^(b−1) ≥ 1, so no field borrows from its neighbour); every GPTQ reader knows it;
    - else `gptq_v2`, zeros as they are: GPTQModel refuses an asymmetric v1 checkpoint it did not write itself,
      and a v1 zero point of 0 has no field value.

    config.json's `quantization_config` (also written as `quantize_config.json`) has quant_method gptq, the most
    common bit-width as `bits` and, in `dynamic`, GPTQModel's per-module overrides: `+:^<escaped name>$` ->
    {"bits": b} for every layer at another width, and `-:^<name>$` for linears left dense. Bit-widths other than
    2..8 raise a UserError, and so do 3/5/6/7-bit layers with a size not divisible by 32. `gptq_v2` and `gptq_p`
    are GPTQModel's own formats; other GPTQ readers know only `gptq` at 2/3/4/8 bits.
    """
    db = alloc.db
    gsize = db.spec.solver.get("group_size", 0)
    sym = bool(db.spec.solver.get("sym", False))
    quantized = {name: db.quantized(name, level) for name, level in alloc.levels.items()}
    for name, q in quantized.items():
        _check_gptq(name, q)
    bits = {name: q.bits for name, q in quantized.items()}
    planar = any(b in PLANAR_ONLY for b in bits.values())
    fmt = "gptq_p" if planar else "gptq" if sym else "gptq_v2"
    state = _dense_state(model)
    desc_act = False
    for name, q in quantized.items():
        state.pop(f"{name}.weight")
        state.update(_gptq_tensors(name, q, planar, v1=fmt == "gptq"))
        cols = q.codes.shape[1]
        desc_act |= not torch.equal(q.g_idx.long(), torch.arange(cols) // (gsize or cols))
    if (gsize or -1) not in GPTQ_KERNEL_GROUPS:
        log.warning("export: group size %d packs as GPTQ, but GPTQModel's kernels take only %s", gsize,
                    ", ".join(map(str, GPTQ_KERNEL_GROUPS)))
    default = max(sorted(set(bits.values())), key=list(bits.values()).count)  # the most common; ties: fewest bits
    dynamic = {_gptq_key("+", n): {"bits": b} for n, b in bits.items() if b != default}
    dynamic.update({_gptq_key("-", n): {} for n in _dense_linears(model, bits)})
    config = {"quant_method": "gptq", "method": "gptq", "bits": default, "group_size": gsize or -1,
              "desc_act": desc_act, "sym": sym, "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32",
              "lm_head": False, "dynamic": dynamic, "meta": {"quantizer": [f"evoexp:{__version__}"]}}
    _write_checkpoint(model, out, state, config)
    write_json(out / "quantize_config.json", config, digest=False)  # read by GPTQ loaders: plain JSON


def _check_gptq(name: str, q) -> None:
    rows, cols = q.codes.shape
    if q.bits not in GPTQ_BITS:
        raise UserError(f"export: {name} is {q.bits}-bit; GPTQ stores {', '.join(map(str, GPTQ_BITS))} bits")
    if q.bits in GPTQ_PLANES and (rows % 32 or cols % 32):
        raise UserError(f"export: {name} is {rows}x{cols}; GPTQ packs {q.bits}-bit codes in runs of 32 and needs "
                        "both sizes divisible by 32")


def _gptq_tensors(name: str, q, planar: bool, v1: bool) -> dict[str, torch.Tensor]:
    zeros = q.zeros.round().long() - int(v1)  # [out, groups]; v1 stores zero - 1
    return {f"{name}.qweight": gptq_pack(q.codes.T, q.bits, planar),
            f"{name}.qzeros": gptq_pack(zeros, q.bits, planar).T.contiguous(),  # packed along the output dim
            f"{name}.scales": q.scales.T.to(torch.float16).contiguous(),
            f"{name}.g_idx": q.g_idx.to(torch.int32)}


def gptq_pack(values: torch.Tensor, bits: int, planar: bool = False) -> torch.Tensor:
    """Unsigned b-bit values [n, m] packed along dim 0 into int32 words [ceil(n·b/32), m] (layouts: save_gptq);
    `planar`: a `gptq_p` checkpoint, where 3 bits is planar too."""
    if bits not in GPTQ_PLANES or (bits == 3 and not planar):
        return _bit_stream(values, bits)
    n, m = values.shape  # a multiple of 32: each plane of 32 values fills whole words
    planes = [_bit_stream((values.long() >> offset) & ((1 << width) - 1), width).view(n // 32, width, m)
              for width, offset in GPTQ_PLANES[bits]]
    return torch.cat(planes, 1).view(-1, m)


def _bit_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Value k of a column -> bits [k·b, (k+1)·b) of the column's little-endian stream of 32-bit words."""
    n, m = values.shape
    v = values.long()
    start = torch.arange(n) * bits
    word, shift = start // 32, (start % 32).view(-1, 1)
    words = torch.zeros((n * bits + 31) // 32 + 1, m, dtype=torch.int64)  # + 1: nothing spills there
    words.index_add_(0, word, (v << shift) & 0xFFFFFFFF)  # fields never overlap, so adding is or-ing
    words.index_add_(0, word + 1, v >> (32 - shift))  # the high bits of a value straddling two words
    words = words[:-1]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # uint32 bits as int32


def _gptq_key(sign: str, name: str) -> str:
    """GPTQModel's `dynamic` key matching exactly one module: `+:` overrides, `-:` leaves it unquantized."""
    return f"{sign}:^{re.escape(name)}$"


def _dense_linears(model, quantized: dict) -> list[str]:
    """Linears outside the allocation, which GPTQModel would otherwise expect quantized (lm_head never is)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and n not in quantized]


# --- the model card -------------------------------------------------------------------------------------------
@dataclass
class CardFacts:
    """What the model card states about the run that produced the model."""

    model_name: str
    source: str
    fingerprint: str
    method: str
    target: float
    search: str
    solver: str
    calibration: str  # e.g. "`wikitext2:train`, database 128 x 2048 tokens, seed 0"
    seed: int


def model_card(facts: CardFacts, allocation: dict, found: dict, fmt: str) -> str:
    """The export's README.md; `found` is the found model's entry of result.json (fitness, PPL)."""
    lines = [
        f"# {facts.model_name}: {allocation['summary']}",
        "",
        f"Compressed with [evoexp](https://github.com/evoexp/evoexp) {__version__}: method `{facts.method}`, "
        f"target {facts.target}, allocation by `{facts.search}`, solver `{facts.solver}`.",
        "",
        "| | |", "|---|---|",
        f"| format | `{fmt}` |",
        f"| source model | {facts.source} (`{facts.fingerprint}`) |",
        f"| calibration | {facts.calibration} |",
        f"| database | `{allocation['database']}` |",
        f"| seed | {facts.seed} |",
    ]
    if "fitness" in found:
        lines.append(f"| {found['fitness_kind']} fitness | {found['fitness']:.5f} on {found['fitness_tokens']} "
                     "calibration tokens |")
    if "train" in found:  # exported after post-compression training: the figures below are the trained model's
        t = found["train"]
        lines.append(f"| post-training | `{t['kind']}`, {t['tokens']:,} tokens, lr {t['lr']:g}, {t['schedule']}, "
                     f"seed {t['seed']} |")
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
    if fmt == "gptq":
        lines += ["Load with GPTQModel: `GPTQModel.load(dir)` (on a CPU: `device=\"cpu\", backend=BACKEND.TORCH`). "
                  "`quantization_config.bits` is the most common bit-width; `dynamic` overrides it per layer "
                  "(`+:^<layer>$` -> `{\"bits\": b}`). `checkpoint_format` is `gptq_p` (GPTQModel's planar "
                  "packing) when a layer has 5/6/7 bits, else `gptq` (v1) for symmetric grids and `gptq_v2` for "
                  "asymmetric ones. transformers' `AutoModelForCausalLM.from_pretrained` (with optimum and "
                  "GPTQModel installed) ignores `dynamic`: it loads an export with one bit-width for every layer "
                  "(on a CPU pass `quantization_config=GPTQConfig(..., backend=\"torch\")`), and refuses a "
                  "mixed one with a shape mismatch.", ""]
    return "\n".join(lines)
