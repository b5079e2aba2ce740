"""The recipe contract: what a compression method's workflow provides, and the written schema of what it reports.

A recipe is one class per method kind, torchtune-style: a linear `run()` built from the shared blocks in
`recipes/common.py`. The job (`evoexp/run.py`) drives every recipe the same way:

    recipe_class = recipe_for(rc.method.kind)     # recipes/registry.py
    recipe_class.validate(rc)                     # every config check; no model or data loaded yet
    loaded = load_model(...)
    result = recipe_class(RecipeContext(rc, loaded, out_dir, tracker, timed)).run()
    write result.json from result.to_json()       # plus the job's own records (timings, versions, config)

`validate` raises a one-line `UserError` naming the key for any config mistake it can see without the model
(it must not load a model, tokenizer or text, and runs in well under a second). `run` returns a `RecipeResult`;
everything else a recipe writes (allocation.json, an exported model, its search checkpoint) goes into
`ctx.out_dir`, and a rerun of a killed job must resume from it.

Adding a method: a recipe module with a class following `Recipe`, its config dataclass (a `MethodCfg` subclass
in `evoexp/config/methods.py`) and YAML files in `conf/`, and one line in `recipes/registry.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Protocol

if TYPE_CHECKING:  # annotations only: reading a result (evoexp-table) must not import torch
    from evoexp.config import RunCfg
    from evoexp.models import LoadedModel


class MetricSink(Protocol):
    """Where a recipe sends live figures (the job's tracker: W&B or nothing)."""

    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def summary(self, metrics: dict) -> None: ...


@dataclass
class RecipeContext:
    """What a recipe is given: the config, the loaded model, its run dir, a metric sink and a stopwatch."""

    rc: RunCfg
    loaded: LoadedModel
    out_dir: Path
    tracker: MetricSink
    timed: Callable[[str], ContextManager[None]]  # `with ctx.timed("search"):` records the seconds it took


class Recipe(Protocol):
    kinds: ClassVar[tuple[str, ...]]  # the method kinds it runs (method.kind)

    @classmethod
    def validate(cls, rc: RunCfg) -> None: ...

    def __init__(self, ctx: RecipeContext) -> None: ...

    def run(self) -> RecipeResult: ...


# Keys of a model entry in result.json that ModelEval holds as fields; every other key is one of `details`.
_EVAL_KEYS = ("fitness", "fitness_kind", "fitness_tokens", "ppl", "zeroshot")


@dataclass
class ModelEval:
    """One evaluated model: the dense reference, the found configuration or a reference baseline.

    `fitness` is taken on one fixed calibration minibatch for every model of a run (when the run has a search
    fitness); `ppl` is {dataset: {dtype: {"ppl": x, ...}, "protocol": {...}}} as `evaluate_ppl` returns it;
    `zeroshot` is `evaluate_zeroshot`'s record; `details` is the method's own description of the model (depth
    pruning: `lines`; per-layer levels: `achieved`, `summary`, `per_block`).
    """

    fitness: float | None = None
    fitness_kind: str | None = None
    fitness_tokens: int | None = None
    ppl: dict | None = None
    zeroshot: dict | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        head = {k: getattr(self, k) for k in _EVAL_KEYS[:3] if getattr(self, k) is not None}
        tail = {k: getattr(self, k) for k in _EVAL_KEYS[3:] if getattr(self, k) is not None}
        return {**head, **self.details, **tail}

    @classmethod
    def from_json(cls, entry: dict) -> ModelEval:
        return cls(**{k: entry.get(k) for k in _EVAL_KEYS},
                   details={k: v for k, v in entry.items() if k not in _EVAL_KEYS})


@dataclass
class RecipeResult:
    """What a run reports. In result.json: `models` (every evaluated model by name), `found` (the name of the
    model the method chose), `allocation` (what it chose, also in allocation.json), `search` (how it chose:
    fitness, generations, evaluations, seconds...) and the recipe's `extra` records as top-level keys (e.g.
    `calibration`, `database`). The found model's figures are also the run's `metrics`.
    """

    found: str
    models: dict[str, ModelEval]
    allocation: dict | None = None
    search: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def found_model(self) -> ModelEval:
        return self.models[self.found]

    @property
    def compared(self) -> bool:
        """A compression run, which compares models; a plain evaluation (method=dense) reports one model."""
        return self.allocation is not None or list(self.models) != [self.found]

    def to_json(self) -> dict:
        out: dict[str, Any] = dict(self.extra)
        if self.search is not None:
            out["search"] = self.search
        if self.allocation is not None:
            out["allocation"] = self.allocation
        if self.compared:
            out["models"] = {name: m.to_json() for name, m in self.models.items()}
            out["found"] = self.found
        return out

    @classmethod
    def from_json(cls, result: dict) -> RecipeResult:
        """From a result.json, including those written before `found` was recorded (bench/results)."""
        known = ("models", "found", "allocation", "search")
        extra = {k: result[k] for k in ("calibration", "database") if k in result}
        if not result.get("models"):  # a plain evaluation: its metrics are the one model's figures
            name = _plain_name(result)
            metrics = result.get("metrics", {})
            return cls(name, {name: ModelEval(ppl=metrics.get("ppl"), zeroshot=metrics.get("zeroshot"))},
                       result.get("allocation"), result.get("search"), extra)
        found = result.get("found") or (result.get("allocation") or {}).get("search") \
            or result["config"]["search"]["kind"]
        models = {name: ModelEval.from_json(e) for name, e in result["models"].items()}
        return cls(found, models, *(result.get(k) for k in known[2:]), extra)


def _plain_name(result: dict) -> str:
    if result["method"]["kind"] == "dense":
        return "dense"
    return (result.get("search") or {}).get("kind") or result["config"]["search"]["kind"]
