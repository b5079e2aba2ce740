"""`train=finetune|distill` for the per-layer recipes: the found model trained in place after its one-shot
evaluation, evaluated again as `<search>_trained`, then the dense weights put back.

Pruned entries stay pruned: per-level structured layers keep their removed columns at zero (the database's kept
groups), sparse layers their zeros. The decoder blocks and the final norm train; the embeddings and the head stay
(distillation reads the teacher's stored hidden states through the head). The training text is `train.windows`
windows of `train.seq_len` tokens of `data.calib`, drawn with seed `data.seed + 2`.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from evoexp.config import TrainCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.eval import evaluate_ppl, evaluate_zeroshot
from evoexp.eval.zeroshot import zeroshot_wanted
from evoexp.methods.layerwise import Allocation
from evoexp.recipes.contract import ModelEval
from evoexp.recipes.darwinlm import PrunedMasks, trained_parameters
from evoexp.train.posttrain import PostTrainer, PostTrainSettings, teacher_states

TRAIN_DATA_SEED = 2  # offset of data.seed for the post-training windows


def settings(t: TrainCfg, seed: int) -> PostTrainSettings:
    return PostTrainSettings(kind=t.kind, tokens=t.tokens, batch=t.batch, lr=t.lr, schedule=t.schedule,
                             warmup=t.warmup, weight_decay=t.weight_decay, ce_weight=t.ce_weight,
                             checkpoint_every=t.checkpoint_every, seed=seed if t.seed is None else t.seed)


def train_windows(recipe, t: TrainCfg) -> torch.Tensor:
    data, ctx = recipe.rc.data, recipe.ctx
    seq = t.seq_len or data.seq_len
    n = t.windows or -(-t.tokens // seq)
    stream = load_tokens(data.calib, ctx.loaded.tokenizer, data.jsonl_field)
    return calibration_windows(stream, ctx.loaded.tokenizer, seq, n, data.seed + TRAIN_DATA_SEED, data.bos)[0]


def masks_of(recipe, alloc: Allocation) -> dict:
    """What stays of each compressed layer: structured, its kept columns; sparse, its non-zeros (the model holds
    `alloc`)."""
    if recipe.rc.method.kind == "structured":
        return PrunedMasks(recipe.adapter, alloc.db, recipe.level_space()).of_levels(alloc.levels)
    return {recipe.adapter.module(name).weight: recipe.adapter.module(name).weight != 0 for name in alloc.levels}


def post_train(recipe, name: str, alloc: Allocation) -> ModelEval:
    """Train the model holding `alloc`, evaluate it (held-out PPL, zero-shot as for the found model), and put the
    trained parameters back as they were. Resumable: training from its checkpoint, evaluations from the run dir."""
    ctx, t = recipe.ctx, recipe.rc.train
    s = settings(t, recipe.rc.seed)
    windows = train_windows(recipe, t)
    runner = recipe.runner

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        return runner.final(runner.run(runner.embed(ids.to(recipe.adapter.embed.weight.device)), 0))

    teacher = None
    if t.kind == "distill":
        recipe.put(None)
        with ctx.timed("train_teacher"):
            teacher = teacher_states(hidden, windows)
    recipe.put(alloc)
    params = trained_parameters(recipe.adapter)
    saved = [p.detach().clone() for p in params]
    trainer = PostTrainer(recipe.adapter.model, params, windows, s, masks_of(recipe, alloc), ctx.out_dir / "train",
                          hidden_of=hidden, head=recipe.adapter.lm_head, teacher_hidden=teacher,
                          log_fn=lambda r: ctx.tracker.log({"train": r}))
    with ctx.timed("train"):
        record = trainer.run()
    sid = ["trained", alloc.db.key, alloc.levels, asdict(s), list(windows.shape)]
    entry = ModelEval(details={**recipe.details(alloc), "train": {**asdict(s), "steps": record["steps"],
                                                                  "tokens": record["tokens"],
                                                                  "final_loss": record["history"][-1]["loss"]}})
    rc = recipe.rc
    if rc.eval.ppl and rc.eval.datasets:
        with ctx.timed(f"eval_ppl_{name}"):
            entry.ppl = evaluate_ppl(ctx.loaded, rc.eval, rc.dtype.value, dense=False, run_dir=ctx.out_dir,
                                     state_id=sid)
    if zeroshot_wanted(rc.eval.zeroshot, rc.search.kind, rc.search.kind):  # as the found model's
        with ctx.timed(f"eval_zeroshot_{name}"):
            entry.zeroshot = evaluate_zeroshot(ctx.loaded, rc.eval.zeroshot, rc.dtype.value, dense=False,
                                               run_dir=ctx.out_dir, state=name, state_id=sid)
    with torch.no_grad():  # the trained parameters back; the applier re-installs its written layers
        for p, v in zip(params, saved):
            p.copy_(v)
    recipe.put(None)
    return entry
