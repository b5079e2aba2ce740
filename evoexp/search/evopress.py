"""EvoPress: (1+λ) evolutionary search with level-switch mutations and multi-step selection.

Each generation: λ distinct children of the parent (each with min(U{1..3}, U{1..3}) switches); every stage
scores all remaining candidates on the same fresh random minibatch and keeps the best `survivors`; the parent
joins at the last stage only (elitism, re-scored on fresh data as in the authors' code). The search state
(parent, RNG, generation, history, work counters) is checkpointed atomically after every generation, so a killed
run resumes and ends exactly where an uninterrupted one with the same seed would, with the same counts of work
(`evaluator.evaluations`, `block_passes`: those of the checkpoint resumed from, plus what is done after it).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from evoexp.errors import UserError
from evoexp.fitness import Minibatch
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.space import LevelSpace
from evoexp.utils import append_jsonl, jsonl_line, read_json, stable_hash, write_json

log = logging.getLogger(__name__)
Sampler = Callable[[int, np.random.Generator], Minibatch]


@dataclass
class Stage:
    survivors: int = 1
    tokens: int = 2048


@dataclass
class SearchResult:
    state: np.ndarray
    fitness: float
    generations: int
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0


@dataclass
class EvoPressSettings:
    generations: int
    offspring: int
    stages: list[Stage]
    max_switches: int = 3
    init: str = "random"  # random | uniform | given (the `start` state passed to EvoPress)
    init_candidates: int = 64
    init_tokens: int = 2048
    max_tries: int = 100  # mutation attempts per wanted child before the space counts as exhausted
    track_every: int = 0  # call `track(parent)` every k generations (and at the last); its result joins the history


class EvoPress:
    def __init__(self, settings: EvoPressSettings, space: LevelSpace, evaluator: CandidateEvaluator,
                 sample: Sampler, seed: int, run_dir: Path | None = None,
                 on_generation: Callable[[dict], None] | None = None, start: np.ndarray | None = None,
                 track: Callable[[np.ndarray], dict] | None = None):
        if not settings.stages:
            raise UserError("search.stages: at least one stage is needed")
        if settings.stages[-1].survivors < 1 or any(s.survivors < 1 for s in settings.stages):
            raise UserError("search.stages: survivors must be >= 1")
        self.s, self.space, self.evaluator, self.sample = settings, space, evaluator, sample
        self.seed, self.on_generation, self.start, self.track = seed, on_generation, start, track
        if (settings.init == "given") != (start is not None):
            raise ValueError("EvoPress: init='given' goes with a start state, and only with it")
        self.state_file = Path(run_dir) / "search_state.json" if run_dir else None
        self.history_file = Path(run_dir) / "history.jsonl" if run_dir else None
        # tracking does not change the search path, so turning it on keeps a run resumable
        searched = {k: v for k, v in asdict(settings).items() if k != "track_every"}
        self.key = stable_hash({"settings": searched, "names": space.names, "targets": space.targets,
                                "seed": seed, **({"start": start.tolist()} if start is not None else {})})

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        rng, gen, parent, parent_fit, history = self._resume() or self._start()
        t_start = time.time()
        done_at_start = gen
        while gen < self.s.generations:
            t0 = time.time()
            kids = self._offspring(parent, rng)
            stage_log = []
            cands = kids
            for i, stage in enumerate(self.s.stages):
                if i == len(self.s.stages) - 1:
                    cands = cands + [parent]
                fits, entry = self._score_stage(i, stage, cands, parent, rng)
                order = np.argsort(fits, kind="stable")[: stage.survivors]
                stage_log.append({**entry, "candidates": len(cands),
                                  "fitness": [float(fits[j]) for j in np.argsort(fits, kind="stable")]})
                cands = [cands[j] for j in order]
                best_fit = float(fits[order[0]])
            parent, parent_fit = cands[0], best_fit
            gen += 1
            record = {"generation": gen, "parent_fitness": parent_fit, "stages": stage_log,
                      "evaluations": sum(s["candidates"] for s in stage_log),
                      "tokens": sum(s["tokens"] * s["candidates"] for s in stage_log),
                      "seconds": round(time.time() - t0, 3), "parent": parent.tolist()}
            if self.track is not None and self.s.track_every and (
                    gen % self.s.track_every == 0 or gen == self.s.generations):
                # part of the checkpointed record, so a resumed run's convergence curve has no holes
                record["heldout"] = self.track(parent)
            history.append(record)
            self._checkpoint(rng, gen, parent, parent_fit, history, record)
            self._progress(gen, parent_fit, t_start, done_at_start)
            if self.on_generation:
                self.on_generation(record)
        return SearchResult(parent, parent_fit, gen, history, self.evaluator.evaluations)

    def _score_stage(self, index: int, stage: Stage, cands: list[np.ndarray], parent: np.ndarray,
                     rng: np.random.Generator) -> tuple[list[float], dict]:
        """Fitness of every candidate of a stage on one fresh minibatch, and what the history keeps of it."""
        batch = self.sample(stage.tokens, rng)
        return self.evaluator.score(cands, batch, parent=parent), {"tokens": batch.tokens}

    def _offspring(self, parent: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        kids, seen = [], {parent.tobytes()}
        budget = self.s.max_tries * self.s.offspring
        for _ in range(budget):
            child = self.space.mutate(parent, rng, self.s.max_switches)
            key = child.tobytes()
            if key in seen or not self.space.feasible(child):
                continue
            seen.add(key)
            kids.append(child)
            if len(kids) == self.s.offspring:
                return kids
        raise UserError(f"search.offspring: only {len(kids)} distinct children of the parent found in {budget} "
                        f"mutations; the space around it is exhausted (lower search.offspring)")

    def _start(self):
        rng = np.random.Generator(np.random.PCG64(self.seed))
        if self.s.init == "uniform":
            parent = self.space.uniform_state()
            fit = self.evaluator.score([parent], self.sample(self.s.init_tokens, rng))[0]
        elif self.s.init == "given":
            parent = self.start.copy()
            fit = self.evaluator.score([parent], self.sample(self.s.init_tokens, rng))[0]
        elif self.s.init == "random":
            cands = self.space.random_states(rng, self.s.init_candidates, self.s.max_tries)
            # a one-off scoring (init_candidates forwards before the first checkpoint): resumable, with a bar
            fits = self.evaluator.score(cands, self.sample(self.s.init_tokens, rng), desc="search start")
            credit = getattr(self.evaluator, "credit_reused", None)
            if credit is not None:  # scores an earlier, killed process took count as the work they were
                credit()
            best = int(np.argmin(fits))
            parent, fit = cands[best], float(fits[best])
        else:
            raise UserError(f"search.init: expected random | uniform | fractional, got {self.s.init!r}")
        # Scored on a fresh sample of init_tokens, so it differs from a score the start was chosen by.
        log.info("search start: fitness %.5f on %d tokens (%s init), %d generations of %d offspring", fit,
                 self.s.init_tokens, self.s.init, self.s.generations, self.s.offspring)
        if self.history_file is not None and self.history_file.exists():
            self.history_file.unlink()
        return rng, 0, parent, float(fit), []

    # --- checkpointing -----------------------------------------------------------------------------------------
    def _checkpoint(self, rng, gen, parent, parent_fit, history, record) -> None:
        if self.state_file is None:
            return
        write_json(self.state_file, {"key": self.key, "generation": gen, "parent": parent.tolist(),
                                     "parent_fitness": parent_fit, "rng": rng.bit_generator.state,
                                     "history": history, "counters": self._counters()})
        append_jsonl(self.history_file, record)

    def _counters(self) -> dict[str, int]:
        """The evaluator's work counters (a CandidateEvaluator's `counters()`, else its `evaluations`)."""
        counters = getattr(self.evaluator, "counters", None)
        if callable(counters):
            return counters()
        return {"evaluations": int(getattr(self.evaluator, "evaluations", 0))}

    def _resume(self):
        if self.state_file is None or not self.state_file.exists():
            return None
        fix = "delete it (or run with resume=false) to start the search over"
        saved = read_json(self.state_file, what_to_do=fix)
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            if isinstance(saved, dict) and isinstance(saved.get("key"), str):
                raise UserError(f"{self.state_file}: holds a search with other settings; resume=false starts over")
            raise UserError(f"{self.state_file}: damaged (no search key); {fix}")
        problem = self._inconsistency(saved)
        rng = np.random.Generator(np.random.PCG64())
        if problem is None:
            try:
                rng.bit_generator.state = saved["rng"]
            except (TypeError, ValueError, KeyError, OverflowError) as ex:
                problem = f"its random generator state does not load ({type(ex).__name__})"
        if problem is not None:
            raise UserError(f"{self.state_file}: damaged or inconsistent ({problem}); {fix}")
        history = saved["history"]
        # history.jsonl may hold a line of a generation that was not checkpointed: rewrite it from the state.
        self.history_file.write_text("".join(jsonl_line(h) for h in history))
        if isinstance(saved.get("counters"), dict):  # earlier versions kept none: counts start from this process
            restore = getattr(self.evaluator, "restore_counters", None)
            if restore is not None:
                restore(saved["counters"])
            elif "evaluations" in saved["counters"] and hasattr(self.evaluator, "evaluations"):
                self.evaluator.evaluations = saved["counters"]["evaluations"]
        log.info("resuming search at generation %d/%d (fitness %.5f)", saved["generation"], self.s.generations,
                 saved["parent_fitness"])
        return rng, saved["generation"], np.array(saved["parent"], dtype=np.int64), saved["parent_fitness"], history

    def _inconsistency(self, saved: dict) -> str | None:
        """What makes a checkpoint impossible for this search (None: nothing); a digest catches damage, this
        catches a state edited or written by other code: an over-budget parent would otherwise surface much
        later as a search setting's fault."""
        gen, parent, fit, history = (saved.get(k) for k in ("generation", "parent", "parent_fitness", "history"))
        if not isinstance(gen, int) or isinstance(gen, bool) or not 0 <= gen <= self.s.generations:
            return f"generation {gen!r} is not one of 0..{self.s.generations}"
        if not isinstance(parent, list) or len(parent) != self.space.size or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in parent):
            return f"the parent is not a list of {self.space.size} integer levels"
        if not self.space.feasible(np.array(parent, dtype=np.int64)):
            return "the parent is outside the level range or off the budget"
        if not isinstance(fit, (int, float)) or isinstance(fit, bool) or math.isnan(fit):
            return f"parent fitness {fit!r} is not a number"
        if not isinstance(history, list) or len(history) != gen or \
                not all(isinstance(h, dict) and h.get("generation") == i + 1 for i, h in enumerate(history)):
            return f"its history does not hold generations 1..{gen}"
        if history and (history[-1].get("parent") != parent or history[-1].get("parent_fitness") != fit):
            return "the parent is not the last generation's"
        return None

    def _progress(self, gen: int, fit: float, t_start: float, done_at_start: int) -> None:
        per_gen = (time.time() - t_start) / max(1, gen - done_at_start)
        eta = per_gen * (self.s.generations - gen)
        log.info("gen %d/%d  fitness %.5f  %.1f s/gen  ETA %s", gen, self.s.generations, fit, per_gen,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
