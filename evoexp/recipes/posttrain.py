"""`train=finetune|distill`: the found model trained in place after its one-shot evaluation, evaluated again as
`<search>_trained`, optionally exported while trained, then the dense weights put back.

A recipe describes its found model as a `FoundModel` (how to put it and the dense model in place, which entries
stay pruned, what identifies it); `post_train` does the rest the same way for every method:

    entry = post_train(ctx, runner, "evopress_trained", found, while_trained=export)

Pruned entries stay pruned: per-level structured layers keep their removed columns at zero (the database's kept
groups), sparse layers their zeros; dropped sub-blocks are not in the forward, so they get no gradient. The decoder
blocks and the final norm train (or, with `train.lora.rank`, LoRA adapters on the blocks' linear layers, merged
into them when training ends: evoexp/train/lora.py); the embeddings and the head stay (distillation reads the
teacher's stored hidden states through the head). The training text is `train.windows` windows of `train.seq_len` tokens of `data.calib`,
drawn with seed `data.seed + 2`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from evoexp.config import TrainCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.eval import evaluate_ppl, evaluate_zeroshot
from evoexp.eval.zeroshot import zeroshot_wanted
from evoexp.recipes.common import shared_state
from evoexp.recipes.contract import ModelEval, RecipeContext
from evoexp.recipes.darwinlm import trained_parameters
from evoexp.tensorfiles import load_cached, save_safetensors, tensor_sha256
from evoexp.train.lora import LoraAdapters, LoraSettings, adapted_layers
from evoexp.train.posttrain import TRAIN_VERSION, PostTrainer, PostTrainSettings, teacher_states
from evoexp.utils import cache_root, stable_hash

TRAIN_DATA_SEED = 2  # offset of data.seed for the post-training windows
TEACHER_VERSION = 1  # bump when teacher_states computes something else, so cached states are not reused


@dataclass
class FoundModel:
    """What post-training needs from a recipe about the model it found."""

    put: Callable[[], None]  # the found (compressed) model in place
    put_dense: Callable[[], None]  # the dense model in place
    masks: Callable[[], dict]  # {parameter: bool mask of the entries that stay}, read with the found model in place
    identity: list  # what identifies the found model (keys the evaluation caches)
    details: Callable[[], dict]  # its result.json details (`achieved`, `lines`, ...), read with it in place


def settings(t: TrainCfg, seed: int) -> PostTrainSettings:
    return PostTrainSettings(kind=t.kind, tokens=t.tokens, batch=t.batch, lr=t.lr, schedule=t.schedule,
                             warmup=t.warmup, weight_decay=t.weight_decay, ce_weight=t.ce_weight,
                             checkpoint_every=t.checkpoint_every, seed=seed if t.seed is None else t.seed)


def train_windows(ctx: RecipeContext, t: TrainCfg) -> torch.Tensor:
    data, tok = ctx.rc.data, ctx.loaded.tokenizer
    seq = t.seq_len or data.seq_len
    n = t.windows or -(-t.tokens // seq)
    stream = load_tokens(data.calib, tok, data.jsonl_field)
    return calibration_windows(stream, tok, seq, n, data.seed + TRAIN_DATA_SEED, data.bos)[0]


def cached_teacher_states(ctx: RecipeContext, hidden: Callable, windows: torch.Tensor) -> torch.Tensor:
    """The dense model's final hidden states on the training windows, computed once per (weights, windows, dtype)
    and kept in the cache: every job of a table trains on the same text, and the pass costs minutes on a CPU."""
    key = stable_hash({"model": ctx.loaded.fingerprint, "dtype": ctx.rc.dtype.value, "version": TEACHER_VERSION,
                       "windows": tensor_sha256(windows.to(torch.int64))})
    path = cache_root() / "teacher_states" / f"{key}.safetensors"
    cached = load_cached(path, "computing the teacher states again")
    if cached is not None and cached["hidden"].shape[:2] == windows.shape:
        return cached["hidden"]
    states = teacher_states(hidden, windows)
    save_safetensors({"hidden": states}, path, metadata={"model": ctx.loaded.fingerprint})
    return states


def post_train(ctx: RecipeContext, runner, name: str, found: FoundModel,
               while_trained: Callable[[ModelEval], None] | None = None) -> ModelEval:
    """Train the found model, evaluate it (held-out PPL, zero-shot as for the found model), call `while_trained`
    with its entry while the trained model is in place (an export), then put the trained parameters back as they
    were and the dense model in place. Resumable: training from its checkpoint, evaluations from the run dir."""
    rc, adapter = ctx.rc, ctx.loaded.adapter
    t = rc.train
    s = settings(t, rc.seed)
    windows = train_windows(ctx, t)

    def teacher_hidden(ids: torch.Tensor) -> torch.Tensor:  # no gradient needed: block by block, inference mode
        return runner.final(runner.run(runner.embed(ids.to(adapter.embed.weight.device)), 0))

    teacher = None
    if t.kind == "distill":
        found.put_dense()
        with ctx.timed("train_teacher"):
            teacher = cached_teacher_states(ctx, teacher_hidden, windows)
    found.put()
    details = found.details()  # measured on the one-shot weights: training keeps what is pruned pruned
    params = trained_parameters(adapter)
    saved = [p.detach().clone() for p in params]  # a LoRA merge changes them too
    lora = lora_settings(t)
    try:
        with trained_set(ctx, lora, params, found.masks(), s.seed) as trained:
            trainer = PostTrainer(adapter.model, trained.params, windows, s, trained.masks, ctx.out_dir / "train",
                                  hidden_of=student_hidden(adapter), head=adapter.lm_head, teacher_hidden=teacher,
                                  log_fn=lambda r: ctx.tracker.log({"train": r}),
                                  identity=lora.record() if lora else None)
            with ctx.timed("train"):
                record = trainer.run()
            trained.merge()
        extra = {"lora": lora.record()} if lora else {}
        entry = ModelEval(details={**details, "train": {**asdict(s), **extra, "steps": record["steps"],
                                                              "tokens": record["tokens"],
                                                              "final_loss": record["history"][-1]["loss"]}})
        evaluate_trained(ctx, name, entry, ["trained", TRAIN_VERSION, *found.identity, asdict(s),
                                            list(windows.shape), *extra.values()])
        if while_trained is not None:
            while_trained(entry)
    finally:
        with torch.no_grad():  # the trained parameters back; the appliers re-install what they wrote
            for p, v in zip(params, saved):
                p.copy_(v)
        found.put_dense()
    return entry


def student_hidden(adapter) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trained model's final (normed) hidden states, with autograd: the model's own forward, which takes its
    compressed state as the recipes put it (masked columns, skipped sub-blocks). Not BlockRunner.run: it runs in
    inference mode, so the blocks would get no gradient and only the final norm would train."""
    def hidden(ids: torch.Tensor) -> torch.Tensor:
        return adapter.body(input_ids=ids.to(adapter.embed.weight.device), use_cache=False).last_hidden_state
    return hidden


