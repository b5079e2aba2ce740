"""One evoexp job, top to bottom: validate the config, load the model, run the method's recipe, write the run dir.

`run_job` is the task wrapper (resume/skip, tracker always finished, FAILED marker); `Job.run` is the
pipeline itself, kept linear so it reads like the experiment it performs. What a method does lives in its
recipe (`evoexp/recipes/`, chosen by `method.kind` through `recipes/registry.py`); this module knows none.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from evoexp import __version__
from evoexp.config import RunCfg
from evoexp.data import check_source, eval_windows, load_tokens
from evoexp.errors import Stop, UserError, no_space
from evoexp.eval import check_zeroshot, zeroshot_scalars
from evoexp.models import load_model, native_bf16, resolve_device, resolve_dtype
from evoexp.recipes.checks import check_run
from evoexp.recipes.contract import Recipe, RecipeContext
from evoexp.recipes.registry import recipe_for
from evoexp.report.figures import write_figures
from evoexp.report.results import FinishedRun, read_run
from evoexp.report.summary import print_summary
from evoexp.tracking import Tracker
from evoexp.train.lora import adapted_layers
from evoexp.timings import TIMINGS, record_step, run_totals
from evoexp.utils import git_sha, read_json, versions, write_json

log = logging.getLogger("evoexp")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_job(cfg: DictConfig, out_dir: Path) -> float | None:
    """Run one job in `out_dir`. A finished job is reported, not recomputed, unless resume=false."""
    resolve_auto_dtypes(cfg)
    rc: RunCfg = OmegaConf.to_object(cfg)
    out_dir = Path(out_dir)
    result_file = out_dir / "result.json"
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # "float32", not "DType.float32"
    if rc.resume and result_file.exists():
        result = read_json(result_file)
        if result.get("status") == "done":
            changed = config_changes(result.get("config", {}), config)
            if changed:  # reporting it would pass off a run of other settings as this one's result
                raise UserError(f"{result_file}: a finished run with other settings ({'; '.join(changed[:3])}"
                                f"{'; ...' if len(changed) > 3 else ''}); resume=false recomputes it here, or "
                                "choose another hydra.run.dir")
            log.info("already finished in %s (resume=false recomputes)", out_dir)
            run = read_run(result, out_dir)
            if not (out_dir / "figures").exists():  # finished by a version that drew them after result.json
                draw_figures(run)
            print_summary(run)
            return result.get("objective")
    device = resolve_device(rc.device.value)
    recipe_class = validate(rc, device)  # every config mistake stops here, before the run dir or model is touched
    if not rc.resume:
        forget_progress(out_dir)
    check_progress(out_dir, config)
    tracker = Tracker(rc.logger, out_dir, rc.name, config, list(rc.tags), job_type=rc.method.kind)
    failed = out_dir / "FAILED"
    with tracker:
        try:
            result = Job(rc, config, out_dir, tracker, device, recipe_class).run()
        except Stop as stop:  # finished by design before the end (e.g. one database shard)
            log.info("%s", stop)
            print(f"evoexp: {stop}")
            return None
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or submitit exiting a preempted SLURM job it requeued:
            log.info("interrupted")  # not a failure; what is finished is kept, the rerun goes on from it
            raise
        except BaseException:
            mark_failed(failed)
            raise
    failed.unlink(missing_ok=True)
    print_summary(read_run(result))
    return result.get("objective")


def mark_failed(failed: Path) -> None:
    """Leave the traceback beside the run; on a full disk there may be no room for it, and the error that filled
    the disk is the one to report."""
    try:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(traceback.format_exc())
    except OSError:
        pass


# What a killed job leaves for its rerun to go on from (the zero-shot request cache has its own
# eval.zeroshot.resume); resume=false removes it, so the job starts over and is itself resumable again.
PROGRESS = ("search_state.json", "history.jsonl", "scores", "bonsai", "train")


# An unfinished job's progress holds for a rerun unless a setting it was computed with has changed; how the
# result is evaluated, exported or post-trained does not change the search, so it may be changed before resuming
# (a post-training checkpoint checks its own settings).
PROGRESS_NEUTRAL = ("eval.", "export.", "train.")


def check_progress(out_dir: Path, config: dict) -> None:
    """Refuse to resume progress made with other settings (it would be passed off as this run's), then record
    the settings the progress from now on is made with."""
    record = out_dir / "progress_config.json"
    if record.exists() and any((out_dir / name).exists() for name in PROGRESS):
        changed = [c for c in config_changes(read_json(record), config) if not c.startswith(PROGRESS_NEUTRAL)]
        if changed:
            raise UserError(f"{out_dir}: holds an unfinished run with other settings ({'; '.join(changed[:3])}"
                            f"{'; ...' if len(changed) > 3 else ''}); resume=false starts it over here, or choose "
                            "another hydra.run.dir")
    write_json(record, config)


def forget_progress(out_dir: Path) -> None:
    for name in (*PROGRESS, TIMINGS):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        log.info("resume=false: removed %s", path)


def resolve_auto_dtypes(cfg: DictConfig) -> None:
    """Every `auto` dtype (dtype, eval.dtypes, database.dtype, eval.zeroshot.dtype) becomes the device's fast
    forward dtype before anything is stored: the run dir records what ran, and a finished run is only reused
    on a machine where `auto` means the same."""
    name = lambda v: getattr(v, "value", v)  # noqa: E731 - enum nodes give their members
    device = resolve_device(name(cfg.device))
    fix = lambda v: v if v is None else resolve_dtype(name(v), device)  # noqa: E731
    cfg.dtype = fix(cfg.dtype)
    cfg.eval.dtypes = [fix(d) for d in cfg.eval.dtypes]
    cfg.database.dtype = fix(cfg.database.dtype)
    cfg.eval.zeroshot.dtype = fix(cfg.eval.zeroshot.dtype)


# Settings that decide where and how fast a run goes, not its numbers: a finished run is reused across them.
RERUN_NEUTRAL = {"resume", "logger", "tags", "threads", "database.dir", "database.cache_gb", "eval.cache_dense",
                 "eval.cache_states", "eval.zeroshot.cache_dense"}


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting (dotted key) set in both that differs, bar the RERUN_NEUTRAL ones.

    A key only one side has is no change: settings are added to evoexp with defaults that keep what earlier
    versions did, so a run finished before a setting existed ran with its default.
    """
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    def plain(v):  # run dirs written before enums were stored by name hold "DType.float32"
        return v.split(".", 1)[1] if isinstance(v, str) and v.startswith(("DType.", "Device.")) else v

    a, b = ({k: plain(v) for k, v in flat(json.loads(json.dumps(c, default=str))).items()} for c in (old, new))
    neutral = tuple(f"{n}." for n in RERUN_NEUTRAL)
    return [f"{k}={a[k]!r} there, {b[k]!r} now" for k in sorted(set(a) & set(b))
            if k not in RERUN_NEUTRAL and not k.startswith(neutral) and a[k] != b[k]]


class Job:
    def __init__(self, rc: RunCfg, config: dict, out_dir: Path, tracker: Tracker, device: torch.device,
                 recipe_class: type[Recipe]):
        self.rc, self.config, self.out_dir, self.tracker = rc, config, out_dir, tracker
        self.open_steps: list[str] = []  # the timed steps under way, innermost last
        self.device, self.recipe_class = device, recipe_class
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def run(self) -> dict:
        rc = self.rc
        seed_everything(rc.seed)
        if rc.threads:
            torch.set_num_threads(rc.threads)
        device = self.device
        with self.timed("load_model"):
            loaded = load_model(rc.model, device, TORCH_DTYPES[rc.dtype.value])
        log.info("model %s: %d blocks, %.1fM parameters, %s on %s", loaded.name, loaded.adapter.num_blocks,
                 loaded.num_params / 1e6, rc.dtype.value, device)
        if rc.eval.ppl:  # a protocol the text cannot satisfy should fail now, not after an hour of search
            for spec in rc.eval.datasets:
                eval_windows(load_tokens(spec, loaded.tokenizer), loaded.tokenizer, rc.eval.seq_len,
                             rc.eval.windows, rc.eval.bos)
        if rc.train.kind != "none" and rc.train.lora.rank:  # as for the text: a layer name it lacks fails now
            adapted_layers(loaded.adapter, rc.train.lora.targets)
        outcome = self.recipe_class(RecipeContext(rc, loaded, self.out_dir, self.tracker, self.timed)).run()
        found = outcome.found_model
        metrics = {"ppl": found.ppl or {}} if found.ppl is not None or outcome.compared else {}
        if found.zeroshot:  # the found model's zero-shot figures (every model's are under "models")
            metrics["zeroshot"] = found.zeroshot
        scalars = ppl_scalars(metrics.get("ppl", {}))
        if "zeroshot" in metrics:
            scalars.update(zeroshot_scalars(metrics["zeroshot"]))
        self.tracker.summary({"eval": scalars})
        steps, peak = run_totals(self.out_dir)
        result = {
            "status": "done",
            "name": rc.name,
            "run_dir": str(self.out_dir),
            "started": self.started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "evoexp_version": __version__,
            "git_sha": git_sha(),
            "versions": versions(),
            "model": {"name": loaded.name, "source": loaded.source, "fingerprint": loaded.fingerprint,
                      "parameters": loaded.num_params, "dtype": rc.dtype.value, "device": str(device)},
            "method": self.config["method"],
            "timings": steps.seconds,  # summed over every process that worked on the run
            "timings_nested": steps.nested,  # the part of them inside another step ("database" in "search")
            "memory": {**peak, "peak_rss_mib_by_step": steps.peaks},
            "metrics": metrics,
            **outcome.to_json(),
            "objective": first_ppl(metrics.get("ppl", {})),
            "config": self.config,
        }
        # result.json is the last thing written: a run that has it is complete (figures, export, allocation)
        paths = draw_figures(read_run(result, self.out_dir))
        write_json(self.out_dir / "result.json", result)
        self.tracker.artifact(self.out_dir / "result.json", f"result-{self.rc.name}", "result")
        self.tracker.images({f"figures/{p.stem}": p for p in paths})
        return result

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        within = self.open_steps[-1] if self.open_steps else None  # its seconds are in that step's too
        self.open_steps.append(key)
        t0 = time.time()
        try:
            yield
        finally:
            self.open_steps.pop()
            record_step(self.out_dir, key, round(time.time() - t0, 2), within)  # summed over processes at the end


def draw_figures(run: FinishedRun) -> list[Path]:
    """The paper's figures for a run; a plotting failure is reported, never costs the result."""
    try:
        paths = write_figures(run)
    except Exception as ex:  # noqa: BLE001 - figures are a view of the result; `evoexp-table --figures` redraws
        if no_space(ex):  # result.json would not fit either: stop now, the rerun draws them
            raise
        log.warning("figures failed (`evoexp-table --figures %s` retries)", run.run_dir, exc_info=True)
        return []
    for path in paths:
        log.info("figure: %s", path)
    return paths


def validate(rc: RunCfg, device: torch.device) -> type[Recipe]:
    """Every check of the config that needs no model: the data sources, zero-shot tasks and the recipe's own."""
    check_run(rc)  # environment, model entry, data, eval, fitness and run keys (evoexp/recipes/checks.py)
    check_source(rc.data.calib, "data.calib")
    for spec in rc.eval.datasets:
        check_source(spec, "eval.datasets")
    check_zeroshot(rc.eval.zeroshot)
    recipe_class = recipe_for(rc.method.kind)
    recipe_class.validate(rc)
    if rc.dtype.value == "bfloat16" and device.type == "cpu" and not native_bf16(device):
        log.warning("dtype=bfloat16 on a CPU without native bf16 matmuls (no AVX-512 BF16 / AMX): forwards "
                    "run several times slower than float32 here; dtype=auto picks float32")
    return recipe_class


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ppl_scalars(ppl: dict) -> dict:
    """{"wikitext2:test": {"float32": {"ppl": x}}} -> {"ppl/wikitext2_test/float32": x} for loggers."""
    out = {}
    for spec, entry in ppl.items():
        for dtype, figures in entry.items():
            if dtype != "protocol":
                out[f"ppl/{spec.replace(':', '_').replace('/', '_')}/{dtype}"] = figures["ppl"]
    return out


def first_ppl(ppl: dict) -> float | None:
    for entry in ppl.values():
        for dtype, figures in entry.items():
            if dtype != "protocol":
                return figures["ppl"]
    return None


