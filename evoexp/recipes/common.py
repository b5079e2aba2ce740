"""The building blocks every recipe shares: calibration windows, the teacher, EvoPress from config, the
per-generation logger and the report loop that scores and evaluates each model a run compares."""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

from evoexp.blockrun import BlockRunner
from evoexp.config import EvoPressCfg
from evoexp.data import WindowProtocol, calibration_windows, load_tokens
from evoexp.eval import evaluate_ppl, evaluate_zeroshot, heldout_tracker
from evoexp.eval.zeroshot import zeroshot_wanted
from evoexp.fitness import Minibatch, Teacher, minibatch
from evoexp.models.digest import state_digest
from evoexp.recipes.contract import MetricSink, ModelEval, RecipeContext
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.evopress import EvoPress, EvoPressSettings, SearchResult, Stage
from evoexp.search.space import LevelSpace
from evoexp.tensorfiles import load_cached, save_safetensors, tensor_sha256
from evoexp.utils import cache_root, stable_hash

log = logging.getLogger(__name__)

# Seed offsets of the run's random streams, so that each one-off draw is the same whatever ran before it.
REPORT_SEED = 2  # the fixed minibatch every model's reported fitness is taken on
FITNESS_TARGETS_VERSION = 1  # bump when Teacher.build computes something else, so cached targets are not reused


def rng_for(ctx: RecipeContext, offset: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(ctx.rc.seed + offset))


def calibration(ctx: RecipeContext, seq_len: int, windows: int) -> tuple[torch.Tensor, WindowProtocol]:
    """`windows` random windows of `seq_len` tokens of data.calib (seeded by data.seed)."""
    data = ctx.rc.data
    stream = load_tokens(data.calib, ctx.loaded.tokenizer, data.jsonl_field)
    return calibration_windows(stream, ctx.loaded.tokenizer, seq_len, windows, data.seed, data.bos)


def build_teacher(ctx: RecipeContext, windows: torch.Tensor, runner: BlockRunner) -> Teacher:
    """The dense model's targets on the calibration windows, as the run's fitness config asks for them. Targets
    that fit in memory are kept in the cache, per (weights, dtype, device, windows, fitness settings): every job
    of a sweep scores against the same ones, and building them is a dense pass plus a head matmul per token
    (minutes per job on a CPU). Larger ones are memory-mapped in the run dir and built each run."""
    f = ctx.rc.fitness
    teacher = Teacher(ctx.loaded.adapter, windows, f.kind, f.topk, f.chunk_tokens, f.max_memory_gb, ctx.out_dir)
    if f.kind == "ppl" or teacher.target_bytes() > f.max_memory_gb * 2**30:
        return teacher.build(runner)
    device = next(ctx.loaded.adapter.model.parameters()).device
    key = stable_hash({"model": ctx.loaded.fingerprint, "dtype": ctx.rc.dtype.value, "device": device.type,
                       "version": FITNESS_TARGETS_VERSION, "kind": f.kind, "factorised": teacher.factorised,
                       "topk": f.topk if f.kind == "topk_kl" else None, "chunk": f.chunk_tokens,
                       "windows": tensor_sha256(windows.to(torch.int64))})
    path = cache_root() / "fitness_targets" / f"{key}.safetensors"
    cached = load_cached(path, "building the teacher's targets again")
    if cached is not None:
        try:
            teacher.load(cached)
            log.info("teacher targets read back from %s", path)
            return teacher
        except ValueError as ex:
            log.warning("%s: %s; building them again", path, ex)
    teacher.build(runner)
    save_safetensors({k: v.contiguous() for k, v in teacher.targets().items()}, path,
                     metadata={"model": ctx.loaded.fingerprint, "kind": f.kind})
    return teacher


def capped_minibatch(teacher: Teacher, tokens: int, rng: np.random.Generator) -> Minibatch:
    """A minibatch of `tokens` calibration tokens, or all of them when there are fewer."""
    return minibatch(teacher, min(tokens, teacher.windows.numel()), rng)


def evopress_settings(s: EvoPressCfg, default_generations: int, init: str) -> EvoPressSettings:
    """The engine's settings from search=evopress*; `generations: null` takes the method's default."""
    return EvoPressSettings(
        generations=s.generations if s.generations is not None else default_generations,
        offspring=s.offspring, stages=[Stage(st.survivors, st.tokens) for st in s.stages],
        max_switches=s.max_switches, init=init, init_candidates=s.init_candidates, init_tokens=s.init_tokens,
        max_tries=s.max_tries, track_every=s.track_every)


