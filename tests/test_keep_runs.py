"""bench/keep_runs.py: a sweep's finished jobs and unfinished jobs' progress carried between trees."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("keep_runs", Path(__file__).parents[1] / "bench" / "keep_runs.py")
keep_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keep_runs)


def make_run(root: Path, name: str, *, done: bool = False, generations: int = 0, scores: int = 0) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "progress_config.json").write_text("{}")
    (run / "zeroshot_requests").mkdir()
    (run / "zeroshot_requests" / "cache.pickle").write_bytes(b"x")
    if generations:
        (run / "history.jsonl").write_text("".join(json.dumps({"generation": g}) + "\n" for g in range(generations)))
        (run / "search_state.json").write_text(json.dumps({"generation": generations}))
    if scores:
        (run / "scores").mkdir()
        (run / "scores" / "search start.jsonl").write_text("{}\n" * scores)
    if done:
        (run / "result.json").write_text(json.dumps({"status": "done"}))
    return run


def files(run: Path) -> set[str]:
    return {str(f.relative_to(run)) for f in run.rglob("*") if f.is_file()}


def test_finished_and_unfinished_runs_are_kept_with_their_progress(tmp_path):
    src, dest = tmp_path / "outputs", tmp_path / "kept"
    make_run(src, "seed=0", done=True, generations=30)
    make_run(src, "seed=1", generations=4, scores=16)
    (src / "seed=2" / ".hydra").mkdir(parents=True)  # started, nothing to resume yet
    (src / "seed=3").mkdir()
    (src / "seed=3" / "progress_config.json").write_text("{}")
    make_run(src, "seed=4.tmp", generations=2)  # what a killed copy leaves behind
    counts = keep_runs.keep(src, dest, 2**20)
    assert counts == {"finished": 1, "unfinished": 1, "already there": 0}
    assert sorted(p.name for p in dest.iterdir()) == ["seed=0", "seed=1"]
    assert files(dest / "seed=1") == {".hydra/config.yaml", "progress_config.json", "history.jsonl",
                                      "search_state.json", "scores/search start.jsonl"}
    assert (dest / "seed=1" / "history.jsonl").read_text() == (src / "seed=1" / "history.jsonl").read_text()
    assert keep_runs.finished(dest / "seed=0") and keep_runs.progress(dest / "seed=1") == 4 + 16
    assert not list(dest.rglob("*.tmp")) and not list(dest.rglob("*.old"))


def test_a_run_further_on_is_never_replaced_by_one_behind(tmp_path):
    kept, outputs = tmp_path / "kept", tmp_path / "outputs"
    make_run(kept, "a", generations=10)
    make_run(kept, "b", done=True, generations=30)
    make_run(outputs, "a", generations=3)  # a re-launch that was not given the kept runs first
    make_run(outputs, "b", generations=40)  # further on, but b is finished in kept
    assert keep_runs.keep(outputs, kept, 2**20) == {"finished": 0, "unfinished": 0, "already there": 2}
    assert keep_runs.progress(kept / "a") == 10 and keep_runs.finished(kept / "b")


def test_an_unfinished_run_is_replaced_by_its_continuation_without_stale_files(tmp_path):
    kept, outputs = tmp_path / "kept", tmp_path / "outputs"
    make_run(kept, "a", generations=3)
    (kept / "a" / "stale.txt").write_text("from an older copy")
    make_run(outputs, "a", generations=7, scores=2)
    assert keep_runs.keep(outputs, kept, 2**20)["unfinished"] == 1
    assert keep_runs.progress(kept / "a") == 9 and not (kept / "a" / "stale.txt").exists()
    make_run(outputs, "a2", done=True)
    (outputs / "a2").rename(outputs / "done")
    make_run(kept, "done", generations=12)  # a finished run replaces any unfinished copy
    assert keep_runs.keep(outputs, kept, 2**20)["finished"] == 1 and keep_runs.finished(kept / "done")
    assert not (kept / "done" / "history.jsonl").exists()


def test_files_over_the_size_limit_are_left_out(tmp_path):
    src, dest = tmp_path / "outputs", tmp_path / "kept"
    run = make_run(src, "a", done=True)
    (run / "model.safetensors").write_bytes(b"0" * 4096)
    keep_runs.keep(src, dest, 1024)
    assert "model.safetensors" not in files(dest / "a") and "result.json" in files(dest / "a")


@pytest.mark.parametrize("text", ["", "{}\n{}\n{\"cut"])
def test_progress_counts_complete_lines(tmp_path, text):
    run = make_run(tmp_path, "a", generations=1)
    (run / "scores").mkdir()
    (run / "scores" / "random.jsonl").write_text(text)
    assert keep_runs.progress(run) == 1 + text.count("\n")
