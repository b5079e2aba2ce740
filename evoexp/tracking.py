"""Experiment tracking: W&B (offline when no login is configured) or nothing. Always finished on exit."""
from __future__ import annotations

import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from evoexp.config import LoggerCfg
from evoexp.errors import UserError

log = logging.getLogger(__name__)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def flatten(d: dict, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


class Tracker:
    """Context manager around one W&B run per job; `logger=none` makes every call a no-op."""

    def __init__(self, cfg: LoggerCfg, out_dir: Path, name: str, config: dict, tags: list[str],
                 job_type: str | None = None):
        self.cfg, self.out_dir, self.name = cfg, Path(out_dir), name
        self.config, self.tags, self.job_type = config, tags, job_type
        self.run = None

    def __enter__(self) -> "Tracker":
        if self.cfg.kind == "none":
            return self
        if self.cfg.kind != "wandb":
            raise UserError(f"logger.kind: expected wandb | none, got {self.cfg.kind!r}")
        import wandb

        mode = self.cfg.mode or os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        # The id lives in the run dir, so a resumed or requeued job continues the same W&B run.
        id_file = self.out_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            run_id = os.environ["WANDB_RUN_ID"]  # a W&B sweep agent assigned this job its run
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group,
                              name=self.name, id=run_id, resume="allow", mode=mode, dir=str(self.out_dir),
                              tags=self.tags, job_type=self.job_type, config=self.config,
                              reinit="finish_previous")
        log.info("W&B run %s (%s mode)", run_id, mode)
        return self

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(flatten(metrics), step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in flatten(metrics).items():
                self.run.summary[k] = v

    def images(self, images: dict[str, Path]) -> None:
        if self.run is None or not images:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    def artifact(self, path: Path, name: str, kind: str) -> None:
        if self.run is None:
            return
        import wandb

        art = wandb.Artifact(name=name, type=kind)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if exc_type is None else 1)
            self.run = None