def lora_settings(t: TrainCfg) -> LoraSettings | None:
    lora = t.lora
    return LoraSettings(lora.rank, lora.alpha, lora.dropout, list(lora.targets)) if lora.rank else None


class FullTraining:
    """Every parameter of the decoder blocks and the final norm trains (train.lora.rank=0): nothing to merge."""

    def __init__(self, params: list, masks: dict):
        self.params, self.masks = params, masks

    def merge(self) -> None:
        pass

    def __enter__(self) -> "FullTraining":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def trained_set(ctx: RecipeContext, lora: LoraSettings | None, params: list, masks: dict, seed: int):
    """What trains: the block parameters themselves, or LoRA adapters on the blocks' linear layers."""
    if lora is None:
        return FullTraining(params, masks)
    adapter = ctx.loaded.adapter
    return LoraAdapters(adapter.model, adapted_layers(adapter, lora.targets), lora, seed, masks)


def evaluate_trained(ctx: RecipeContext, name: str, entry: ModelEval, state_id: list) -> None:
    rc = ctx.rc
    wanted = zeroshot_wanted(rc.eval.zeroshot, rc.search.kind, rc.search.kind)  # as the found model's
    digest = shared_state(ctx, wanted)
    if rc.eval.ppl and rc.eval.datasets:
        with ctx.timed(f"eval_ppl_{name}"):
            entry.ppl = evaluate_ppl(ctx.loaded, rc.eval, rc.dtype.value, dense=False, run_dir=ctx.out_dir,
                                     state_id=state_id, digest=digest)
    if wanted:
        with ctx.timed(f"eval_zeroshot_{name}"):
            entry.zeroshot = evaluate_zeroshot(ctx.loaded, rc.eval.zeroshot, rc.dtype.value, dense=False,
                                               run_dir=ctx.out_dir, state=name, state_id=state_id, digest=digest)
