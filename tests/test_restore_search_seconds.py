"""bench/restore_search_seconds.py: search seconds a hard kill lost, restored from the search's own log."""
import importlib.util
import json
from pathlib import Path

from evoexp.report.results import find_runs
from evoexp.timings import TIMINGS, record_step, step_records
from evoexp.utils import append_jsonl, write_json

spec = importlib.util.spec_from_file_location(
    "restore_search_seconds", Path(__file__).parents[1] / "bench" / "restore_search_seconds.py")
restore = importlib.util.module_from_spec(spec)
spec.loader.exec_module(restore)


def make_run(path: Path, generation_seconds: list[float], done: bool = True) -> Path:
    path.mkdir(parents=True)
    for g, s in enumerate(generation_seconds, 1):
        append_jsonl(path / "history.jsonl", {"generation": g, "seconds": s})
    record_step(path, "database", 400.0, within="search")
    record_step(path, "search", 410.0)  # the process that rebuilt the database and resumed at the last generation
    record_step(path, "eval_ppl_darwinlm", 50.0)
    if done:
        write_json(path / "result.json", {"status": "done", "model": {"name": "m"}, "method": {"kind": "structured"},
                                          "models": {}, "found": "darwinlm",
                                          "config": {"search": {"kind": "darwinlm"}}})
    return path


def test_lost_search_seconds_are_restored_once_without_a_peak(tmp_path, capsys):
    run = make_run(tmp_path / "sweep" / "a", [300.0] * 10)
    make_run(tmp_path / "sweep" / "live", [300.0] * 10, done=False)  # still running: its record is to come
    assert restore.main([str(tmp_path / "sweep")]) == 0
    assert "a: search recorded 10 s, history.jsonl 3000 s: +2990 s" in capsys.readouterr().out
    added = step_records(run)[-1]
    assert added["restored_from"] == "history.jsonl" and added["seconds"] == 2990.0 and "peak_rss_mib" not in added
    assert len(step_records(tmp_path / "sweep" / "live")) == 3
    restore.main([str(tmp_path / "sweep")])  # once only
    assert len(step_records(run)) == 4
    (found,), _ = find_runs([str(run)])
    assert found.steps.total(found.steps.seconds) == 3450.0  # the database once, in the search
    assert found.steps.peaks["search"] is None


def test_a_search_whose_records_hold_its_generations_is_left_alone(tmp_path, capsys):
    run = make_run(tmp_path / "b", [2.0, 3.0])
    restore.main([str(run), "--dry-run"])
    assert capsys.readouterr().out == "" and len((run / TIMINGS).read_text().splitlines()) == 3
    assert json.loads((run / TIMINGS).read_text().splitlines()[0])["within"] == "search"
