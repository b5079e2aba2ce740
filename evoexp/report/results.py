"""Reading finished runs back: the one place that knows the layout of result.json (`RecipeResult` is its
written schema), used by the tables, the figures and the job's closing summary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evoexp.errors import UserError
from evoexp.recipes.contract import RecipeResult
from evoexp.timings import NESTED_BEFORE_WITHIN, StepTotals, step_records, step_totals
from evoexp.utils import read_json


@dataclass
class FinishedRun:
    run_dir: Path
    name: str
    model: str  # the model's config name (smollm2_135m, llama3_8b, ...)
    parameters: int | None
    method: dict  # the method's config (kind, target, ...)
    config: dict  # the whole resolved config of the run
    recipe: RecipeResult
    steps: StepTotals | None = None  # seconds and peak per step ("search", "train", "eval_ppl_<model>", ...)
    peak_rss_mib: float | None = None  # the largest peak resident memory of its processes

    @property
    def kind(self) -> str:
        return self.method["kind"]

    @property
    def target(self):
        return self.method.get("target")

    @property
    def seed(self) -> int:
        return self.config.get("seed", 0)

    def setting(self, dotted: str):
        """A config value by dotted key (None where the run's config has no such key)."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def read_run(result: dict, run_dir: str | Path | None = None) -> FinishedRun:
    """A finished run from its result.json contents; `run_dir`: where it is now, if not where it was written.

    Step times and peaks come from the run dir's timings.jsonl where it is there (result.json's copy of them is
    as of the run's end; a record restored into the file later counts too), else from result.json."""
    path = Path(run_dir or result.get("run_dir", "."))
    memory = result.get("memory") or {}
    records = step_records(path)
    return FinishedRun(path, result.get("name", ""), result["model"]["name"], result["model"].get("parameters"),
                       result["method"], result.get("config", {}), RecipeResult.from_json(result),
                       step_totals(records) if records else _recorded_steps(result), memory.get("peak_rss_mib"))


def _recorded_steps(result: dict) -> StepTotals | None:
    """result.json's step totals; one written before the nesting and per-step peaks were kept gets the nesting of
    its time (NESTED_BEFORE_WITHIN) and no per-step peaks (an empty dict: not kept)."""
    seconds = result.get("timings")
    if seconds is None:
        return None
    nested = result.get("timings_nested")
    if nested is None:
        nested = {k: v for k, v in seconds.items() if k.startswith(NESTED_BEFORE_WITHIN)}
    return StepTotals(seconds, nested, (result.get("memory") or {}).get("peak_rss_mib_by_step") or {})


def run_seconds(result: dict) -> float:
    """A run's wall time from its result.json: every step of every process, each second once."""
    steps = _recorded_steps(result)
    return 0.0 if steps is None else steps.total(steps.seconds)


def find_runs(paths: list[str]) -> tuple[list[FinishedRun], int]:
    """Every finished run under `paths` (run dirs, sweep dirs or result.json files), and how many are not."""
    runs, unfinished = [], 0
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such file or directory")
        files = [p] if p.is_file() else sorted(p.rglob("result.json"))
        for f in files:
            try:
                r = read_json(f)  # a damaged file stops here in one line (DamagedFile)
            except OSError as ex:
                raise UserError(f"{f}: not a readable result.json ({ex})") from None
            if r.get("status") != "done":
                unfinished += 1
                continue
            runs.append(read_run(r, f.parent))
        unfinished += 0 if p.is_file() else sum(1 for d in p.rglob(".hydra") if not (d.parent / "result.json").exists())
    return runs, unfinished
