"""Training-aware selection (DarwinLM): every candidate of a stage is fine-tuned briefly before it is scored, so
the search favours compressed models that recover well when trained.

    trainer = CandidateTrainer(model, block_params, train_windows, TrainSettings(lr=1e-5), frozen_by=applier_params)
    evaluator = TrainingAwareEvaluator(runner, teacher, put_levels, pruned_masks, trainer)
    DarwinLM(settings, space, evaluator, sample, sample_train, seed, run_dir).run()

- `CandidateTrainer` keeps one snapshot of what a candidate trains (every parameter but those the level applier
  installs, which it re-installs from the database once they were written) and restores it before the next
  candidate: no copy of the model per candidate, so memory does not grow with the number of offspring.
- With `protect_pruned` the removed columns (heads, neurons) are masked out of the gradients and re-zeroed after
  each step, on fp32 master weights when the model is in a lower precision; without it every weight trains in
  the model's dtype, as the released code does (pruned columns regrow; bf16 weights barely move at lr 1e-5).
- A candidate's training order and any dropout come from a seed drawn from the search's checkpointed generator,
  so a resumed search trains exactly what an uninterrupted one does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from evoexp.fitness import Minibatch
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage
from evoexp.train.masked import MaskedAdamW, trainable

log = logging.getLogger(__name__)
Masks = dict[nn.Parameter, torch.Tensor]  # parameter -> bool mask of the entries that stay (False: pruned)


@dataclass
class TrainStage(Stage):
    train_tokens: int = 0


@dataclass
class TrainSettings:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    batch: int = 1  # sequences per optimizer step
    protect_pruned: bool = True


@dataclass
class DarwinLMSettings(EvoPressSettings):
    train: TrainSettings = None  # set by the recipe; part of the search's identity (resume key)
    continue_training: bool = False


class CandidateTrainer:
    """Fine-tunes `model` in place on training windows and puts its trained parameters back afterwards."""

    def __init__(self, model: nn.Module, trained: list[nn.Parameter], windows: torch.Tensor,
                 settings: TrainSettings, frozen_by: Callable[[], set[nn.Parameter]] = set):
        """`trained`: the parameters a candidate fine-tunes (the others keep their values); `windows` [n, seq_len]
        token ids; `frozen_by()` gives the trained parameters another owner restores (the level applier's): they
        train, but are not snapshotted here."""
        self.model, self.trained, self.windows, self.s = model, trained, windows, settings
        self.frozen_by = frozen_by
        self.snapshot: dict[nn.Parameter, torch.Tensor] = {}
        self.tokens = 0  # training tokens seen by this process (a work counter)

    def params(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for p in self.trained:  # a tied weight once
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def take_snapshot(self) -> None:
        """Remember every parameter a candidate's training may change and no applier restores."""
        frozen = self.frozen_by()
        self.snapshot = {p: p.detach().clone() for p in self.params() if p not in frozen}

    @torch.no_grad()
    def reset(self) -> None:
        """The snapshotted parameters as they were (the applier's re-install the rest on their next apply)."""
        for p, saved in self.snapshot.items():
            p.data.copy_(saved)

    def train(self, batches: list[Minibatch], masks: Masks, seed: int) -> float:
        """One pass over each minibatch in turn with one AdamW (a survivor continuing its training replays its
        earlier stages' batches first); returns the last minibatch's mean next-token loss."""
        if not self.snapshot:
            self.take_snapshot()
        params = self.params()
        opt = MaskedAdamW(params, masks, self.s.lr, self.s.weight_decay, self.s.betas, self.s.protect_pruned)
        was_training = self.model.training
        self.model.train()
        loss_sum, count = 0.0, 0
        try:
            with trainable(params), torch.random.fork_rng(devices=[]):  # dropout (if any) from the candidate's seed
                torch.manual_seed(seed)
                order = np.random.Generator(np.random.PCG64(seed))
                for batch in batches:
                    loss_sum, count = 0.0, 0
                    for ids in self._steps(batch, order):
                        ids = ids.to(params[0].device)
                        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
                        loss.backward()
                        opt.step()
                        self.tokens += ids.numel()
                        loss_sum, count = loss_sum + float(loss.detach()) * ids.numel(), count + ids.numel()
        finally:
            self.model.train(was_training)
        return loss_sum / max(count, 1)

    def _steps(self, batch: Minibatch, order: np.random.Generator):
        """The minibatch's windows in a seeded order, `batch` sequences of equal length per step."""
        items = [batch.items[i] for i in order.permutation(len(batch.items))]
        by_len: dict[int, list[int]] = {}
        for idx, n in items:
            by_len.setdefault(n, []).append(idx)
        for n, ids in sorted(by_len.items(), reverse=True):
            for i in range(0, len(ids), self.s.batch):
                yield self.windows[ids[i: i + self.s.batch], :n]


class TrainingAwareEvaluator(CandidateEvaluator):
    """Scores each candidate after fine-tuning it from its database weights (`apply_levels`) on a training
    minibatch; always a full forward (training changes every block, so no parent inputs are reused).

    `apply(state)` (what the search's tracker and the report use) puts the state's one-shot model in place: the
    snapshotted parameters as they were and the state's database weights.
    """

    def __init__(self, runner, teacher, apply_levels: Callable[[np.ndarray], None],
                 pruned_masks: Callable[[np.ndarray], Masks], trainer: CandidateTrainer, **kwargs):
        super().__init__(runner, teacher, self._apply, np.zeros(0), incremental=False, **kwargs)
        self.apply_levels, self.pruned_masks, self.trainer = apply_levels, pruned_masks, trainer
        self.extra_counters["train_tokens"] = lambda: self.trainer.tokens
        self._trained: np.ndarray | None = None  # the state whose trained model is in place

    def _apply(self, state) -> None:
        if self._trained is not None and np.array_equal(self._trained, state):
            return  # scoring the model `prepare` trained: applying the levels again would undo its training
        with torch.inference_mode(False):  # called from a scoring: what it installs must stay trainable
            self.prepare(state, None, 0)

    def prepare(self, state: np.ndarray, train: list[Minibatch] | None, seed: int) -> None:
        """The model holds `state`'s database weights, fine-tuned on `train` (none: one-shot)."""
        self._trained = None
        self.trainer.reset()
        self.apply_levels(state)
        if train:
            self.trainer.train(train, self.pruned_masks(state), seed)
            self._trained = np.asarray(state).copy()

    def score(self, states, batch: Minibatch, parent=None, desc=None, train: list[list[Minibatch]] | None = None,
              seeds: list[int] | None = None) -> list[float]:
        """Fitness of every state on `batch`, each after its own training (`train[i]`, seeded by `seeds[i]`);
        without `train`, of the one-shot models (the search's start, the report)."""
        if train is None:
            return super().score(states, batch, desc=desc)
        out = []
        try:
            for state, batches, seed in zip(states, train, seeds):
                self.prepare(state, batches, seed)
                out.append(super().score([state], batch)[0])
        finally:
            self._trained = None
            self.trainer.reset()
        return out


class DarwinLM(EvoPress):
    """EvoPress whose stages fine-tune every candidate before scoring it (see the module docstring).

    Each stage draws one training minibatch (`sample_train(tokens, rng)`, shared by the stage's candidates) and a
    fitness minibatch; the parent joins at the last stage and is trained like the others. Without
    `continue_training` every stage trains a survivor from its database weights; with it, a survivor's training
    replays its earlier stages' minibatches first, which is what continuing would have computed.
    """

    def __init__(self, settings: DarwinLMSettings, space, evaluator: TrainingAwareEvaluator, sample,
                 sample_train: Callable[[int, np.random.Generator], Minibatch], seed: int, run_dir=None,
                 on_generation=None, track=None):
        super().__init__(settings, space, evaluator, sample, seed, run_dir, on_generation, track=track)
        self.sample_train = sample_train
        self._history: dict[bytes, list[Minibatch]] = {}  # this generation's training of each candidate

    def _score_stage(self, index, stage, cands, parent, rng):
        if index == 0:
            self._history = {}
        train = self.sample_train(stage.train_tokens, rng) if stage.train_tokens else None
        batch = self.sample(stage.tokens, rng)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=len(cands))]
        plans = []
        for c in cands:
            earlier = self._history.get(c.tobytes(), []) if self.s.continue_training else []
            plans.append([*earlier, train] if train is not None else earlier)
            self._history[c.tobytes()] = plans[-1]
        fits = self.evaluator.score(cands, batch, parent=parent, train=plans, seeds=seeds)
        return fits, {"tokens": batch.tokens, "train_tokens": train.tokens if train is not None else 0}
