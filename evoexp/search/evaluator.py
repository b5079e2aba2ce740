"""Scoring candidate level states on a minibatch without doing any work twice.

The parent is run once per minibatch and the input of every block is kept; a child differs from the parent
only from some block on, so its forward starts there from the parent's stored input. The student's logits are
computed only as far as the fitness needs them (see `Teacher`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from evoexp.blockrun import BlockRunner
from evoexp.fitness import Minibatch, Teacher
from evoexp.utils import progress


class CandidateEvaluator:
    def __init__(self, runner: BlockRunner, teacher: Teacher, apply: Callable[[np.ndarray], None],
                 unit_block: np.ndarray, max_batch: int = 8, incremental: bool = True):
        self.runner, self.teacher, self.apply = runner, teacher, apply
        self.unit_block = np.asarray(unit_block)
        self.max_batch, self.incremental = max_batch, incremental
        self.evaluations = 0
        self.block_passes = 0  # decoder-block forwards (times sequences), the unit of search cost

    @torch.inference_mode()
    def score(self, states: list[np.ndarray], batch: Minibatch, parent: np.ndarray | None = None,
              desc: str | None = None) -> list[float]:
        """Fitness of every state on `batch`; `desc` labels a progress bar (for long one-off scorings, e.g.
        best of 64 random, not for EvoPress generations, which log a line each)."""
        device = next(self.teacher.adapter.model.parameters()).device
        groups = batch.groups(self.max_batch)
        windows = self.teacher.windows
        embeds = [self.runner.embed(windows[ids, :n].to(device)) for ids, n in groups]
        cache, parent_fit = None, None
        if parent is not None and self.incremental:
            cache = [[] for _ in groups]
            parent_fit = self._forward(parent, groups, embeds, 0, cache)
        out = []
        for state in states if desc is None else progress(states, desc=desc, unit="cand"):
            start = 0
            if cache is not None:
                changed = np.flatnonzero(state != parent)
                if changed.size == 0:
                    out.append(parent_fit)
                    continue
                start = int(self.unit_block[changed].min())
            hidden = [c[start] for c in cache] if cache is not None else embeds
            out.append(self._forward(state, groups, hidden, start))
        return out

    def _forward(self, state, groups, inputs, start: int, keep_inputs: list | None = None) -> float:
        self.apply(state)
        total, count = 0.0, 0
        for g, ((ids, n), hidden) in enumerate(zip(groups, inputs)):
            out = self.runner.run(hidden, start, inputs_out=None if keep_inputs is None else keep_inputs[g])
            loss, positions = self.teacher.loss_sum(self.runner.final(out), ids, n)
            total += loss
            count += positions
            self.block_passes += (self.runner.num_blocks - start) * len(ids)
        self.evaluations += 1
        return total / count
