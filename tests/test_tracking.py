"""W&B runs are offline without a login, reuse their id on resume, and are finished even when a job fails."""
import json

import pytest

from evoexp.config import LoggerCfg
from evoexp.tracking import Tracker, flatten


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent-home")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


def test_offline_without_login_and_finished_on_failure(offline, tmp_path):
    import wandb

    with pytest.raises(RuntimeError):
        with Tracker(LoggerCfg(), tmp_path, "job", {"seed": 0}, ["t"]) as tracker:
            assert tracker.run is not None and tracker.run.settings.mode == "offline"
            tracker.log({"search": {"fitness": 0.5}}, step=1)
            raise RuntimeError("boom")
    assert tracker.run is None and wandb.run is None
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("*.wandb"))

    # A resumed job continues the same W&B run.
    with Tracker(LoggerCfg(), tmp_path, "job", {"seed": 0}, []) as again:
        assert again.run.id == run_id


def test_logger_none_is_silent(tmp_path):
    with Tracker(LoggerCfg(kind="none"), tmp_path, "job", {}, []) as tracker:
        tracker.log({"x": 1})
        tracker.summary({"y": 2})
    assert not (tmp_path / "wandb_id.txt").exists()
    assert json.dumps(flatten({})) == "{}"