def generation_logger(tracker: MetricSink) -> Callable[[dict], None]:
    """Sends each EvoPress generation's record to the tracker (the search's live curves)."""
    def on_generation(record: dict) -> None:
        tracker.log({"search": {"generation": record["generation"], "fitness": record["parent_fitness"],
                                "evaluations": record["evaluations"], "seconds": record["seconds"],
                                **({"heldout_ppl": record["heldout"]} if "heldout" in record else {})}})
    return on_generation


def run_evopress(ctx: RecipeContext, settings: EvoPressSettings, s: EvoPressCfg, space: LevelSpace,
                 evaluator: CandidateEvaluator, start: np.ndarray | None = None) -> SearchResult:
    """EvoPress over `space`, checkpointed in the run dir, held-out PPL tracked as search.track_every asks."""
    rc, teacher = ctx.rc, evaluator.teacher
    track = heldout_tracker(ctx.loaded, rc.eval, rc.dtype.value, s.track_every, s.track_windows, evaluator.apply)
    engine = EvoPress(settings, space, evaluator, lambda tokens, rng: minibatch(teacher, tokens, rng), rc.seed,
                      ctx.out_dir, generation_logger(ctx.tracker), start=start, track=track)
    return engine.run()


def shared_state(ctx: RecipeContext, zeroshot: bool) -> str | None:
    """The digest the model as it is now is evaluated under in the shared cache (eval.cache_states), None where
    its figures are not shared (off, nothing to evaluate, or a hooked model; see models/digest.py)."""
    rc = ctx.rc
    if not rc.eval.cache_states or not (zeroshot or (rc.eval.ppl and rc.eval.datasets)):
        return None
    return state_digest(ctx.loaded.model)


def evaluate_models(ctx: RecipeContext, candidates: dict[str, Any], apply: Callable[[Any], None],
                    describe: Callable[[Any], dict], state_id: Callable[[Any], Any],
                    scorer: CandidateEvaluator | None = None, found: str | None = None) -> dict[str, ModelEval]:
    """Every model a run compares (dense first, the found one, the references), evaluated the same way.

    With a `scorer` (a run with a search fitness), each model's fitness is taken on one fixed calibration
    minibatch; then, with the model put in place by `apply`, its held-out PPL and (for dense, the found model and
    references on request) zero-shot accuracy. `describe` gives the method's details of a model, `state_id` what
    identifies it (None: the dense model) so that a killed run's finished figures are kept. `found`: the found
    model's name when it is not the search's kind (zero-shot always evaluates it).
    """
    rc = ctx.rc
    fits: dict[str, dict] = {}
    if scorer is not None:
        batch = capped_minibatch(scorer.teacher, rc.fitness.report_tokens, rng_for(ctx, REPORT_SEED))
        with ctx.timed("report_fitness"):
            scores = scorer.score(list(candidates.values()), batch, desc="report fitness")
        fits = {name: {"fitness": f, "fitness_kind": rc.fitness.kind, "fitness_tokens": batch.tokens}
                for name, f in zip(candidates, scores)}
    models = {}
    for name, candidate in candidates.items():
        apply(candidate)
        entry = ModelEval(**fits.get(name, {}), details=describe(candidate))
        sid, dense = state_id(candidate), name == "dense"
        wanted = zeroshot_wanted(rc.eval.zeroshot, name, found or rc.search.kind)
        digest = None if dense else shared_state(ctx, wanted)
        if rc.eval.ppl and rc.eval.datasets:
            with ctx.timed(f"eval_ppl_{name}"):
                entry.ppl = evaluate_ppl(ctx.loaded, rc.eval, rc.dtype.value, dense=dense, run_dir=ctx.out_dir,
                                         state_id="dense" if sid is None else sid, digest=digest)
        if wanted:
            with ctx.timed(f"eval_zeroshot_{name}"):
                entry.zeroshot = evaluate_zeroshot(ctx.loaded, rc.eval.zeroshot, rc.dtype.value, dense=dense,
                                                   run_dir=ctx.out_dir, state=name, state_id=sid, digest=digest)
        models[name] = entry
    return models
