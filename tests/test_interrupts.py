"""Interrupted work goes on where it stopped: a PPL evaluation from its last finished window, a Ctrl-C'd run
with one line and exit 130, and a finished run is complete (its figures are written before result.json)."""
import json
import signal
import subprocess

import pytest

from evoexp.data import eval_windows, load_tokens
from evoexp.eval import windows_nll
from evoexp.utils import KeyedLog
from tests.conftest import run_cli, start_search

SEARCH = ["model=tiny", "method=drop", "search=evopress_cpu", "search.generations=6", "eval.windows=2",
          "logger=none", "fitness.report_tokens=2048"]


class Killed(Exception):
    pass


def test_ppl_evaluation_killed_midway_resumes_from_its_last_window(tiny, tmp_path, monkeypatch):
    stream = load_tokens("wikitext2:test", tiny.tokenizer)
    windows, _ = eval_windows(stream, tiny.tokenizer, seq_len=64, windows=7, bos=False)
    clean = windows_nll(tiny, windows, batch_size=2, chunk_tokens=40)
    calls = []
    forward = tiny.adapter.hidden_states

    def dies_at_third_batch(x):
        calls.append(x.shape[0])
        if len(calls) == 3:
            raise Killed
        return forward(x)

    log = tmp_path / "windows.jsonl"
    monkeypatch.setattr(tiny.adapter, "hidden_states", dies_at_third_batch)
    with pytest.raises(Killed):
        windows_nll(tiny, windows, batch_size=2, chunk_tokens=40, kept=KeyedLog(log, "ctx", field="nll"))
    assert len(log.read_text().splitlines()) == 4  # windows 0-3 kept as they finished
    calls.clear()
    monkeypatch.setattr(tiny.adapter, "hidden_states", lambda x: calls.append(x.shape[0]) or forward(x))
    resumed = windows_nll(tiny, windows, batch_size=2, chunk_tokens=40, kept=KeyedLog(log, "ctx", field="nll"))
    assert calls == [2, 1]  # only windows 4, 5 and 6 were computed again
    assert resumed == clean
    other = windows_nll(tiny, windows, batch_size=2, chunk_tokens=40, kept=KeyedLog(log, "other", field="nll"))
    assert other == clean and calls == [2, 1, 2, 2, 2, 1]  # sums kept for another context are not reused


def test_dense_evaluation_keeps_no_partial_sums_once_finished(tmp_path):
    args = ["model=tiny", "method=dense", "search=none", "eval.windows=3", "logger=none", "eval.cache_dense=false",
            f"hydra.run.dir={tmp_path}/run"]
    out = run_cli(*args, env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((tmp_path / "run" / "scores").rglob("*.jsonl")) == [tmp_path / "run" / "scores" / "eval_ppl.jsonl"]


def outcome(run_dir):
    result = json.loads((run_dir / "result.json").read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return (result["allocation"]["units"], {n: m["ppl"]["wikitext2:test"]["float32"]["ppl"]
                                             for n, m in result["models"].items()},
            [(h["generation"], h["parent_fitness"], h["parent"]) for h in history])


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes_identically(tmp_path):
    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    clean = run_cli(*SEARCH, "dtype=float32", f"hydra.run.dir={tmp_path}/clean", env=env)
    assert clean.returncode == 0, clean.stderr[-2000:]
    run = tmp_path / "run"
    args = [*SEARCH, "dtype=float32", f"hydra.run.dir={run}"]
    proc = start_search(args, run, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "evoexp: interrupted; run the same command again to resume"
    assert not (run / "FAILED").exists() and not (run / "result.json").exists()
    resumed = run_cli(*args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming search at generation" in resumed.stdout + resumed.stderr
    assert outcome(run) == outcome(tmp_path / "clean")


def test_a_finished_run_is_complete_and_a_rerun_draws_missing_figures(tmp_path):
    run = tmp_path / "run"
    args = [*SEARCH, "search.generations=2", f"hydra.run.dir={run}"]
    first = run_cli(*args, env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert first.returncode == 0, first.stderr[-2000:]
    figures = sorted(p.name for p in (run / "figures").iterdir())
    assert figures == ["convergence.png", "dropped_sub_blocks.png"]
    newest_figure = max(p.stat().st_mtime_ns for p in (run / "figures").iterdir())
    assert newest_figure <= (run / "result.json").stat().st_mtime_ns  # result.json is written last
    # a run finished by a version that wrote result.json first and was killed before its figures
    for p in (run / "figures").iterdir():
        p.unlink()
    (run / "figures").rmdir()
    again = run_cli(*args, env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stdout + again.stderr
    assert sorted(p.name for p in (run / "figures").iterdir()) == figures
