"""A resumed run reports the wall time of all its processes and the largest peak memory (evoexp.timings)."""
import json

from evoexp.timings import TIMINGS, record_step, run_totals


def test_step_times_add_up_over_processes_and_the_largest_peak_is_kept(tmp_path):
    record_step(tmp_path, "load_model", 4.0)
    record_step(tmp_path, "search", 600.5)  # the first process, stopped with SIGINT inside its search
    with open(tmp_path / TIMINGS, "a") as f:  # a process with a bigger peak than this one
        f.write(json.dumps({"key": "search", "seconds": 0.0, "peak_rss_mib": 1e7}) + "\n")
    record_step(tmp_path, "load_model", 3.0)  # the second: loads again, finishes the search
    record_step(tmp_path, "search", 100.25)
    timings, peak = run_totals(tmp_path)
    assert timings == {"load_model": 7.0, "search": 700.75}
    assert peak["peak_rss_mib"] == 1e7


def test_a_torn_or_damaged_record_costs_only_what_follows_it(tmp_path, caplog):
    record_step(tmp_path, "search", 10.0)
    with open(tmp_path / TIMINGS, "a") as f:
        f.write('{"key": "eval_pp')  # a kill in the middle of an append
    timings, peak = run_totals(tmp_path)
    assert timings == {"search": 10.0} and peak["peak_rss_mib"] > 10
    (tmp_path / TIMINGS).write_text('{"key": "search", "seconds": 1.0}\nnot json\n{"key": "x", "seconds": 2}\n')
    assert run_totals(tmp_path)[0] == {"search": 1.0} and "cut short or garbled" in caplog.text
    assert run_totals(tmp_path / "none")[0] == {}
