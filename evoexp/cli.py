"""The `evoexp` command: a thin Hydra entrypoint. Everything it runs lives in `evoexp.run`."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evoexp.config import register_configs
from evoexp.errors import DiskFull, UserError, no_space
from evoexp.recipes.checks import run_dir_key
from evoexp.utils import close_progress_bars
from evoexp.run import run_job

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_DIRNAME_MAX = 200


def _dirname(override_dirname: str) -> str:
    """A filesystem-safe, deterministic run-dir name from the command-line overrides."""
    if not override_dirname:
        return "default"
    safe = re.sub(r"[^A-Za-z0-9._=,+\-\[\]]", "_", override_dirname)
    if len(safe) > _DIRNAME_MAX:
        digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:10]
        safe = f"{safe[:_DIRNAME_MAX - 11]}-{digest}"
    return safe


if not OmegaConf.has_resolver("evoexp_dirname"):
    OmegaConf.register_new_resolver("evoexp_dirname", _dirname)
if not OmegaConf.has_resolver("evoexp_div"):
    # Token budgets are stated in tokens; configs turn them into windows of the model's length.
    OmegaConf.register_new_resolver("evoexp_div", lambda a, b: max(1, int(a) // int(b)))
register_configs()


def _rewrite_model_path(argv: list[str]) -> list[str]:
    """Let `model=/some/dir` or `model=org/name` stand for `model=hf model.path=...`."""
    options = {p.stem for p in Path(CONF_DIR, "model").glob("*.yaml")}
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "model" and sep and value not in options and "," not in value and (
            "/" in value or os.path.isdir(value)
        ):
            out += ["model=hf", f"model.path={value}"]
        else:
            out.append(arg)
    return out


def _multirun_flag_first(argv: list[str]) -> list[str]:
    """Accept `-m` anywhere (`evoexp experiment=X -m seed=0,1,2`): Hydra's parser rejects overrides after a flag."""
    flags = [a for a in argv if a in ("-m", "--multirun")]
    return flags[:1] + [a for a in argv if a not in ("-m", "--multirun")]


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        return run_job(cfg, Path(hc.runtime.output_dir))
    except UserError as ex:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the other jobs of the sweep go on; Hydra reports this one at the end
        close_progress_bars()
        print(f"evoexp: error: {ex}", file=sys.stderr)
        sys.exit(2)


def _filename(ex: BaseException | None) -> str | None:
    while ex is not None:
        if isinstance(ex, OSError) and ex.filename:
            return ex.filename
        ex = ex.__cause__ or ex.__context__
    return None


def _lost_sweep_job(ex: BaseException) -> str | None:
    """submitit's error for a SLURM job of a sweep that ended without a result (scancel, out of memory, node
    failure, no requeue left): one line naming the job and its state or last error, not a traceback."""
    if not any(c.__name__ == "UncompletedJobError" and c.__module__.startswith("submitit") for c in type(ex).__mro__):
        return None
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip().strip("-")]
    if type(ex).__name__ == "FailedJobError":  # the job's Python failed outside evoexp's task (e.g. in submitit)
        end = next((i for i, ln in enumerate(lines) if ln.startswith("You can check full logs")), len(lines))
        what = f"{lines[0].removesuffix(' with trace:')}: {lines[end - 1]}"
        what += f" (log: {lines[end + 1].lstrip('- ')})" if end + 1 < len(lines) else ""
    else:  # "Job ID (task: 0) with path ..._result.pkl" "has not produced any output (state: CANCELLED)"
        what = f"{' '.join(lines[:2])} (its logs are beside that file)"
    return (f"a SLURM job of the sweep ended without a result: {what}. Jobs still queued go on; relaunching the "
            "same command runs the jobs that have not finished")


def one_line(ex: BaseException) -> str | None:
    """The message to print for a user mistake, or None for a genuine bug (which keeps its traceback)."""
    if isinstance(ex, UserError):
        return str(ex)
    if no_space(ex):  # written by a library's own I/O or by Hydra: name the file where the OS did
        return str(DiskFull(_filename(ex)))
    if (lost := _lost_sweep_job(ex)) is not None:
        return lost
    # Hydra creates the run (sweep) dir, its .hydra/ files and evoexp.log before evoexp's code runs: an OSError
    # raised there (EVOEXP_OUT or hydra.run.dir a file, read-only, ...) is a setting of the user's, not a bug.
    err = next((e for e in (ex, ex.__cause__, ex.__context__) if isinstance(e, OSError)
                and not isinstance(e, HydraException) and e.filename), None)  # MissingConfigException is an IOError
    tb, frames = ex.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    ours = Path(__file__).resolve().parent
    hydra_only = not any(f.co_name == "_hydra_main" or (Path(f.co_filename).resolve().is_relative_to(ours)
                                                         and Path(f.co_filename).name != "cli.py") for f in frames)
    if err is not None and hydra_only and any("hydra" in Path(f.co_filename).parts for f in frames):
        path = err.filename or ""
        key = run_dir_key(path, multirun=any(a in ("-m", "--multirun") for a in sys.argv[1:]))
        setting = os.environ.get("EVOEXP_OUT") if key == "EVOEXP_OUT" else path
        return (f"{key}: expected a directory where run dirs can be written, got {setting} "
                f"({err.strerror or type(err).__name__}: {path})")
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else None
    if isinstance(ex, OmegaConfBaseException) or cause is not None:
        err = cause or ex
        key = getattr(err, "full_key", None)
        msg = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
        return f"{key}: {msg}" if key else msg
    if isinstance(ex, MissingConfigException):
        lines = [ln.strip() for ln in str(ex).strip().splitlines() if ln.strip()]
        head = [ln for ln in lines if not ln.startswith("Available options")][:1]
        options = [ln for ln in lines[1:] if " " not in ln]
        return "; ".join(head + ([f"available: {', '.join(options)}"] if options else []))
    if isinstance(ex, HydraException):
        lines = [ln.strip() for ln in str(ex).strip().splitlines() if ln.strip()]
        return " ".join(lines[:2]) if lines else type(ex).__name__
    return None


def main() -> None:
    wants_trace = bool(os.environ.get("HYDRA_FULL_ERROR"))
    # Hydra would print its own multi-line report; we take exceptions ourselves to print user errors as one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    logging.raiseExceptions = False  # a log line lost to a full disk is no reason for a traceback on the console
    sys.argv = [sys.argv[0]] + _multirun_flag_first(_rewrite_model_path(sys.argv[1:]))
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C: every finished step is on disk (see run.py), so say how to go on
        close_progress_bars()
        print("evoexp: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as ex:  # noqa: BLE001 - the top of the program decides how to report
        msg = None if wants_trace else one_line(ex)
        if msg is None:
            raise
        close_progress_bars()
        print(f"evoexp: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
