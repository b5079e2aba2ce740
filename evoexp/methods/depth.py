"""Depth pruning: the level space over sub-blocks / blocks / pairs, and every way of choosing what to drop.

`DepthSpace` maps a search state (one 0/1 level per unit, 1 = dropped) to a `DropConfig`; `check_depth_method`
checks the method's settings (before the model loads where the number of blocks is known). The baselines —
the score baselines, best of N random, brute force — score states with the same evaluator EvoPress uses; the
depth recipe (recipes/depth.py) runs them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from evoexp.config import DropMethodCfg
from evoexp.errors import UserError
from evoexp.fitness import Minibatch
from evoexp.methods import depth_baselines as bl
from evoexp.methods.drop import DropConfig
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.space import LevelSpace

log = logging.getLogger(__name__)
UNITS = ("sub_block", "block", "pair")
SCORE_BASELINES = ("shortgpt", "window_cosine", "subcloning", "shortened_llama")


@dataclass
class DepthSpace:
    space: LevelSpace
    unit: str
    num_blocks: int
    segments: list[tuple[int, int]]  # blocks [a, b) that one whole-block unit covers
    k: int  # units dropped per switch group

    def to_config(self, state: np.ndarray) -> DropConfig:
        n = self.num_blocks
        if self.unit == "sub_block":
            return DropConfig(attn=[bool(v) for v in state[:n]], mlp=[bool(v) for v in state[n:]])
        dropped = np.zeros(n, dtype=bool)
        for (a, b), v in zip(self.segments, state):
            dropped[a:b] = bool(v)
        return DropConfig(attn=dropped.tolist(), mlp=dropped.tolist())

    def from_segments(self, chosen: list[int]) -> np.ndarray:
        """The state that drops whole segments `chosen` (what the score baselines produce)."""
        seg = np.zeros(len(self.segments), dtype=np.int64)
        seg[chosen] = 1
        return np.concatenate([seg, seg]) if self.unit == "sub_block" else seg

    @property
    def default_generations(self) -> int:
        """k(n-k)/1.5 as in the EvoPress scripts (n = droppable units per group)."""
        n = int(self.space.hi[self.space.groups[0]].sum())
        return max(1, int(self.k * (n - self.k) / 1.5))


def check_depth_method(cfg: DropMethodCfg, num_blocks: int | None) -> None:
    """One-line UserErrors for method.unit, method.target and method.droppable; with the model's number of blocks
    (None: not known before the model loads) also for blocks that do not exist and the number of units dropped."""
    if cfg.unit not in UNITS:
        raise UserError(f"method.unit: expected one of {', '.join(UNITS)}, got {cfg.unit!r}")
    if not 0.0 < cfg.target < 1.0:
        raise UserError(f"method.target: expected a fraction in (0, 1), got {cfg.target}")
    if any(b < 0 for b in cfg.droppable or []):
        raise UserError(f"method.droppable: expected block indices >= 0, got {list(cfg.droppable)}")
    if num_blocks is not None:
        drop_segments(cfg, num_blocks)


def drop_segments(cfg: DropMethodCfg, num_blocks: int) -> tuple[list[tuple[int, int]], np.ndarray, int]:
    """The units' block ranges [a, b), which of them may be dropped (0/1) and how many are dropped."""
    allowed_blocks = np.ones(num_blocks, dtype=bool)
    if cfg.droppable is not None:
        bad = [b for b in cfg.droppable if not 0 <= b < num_blocks]
        if bad:
            raise UserError(f"method.droppable: blocks {bad} do not exist (the model has {num_blocks})")
        allowed_blocks[:] = False
        allowed_blocks[list(cfg.droppable)] = True
    width = 2 if cfg.unit == "pair" else 1
    if num_blocks % width:
        raise UserError(f"method.unit=pair needs an even number of blocks, the model has {num_blocks}")
    segments = [(a, a + width) for a in range(0, num_blocks, width)]
    allowed = np.array([allowed_blocks[a:b].all() for a, b in segments], dtype=np.int64)
    k = int(cfg.target * len(segments))
    if k < 1 or k > allowed.sum():
        raise UserError(f"method.target={cfg.target}: drops {k} of {len(segments)} units, "
                        f"{int(allowed.sum())} of which may be dropped")
    return segments, allowed, k


