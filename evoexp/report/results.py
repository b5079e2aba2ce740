"""Reading finished runs back: the one place that knows the layout of result.json (`RecipeResult` is its
written schema), used by the tables, the figures and the job's closing summary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evoexp.errors import UserError
from evoexp.recipes.contract import RecipeResult
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
    timings: dict | None = None  # seconds per step of the run ("search", "train", "eval_ppl_<model>", ...)
    peak_rss_mib: float | None = None  # its (last) process's peak resident memory

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
    """A finished run from its result.json contents; `run_dir`: where it is now, if not where it was written."""
    return FinishedRun(Path(run_dir or result.get("run_dir", ".")), result.get("name", ""), result["model"]["name"],
                       result["model"].get("parameters"), result["method"], result.get("config", {}),
                       RecipeResult.from_json(result), result.get("timings"),
                       (result.get("memory") or {}).get("peak_rss_mib"))


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
