"""Scoring candidate level states on a minibatch without doing any work twice.

The parent is run once per minibatch and the input of every block is kept; a child differs from the parent
only from some block on, so its forward starts there from the parent's stored input. The student's logits are
computed only as far as the fitness needs them (see `Teacher`).

A one-off scoring (one with a `desc`, e.g. best of 64 random, which takes about half an hour on the embedded
model here) keeps each fitness in the run dir as it is taken, so a killed run scores only what is left.

Work counters (`evaluations`, `block_passes`, and any `extra_counters` such as a LevelApplier's decodes) count
the work of this process; `counters()` / `restore_counters()` let a resumed search carry an earlier process's
counts, and `credit_reused()` counts the scores a one-off scoring took from the run dir as the work they were.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evoexp.blockrun import BlockRunner
from evoexp.fitness import Minibatch, Teacher
from evoexp.utils import KeyedLog, progress, stable_hash

log = logging.getLogger(__name__)


def state_key(state) -> str:
    return stable_hash(np.asarray(state).tolist())


class CandidateEvaluator:
    def __init__(self, runner: BlockRunner, teacher: Teacher, apply: Callable[[np.ndarray], None],
                 unit_block: np.ndarray, max_batch: int = 8, incremental: bool = True,
                 scores_dir: Path | None = None, context: dict | None = None,
                 key_of: Callable[[Any], str] = state_key):
        """`scores_dir` keeps one-off scorings resumable; `context` must then name what a state means to `apply`
        (e.g. the database its levels index), and `key_of` gives a candidate's stable identity."""
        self.runner, self.teacher, self.apply = runner, teacher, apply
        self.unit_block = np.asarray(unit_block)
        self.max_batch, self.incremental = max_batch, incremental
        self.scores_dir, self.context, self.key_of = scores_dir, context or {}, key_of
        self._windows_hash: str | None = None
        self.evaluations = 0
        self.block_passes = 0  # decoder-block forwards (times sequences), the unit of search cost
        # more counters to carry across processes, by name: a getter of this process's count (e.g. level_loads)
        self.extra_counters: dict[str, Callable[[], int]] = {}
        self._carried: dict[str, int] = {}  # added to the extra counters: an earlier process's count
        self.reused = {"evaluations": 0, "block_passes": 0}  # what the scores reused from the run dir cost

    def counters(self) -> dict[str, int]:
        """Every work counter, including what an earlier process of a resumed search counted."""
        out = {"evaluations": self.evaluations, "block_passes": self.block_passes}
        for name, get in self.extra_counters.items():
            out[name] = int(get()) + self._carried.get(name, 0)
        return out

    def restore_counters(self, saved: dict[str, int]) -> None:
        """Resuming a search: the counts become those saved with its checkpoint, plus what this process does from
        now on (what it did before, such as scores it took from the run dir, is in the saved counts already)."""
        self.evaluations = int(saved.get("evaluations", self.evaluations))
        self.block_passes = int(saved.get("block_passes", self.block_passes))
        self.reused = {"evaluations": 0, "block_passes": 0}
        for name, get in self.extra_counters.items():
            if name in saved:
                self._carried[name] = int(saved[name]) - int(get())

    def credit_reused(self) -> None:
        """Count the scores one-off scorings took from the run dir as the forwards that produced them (an earlier
        process ran them), so a search resumed inside its start counts what an uninterrupted one does."""
        self.evaluations += self.reused["evaluations"]
        self.block_passes += self.reused["block_passes"]
        self.reused = {"evaluations": 0, "block_passes": 0}

    @torch.inference_mode()
    def score(self, states: list[np.ndarray], batch: Minibatch, parent: np.ndarray | None = None,
              desc: str | None = None) -> list[float]:
        """Fitness of every state on `batch`; `desc` names a one-off scoring (e.g. best of 64 random, not an
        EvoPress generation, which logs a line and is checkpointed by the search): it shows a progress bar and,
        with a `scores_dir`, is resumable."""
        score_log = self._score_log(desc, batch)
        keys = [self.key_of(state) for state in states] if score_log is not None else []
        known = {i: score_log.done[k] for i, k in enumerate(keys) if k in score_log.done}
        if known:
            log.info("%s: %d of %d candidates were scored by an earlier run (%s)", desc, len(known), len(states),
                     score_log.path)
        if known:
            self._note_reused([states[i] for i in known], parent, batch, all_known=len(known) == len(states))
        if len(known) == len(states):
            return [known[i] for i in range(len(states))]
        device = next(self.teacher.adapter.model.parameters()).device
        groups = batch.groups(self.max_batch)
        windows = self.teacher.windows
        embeds = [self.runner.embed(windows[ids, :n].to(device)) for ids, n in groups]
        cache, parent_fit = None, None
        if parent is not None and self.incremental:
            cache = [[] for _ in groups]
            parent_fit = self._forward(parent, groups, embeds, 0, cache)
        out = []
        bar = progress(total=len(states), initial=len(known), desc=desc, unit="cand") if desc else None
        for i, state in enumerate(states):
            if i in known:
                out.append(known[i])
                continue
            out.append(self._score_one(state, parent, parent_fit, groups, embeds, cache))
            if score_log is not None:
                score_log.add(keys[i], out[-1])
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return out

    def _note_reused(self, states: list[np.ndarray], parent, batch: Minibatch, all_known: bool) -> None:
        """Add what scoring `states` would have cost to `reused` (the counts `_forward` makes)."""
        sequences = sum(len(ids) for ids, _ in batch.groups(self.max_batch))
        blocks = self.runner.num_blocks
        incremental = parent is not None and self.incremental
        if incremental and all_known:  # the parent's forward, skipped with them
            self.reused["evaluations"] += 1
            self.reused["block_passes"] += blocks * sequences
        for state in states:
            start = 0
            if incremental:
                changed = np.flatnonzero(state != parent)
                if changed.size == 0:
                    continue  # the parent's own fitness: no forward
                start = int(self.unit_block[changed].min())
            self.reused["evaluations"] += 1
            self.reused["block_passes"] += (blocks - start) * sequences

    def _score_log(self, desc: str | None, batch: Minibatch) -> KeyedLog | None:
        if desc is None or self.scores_dir is None:
            return None
        if self._windows_hash is None:  # the calibration tokens, hashed once: a data file may change under its name
            tokens = self.teacher.windows.cpu().contiguous().numpy().tobytes()
            self._windows_hash = hashlib.sha256(tokens).hexdigest()[:16]
        dtype = next(self.teacher.adapter.model.parameters()).dtype
        context = {**self.context, "windows": self._windows_hash, "batch": batch.items, "dtype": str(dtype),
                   "fitness": self.teacher.kind, "topk": self.teacher.topk, "max_batch": self.max_batch}
        name = re.sub(r"[^a-z0-9]+", "_", desc.lower()).strip("_")
        return KeyedLog(Path(self.scores_dir) / "scores" / f"{name}.jsonl", context, field="fitness")

    def _score_one(self, state, parent, parent_fit, groups, embeds, cache) -> float:
        start = 0
        if cache is not None:
            changed = np.flatnonzero(state != parent)
            if changed.size == 0:
                return parent_fit
            start = int(self.unit_block[changed].min())
        hidden = [c[start] for c in cache] if cache is not None else embeds
        return self._forward(state, groups, hidden, start)

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