def depth_space(cfg: DropMethodCfg, num_blocks: int) -> DepthSpace:
    check_depth_method(cfg, None)
    segments, allowed, k = drop_segments(cfg, num_blocks)
    width = segments[0][1] - segments[0][0]
    m = len(segments)
    if cfg.unit == "sub_block":
        names = [f"attn.{i}" for i in range(m)] + [f"mlp.{i}" for i in range(m)]
        space = LevelSpace(names, np.zeros(2 * m), np.concatenate([allowed, allowed]),
                           [np.arange(m), np.arange(m, 2 * m)], [k, k], np.concatenate([np.arange(m)] * 2))
    else:
        names = [f"{cfg.unit}.{a}" if width == 1 else f"pair.{a}-{b - 1}" for a, b in segments]
        space = LevelSpace(names, np.zeros(m), allowed, [np.arange(m)], [k], np.array([a for a, _ in segments]))
    return DepthSpace(space, cfg.unit, num_blocks, segments, k)


def score_baseline(kind: str, ds: DepthSpace, ppl_evaluator: CandidateEvaluator, batch: Minibatch
                   ) -> np.ndarray:
    """The state a one-shot score baseline drops (whole segments); `ppl_evaluator` scores calibration NLL."""
    allowed = ds.space.hi[: len(ds.segments)].astype(bool)
    if kind == "shortened_llama":
        # Drop each segment alone and rank by calibration perplexity (Kim et al., 2024).
        dense = np.zeros(ds.space.size, dtype=np.int64)
        singles = [ds.from_segments([s]) for s in range(len(ds.segments))]
        nll = np.array(ppl_evaluator.score(singles, batch, parent=dense, desc=kind))
        chosen = sorted(np.argsort(np.where(allowed, nll, np.inf), kind="stable")[: ds.k].tolist())
        return ds.from_segments(chosen)
    pairs = list(ds.segments)
    windows = [(ds.segments[s][0], ds.segments[s + ds.k - 1][1]) for s in range(len(ds.segments) - ds.k + 1)]
    ppl_evaluator.apply(np.zeros(ds.space.size, dtype=np.int64))  # scores are taken on the dense model
    sim = bl.boundary_similarity(ppl_evaluator.runner, ppl_evaluator.teacher.windows, batch, pairs + windows)
    seg_cos, seg_ratio = sim["cos"][: len(pairs)], sim["ratio"][: len(pairs)]
    if kind == "shortgpt":
        chosen = bl.shortgpt(seg_cos, ds.k, allowed)
    elif kind == "subcloning":
        chosen = bl.subcloning(seg_ratio, ds.k, allowed)
    elif kind == "window_cosine":
        chosen = bl.window_cosine(sim["cos"][len(pairs):], ds.k, allowed)
    else:
        raise UserError(f"search.kind: unknown depth baseline {kind!r}")
    return ds.from_segments(chosen)


def random_best(ds: DepthSpace, evaluator: CandidateEvaluator, batch: Minibatch, candidates: int,
                rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Best of `candidates` distinct random feasible states on one minibatch."""
    states = ds.space.random_states(rng, candidates)
    fits = evaluator.score(states, batch, desc="random")
    best = int(np.argmin(fits))
    return states[best], float(fits[best])


def brute_force(ds: DepthSpace, evaluator: CandidateEvaluator, batch: Minibatch, max_states: int
                ) -> tuple[np.ndarray, float]:
    states = list(ds.space.all_states(max_states))
    log.info("brute force over %d states", len(states))
    fits = evaluator.score(states, batch, desc="brute force")
    best = int(np.argmin(fits))
    return states[best], float(fits[best])
