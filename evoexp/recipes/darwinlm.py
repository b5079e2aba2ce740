"""`search=darwinlm` inside the structured recipe: EvoPress over the structured (ZipLM) database with
training-aware selection (`evoexp.search.training`). The found configuration is the run's allocation like any
search's; its post-compression training is the `train=` group's.

The training text is `search.train_windows` windows of `data.seq_len` tokens of `data.calib`, drawn with seed
`data.seed + 1` (the fitness windows use `data.seed`; the two can overlap, as the authors' two shuffles of one
stream do). The fine-tuning loss is next-token cross-entropy, the fitness KL to the dense model (fitness.kind).
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from evoexp.config import DarwinLMCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database
from evoexp.eval import heldout_tracker
from evoexp.fitness import minibatch, sample_minibatch
from evoexp.methods.layerwise import Allocation, LayerLevels
from evoexp.recipes.common import evopress_settings, generation_logger
from evoexp.search.training import (CandidateTrainer, DarwinLM, DarwinLMSettings, Masks, TrainingAwareEvaluator,
                                    TrainSettings, TrainStage)

TRAIN_SEED = 1  # offset of data.seed for the training windows


def train_settings(s: DarwinLMCfg) -> TrainSettings:
    return TrainSettings(lr=s.lr, weight_decay=s.weight_decay, batch=s.train_batch, protect_pruned=s.protect_pruned)


def darwinlm_settings(s: DarwinLMCfg, default_generations: int) -> DarwinLMSettings:
    base = asdict(evopress_settings(s, default_generations, s.init or "uniform"))
    base["stages"] = [TrainStage(st.survivors, st.tokens, st.train_tokens) for st in s.stages]
    return DarwinLMSettings(**base, train=train_settings(s), continue_training=s.continue_training)


def training_windows(recipe, n: int) -> torch.Tensor:
    data, ctx = recipe.rc.data, recipe.ctx
    stream = load_tokens(data.calib, ctx.loaded.tokenizer, data.jsonl_field)
    windows, _ = calibration_windows(stream, ctx.loaded.tokenizer, data.seq_len, n, data.seed + TRAIN_SEED, data.bos)
    return windows


def trained_parameters(adapter) -> list:
    """What a candidate fine-tunes: the decoder blocks and the final norm. The embeddings and the head stay as
    they are (the authors train them too): the KL fitness is computed against the teacher through the head both
    share (`evoexp.fitness`), which a trained head would break, and their AdamW states would be a fifth of the
    embedded model's training memory."""
    return [p for module in (*adapter.blocks, adapter.final_norm) for p in module.parameters()]


class PrunedMasks:
    """{o_proj / down_proj weight: [1, in] bool mask of its kept columns} for a state, from the database's kept
    groups (cached per layer and level: a few bytes each)."""

    def __init__(self, adapter, db: Database, lv: LayerLevels):
        self.adapter, self.db, self.lv = adapter, db, lv
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, state: np.ndarray) -> Masks:
        return self.of_levels(self.lv.layers_of(state))

    def of_levels(self, levels: dict[str, int]) -> Masks:
        out = {}
        for name, level in levels.items():
            weight = self.adapter.module(name).weight
            key = (name, int(level))
            if key not in self.cache:
                kept = torch.zeros(weight.shape[1], dtype=torch.bool)
                kept[self.db.structured(name, int(level)).columns()] = True
                self.cache[key] = kept.view(1, -1)
            out[weight] = self.cache[key].to(weight.device)
        return out


def darwinlm_search(recipe, s: DarwinLMCfg) -> Allocation:
    """Run DarwinLM's training-aware EvoPress for `recipe` (a StructuredRecipe) and return the found allocation."""
    ctx, db, lv = recipe.ctx, recipe.search_db(), recipe.level_space()

    def put(state: np.ndarray) -> None:
        recipe.put_levels(db, lv.layers_of(state))

    put(lv.space.uniform_state())  # the applier now owns every o_proj / down_proj weight: it restores those
    applier = recipe.appliers[db.key]
    trainer = CandidateTrainer(recipe.adapter.model, trained_parameters(recipe.adapter),
                               training_windows(recipe, s.train_windows), train_settings(s),
                               frozen_by=lambda: set(applier.owned.originals))
    evaluator = TrainingAwareEvaluator(recipe.runner, recipe.teacher, put, PrunedMasks(recipe.adapter, db, lv), trainer,
                                       max_batch=s.max_batch, scores_dir=ctx.out_dir,
                                       context={"model": ctx.loaded.fingerprint, "database": db.key,
                                                "units": lv.space.names})
    evaluator.extra_counters["level_loads"] = lambda: applier.loads
    rc, teacher, train = recipe.rc, recipe.teacher, trainer.windows
    track = heldout_tracker(ctx.loaded, rc.eval, rc.dtype.value, s.track_every, s.track_windows, evaluator.apply)
    engine = DarwinLM(darwinlm_settings(s, recipe.kind.default_generations), lv.space, evaluator,
                      lambda tokens, rng: minibatch(teacher, tokens, rng),
                      lambda tokens, rng: sample_minibatch(train.shape[0], train.shape[1], tokens, rng),
                      rc.seed, ctx.out_dir, generation_logger(ctx.tracker), track=track)
    result = engine.run()
    counters = evaluator.counters()
    return Allocation(db, lv.layers_of(result.state), {
        "kind": "darwinlm", "fitness": result.fitness, "generations": result.generations,
        "evaluations": counters["evaluations"], "block_passes": counters["block_passes"],
        "train_tokens": counters["train_tokens"], "level_loads": counters["level_loads"], "init": s.init or "uniform"})
