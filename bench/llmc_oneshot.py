"""Run one llm-compressor `oneshot` recipe on a local Llama checkpoint.

Reference baseline for evoexp's own SparseGPT / Wanda / GPTQ solvers. It must
run inside the llm-compressor virtualenv and never imports evoexp:

    bench/.venv-llmcompressor/bin/python bench/llmc_oneshot.py \
        --model ~/.cache/evoexp/models/smollm2_135m-b179c9523d0e6a0f-v1 \
        --windows calib.safetensors --recipe gptq_w4_g128 --out /tmp/out \
        [--threads 2]

--windows is a safetensors file holding one int64 tensor `input_ids` of shape
[n, seq_len]; every window is used exactly once, as is (no shuffling, no BOS,
attention mask all ones).

Recipes (all restricted to the q/k/v/o/gate/up/down projections of the decoder
layers; lm_head and embeddings untouched):
    sparsegpt50   SparseGPTModifier sparsity 0.5, mask "0:0"
    sparsegpt24   SparseGPTModifier sparsity 0.5, mask "2:4"
    wanda50       WandaPruningModifier sparsity 0.5, mask "0:0"
    gptq_w4_g128  GPTQModifier int4 asymmetric, 1x128 blocks, no actorder
    gptq_w3_g128  GPTQModifier int3 asymmetric, 1x128 blocks, no actorder

--out receives a plain dense fp32 HF checkpoint (zeros / dequantized values,
no quantization_config) loadable with AutoModelForCausalLM.from_pretrained,
plus llmc_timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# The box has no network; fail fast instead of retrying HF Hub requests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# oneshot would set this anyway (and warn); we never tokenize in parallel.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

PIPELINE = "sequential"
BLOCK_SIZE = 128
DAMPENING = 0.01
# Only the seven projections of each decoder layer: the default "Linear"
# target would also hit lm_head, which is tied to the embeddings here.
TARGETS = [r"re:.*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"]
RECIPES = ("sparsegpt50", "sparsegpt24", "wanda50", "gptq_w4_g128", "gptq_w3_g128")
# Keys compressed-tensors / llm-compressor may leave in config.json; a dense
# export must not carry them or newer transformers would try to re-quantize.
QUANT_CONFIG_KEYS = ("quantization_config", "sparsity_config", "compression_config")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF Llama checkpoint dir")
    p.add_argument("--windows", required=True, help="safetensors with input_ids [n, L]")
    p.add_argument("--recipe", required=True, choices=RECIPES)
    p.add_argument("--out", required=True, help="output checkpoint dir")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def sparsity_modifier(name: str, mask: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if name == "wanda":
        return WandaPruningModifier(sparsity=0.5, mask_structure=mask, targets=TARGETS)
    return SparseGPTModifier(
        sparsity=0.5,
        mask_structure=mask,
        block_size=BLOCK_SIZE,
        dampening_frac=DAMPENING,
        targets=TARGETS,
    )


def gptq_modifier(bits: int):
    from llmcompressor.modifiers.gptq import GPTQModifier

    # strategy "group" needs in_features % 128 == 0 (576 is not), while
    # "block" [1, 128] is the same 128-column grouping per row and lets the
    # observer zero-pad the last partial block (zeros cannot move min/max,
    # which calculate_qparams already clamps to include 0).
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "strategy": "block",
        "block_structure": [1, 128],
        "actorder": None,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": TARGETS, "weights": weights}},
        block_size=BLOCK_SIZE,
        dampening_frac=DAMPENING,
        # Modifier-level default is "static"; None overrides it explicitly.
        actorder=None,
    )


def build_modifier(recipe: str):
    if recipe == "sparsegpt50":
        return sparsity_modifier("sparsegpt", "0:0")
    if recipe == "sparsegpt24":
        return sparsity_modifier("sparsegpt", "2:4")
    if recipe == "wanda50":
        return sparsity_modifier("wanda", "0:0")
    return gptq_modifier(int(recipe[len("gptq_w")]))


def load_windows(path: str) -> torch.Tensor:
    ids = load_file(path)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        shape = tuple(ids.shape)
        raise ValueError(f"input_ids must be int64 [n, L], got {ids.dtype} {shape}")
    return ids


def windows_dataset(ids: torch.Tensor):
    from datasets import Dataset

    # An `input_ids` column makes oneshot skip tokenization entirely.
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def calibration_loader(ds, seq_len: int):
    from llmcompressor.datasets.utils import DataCollatorWithTruncation
    from torch.utils.data import DataLoader, SequentialSampler

    # With shuffle off oneshot would use its LengthAwareSampler, whose
    # unstable argsort over equal lengths permutes the windows once n > 16.
    # Handing oneshot a DataLoader (a documented `dataset` type) keeps file
    # order; the collator is the one oneshot would use, a no-op here.
    return DataLoader(
        ds,
        batch_size=1,
        sampler=SequentialSampler(ds),
        collate_fn=DataCollatorWithTruncation(seq_len),
    )


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    # Passed as processor so oneshot doesn't try to build one itself.
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def run_oneshot(model, tokenizer, ds, modifier, n: int, seq_len: int) -> None:
    from llmcompressor import oneshot

    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calibration_loader(ds, seq_len),
        recipe=modifier,
        # No effect with a DataLoader; they state the intended settings.
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline=PIPELINE,
        output_dir=None,  # we save ourselves, outside the timed region
    )


def pipeline_used(modifier) -> str:
    from llmcompressor.pipelines import CalibrationPipeline

    # Same resolution oneshot performs for our explicit pipeline argument.
    pipe = CalibrationPipeline.from_modifiers([modifier], user=PIPELINE)
    return type(pipe).__name__


def dense_weight(module) -> torch.Tensor:
    from compressed_tensors.quantization import fake_quantize

    args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if args is None:
        return module.weight
    # GPTQ already stored dequantized values; re-applying QDQ with the stored
    # qparams pins the export to exactly what the quantized forward computes.
    zp = getattr(module, "weight_zero_point", None)
    return fake_quantize(module.weight, module.weight_scale, zp, args)


def dense_state_dict(model, keys: list[str]) -> dict[str, torch.Tensor]:
    # Only the checkpoint's original keys: drops weight_scale/zero_point etc.
    state = model.state_dict()
    for name, module in model.named_modules():
        if f"{name}.weight" in state and hasattr(module, "quantization_scheme"):
            state[f"{name}.weight"] = dense_weight(module)
    return {k: state[k].detach().to(torch.float32) for k in keys}


def drop_quant_attrs(config) -> None:
    for key in QUANT_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)


def strip_quant_keys(cfg_path: Path) -> None:
    # Belt and braces: the export must stay dense whatever oneshot attached.
    cfg = json.loads(cfg_path.read_text())
    if any(k in cfg for k in QUANT_CONFIG_KEYS):
        for key in QUANT_CONFIG_KEYS:
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_dense(model, tokenizer, out: Path, keys: list[str]) -> None:
    from transformers import PreTrainedModel

    state = dense_state_dict(model, keys)
    drop_quant_attrs(model.config)
    # oneshot replaced model.save_pretrained with a compressing wrapper that
    # writes quantization_config + qparams; call the plain class method.
    PreTrainedModel.save_pretrained(model, out, state_dict=state)
    tokenizer.save_pretrained(out)
    strip_quant_keys(out / "config.json")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ids = load_windows(args.windows)
    n, seq_len = ids.shape

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    keys = list(model.state_dict().keys())
    load_s = time.perf_counter() - t0

    import llmcompressor

    ds = windows_dataset(ids)
    modifier = build_modifier(args.recipe)
    modifier_desc = repr(modifier)
    t0 = time.perf_counter()
    run_oneshot(model, tokenizer, ds, modifier, n, seq_len)
    oneshot_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    save_dense(model, tokenizer, out, keys)
    save_s = time.perf_counter() - t0

    timing = {
        "recipe": args.recipe,
        "oneshot_seconds": oneshot_s,
        "load_seconds": load_s,
        "save_seconds": save_s,
        "windows": n,
        "seq_len": seq_len,
        "llmcompressor_version": llmcompressor.__version__,
        "pipeline": pipeline_used(modifier),
        "torch_threads": torch.get_num_threads(),
        "modifier": modifier_desc,
    }
    (out / "llmc_timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(json.dumps(timing, indent=2))


if __name__ == "__main__":
    main()
