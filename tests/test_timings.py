"""A resumed run reports the wall time of all its processes and the largest peak memory (evoexp.timings)."""
import json

from evoexp.timings import TIMINGS, record_step, run_totals, step_records, step_totals


def test_step_times_add_up_over_processes_and_the_largest_peak_is_kept(tmp_path):
    record_step(tmp_path, "load_model", 4.0)
    record_step(tmp_path, "search", 600.5)  # the first process, stopped with SIGINT inside its search
    with open(tmp_path / TIMINGS, "a") as f:  # a process with a bigger peak than this one
        f.write(json.dumps({"key": "search", "seconds": 0.0, "peak_rss_mib": 1e7}) + "\n")
    record_step(tmp_path, "load_model", 3.0)  # the second: loads again, finishes the search
    record_step(tmp_path, "search", 100.25)
    steps, peak = run_totals(tmp_path)
    assert steps.seconds == {"load_model": 7.0, "search": 700.75} and steps.total(steps.seconds) == 707.75
    assert peak["peak_rss_mib"] == 1e7


def test_a_torn_or_damaged_record_costs_only_what_follows_it(tmp_path, caplog):
    record_step(tmp_path, "search", 10.0)
    with open(tmp_path / TIMINGS, "a") as f:
        f.write('{"key": "eval_pp')  # a kill in the middle of an append
    steps, peak = run_totals(tmp_path)
    assert steps.seconds == {"search": 10.0} and peak["peak_rss_mib"] > 10
    (tmp_path / TIMINGS).write_text('{"key": "search", "seconds": 1.0}\nnot json\n{"key": "x", "seconds": 2}\n')
    assert run_totals(tmp_path)[0].seconds == {"search": 1.0} and "cut short or garbled" in caplog.text
    assert run_totals(tmp_path / "none")[0].seconds == {}


def test_each_step_keeps_its_largest_peak_and_an_unknown_peak_stays_unknown(tmp_path):
    lines = [{"key": "search", "seconds": 5.0, "peak_rss_mib": 100.0}, {"key": "train", "seconds": 1.0,
             "peak_rss_mib": 900.0}, {"key": "search", "seconds": 5.0, "peak_rss_mib": 300.0},
             {"key": "eval", "seconds": 2.0, "peak_rss_mib": 50.0}, {"key": "eval", "seconds": 2.0},  # restored
             {"key": "eval", "seconds": 2.0, "peak_rss_mib": 60.0}]
    (tmp_path / TIMINGS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    steps = step_totals(step_records(tmp_path))
    assert steps.seconds == {"search": 10.0, "train": 1.0, "eval": 6.0}
    assert steps.peaks == {"search": 300.0, "train": 900.0, "eval": None}
    again, peak = run_totals(tmp_path)
    assert again == steps and peak["peak_rss_mib"] >= 900.0


def test_a_step_timed_inside_another_counts_once_in_the_total(tmp_path):
    record_step(tmp_path, "calibration", 1.0, within="database")
    record_step(tmp_path, "database", 400.0, within="search")
    record_step(tmp_path, "search", 1000.0)  # its 1000 s hold the database's 400
    record_step(tmp_path, "eval_ppl_x", 50.0)
    steps = run_totals(tmp_path)[0]
    assert steps.seconds == {"calibration": 1.0, "database": 400.0, "search": 1000.0, "eval_ppl_x": 50.0}
    assert steps.total(steps.seconds) == 1050.0 and steps.total(["search", "database"]) == 1000.0
    # records from before steps named their enclosing one: a database build was always inside a step
    (tmp_path / TIMINGS).write_text('{"key": "database", "seconds": 400.0}\n{"key": "search", "seconds": 410.0}\n')
    assert run_totals(tmp_path)[0].total(["database", "search"]) == 410.0
