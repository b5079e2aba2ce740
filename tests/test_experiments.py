"""Every experiment file runs; a sweep fills deterministic job dirs, re-launching skips them; evoexp-table and
the figures turn the results into the paper's layout."""
import json
from pathlib import Path

import pytest

from evoexp.report.table import main as table_main
from evoexp.utils import read_json
from tests.conftest import CONF, run_cli

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Shrinks any experiment to one generation on the tiny model, with offline data and one eval window.
TINY = ["model=tiny", "logger=none", "data=wikitext2", "data.calib_windows=4", "data.seq_len=128",
        "database.windows=4", "eval.windows=1", "eval.datasets=[wikitext2:test]", "fitness.report_tokens=256"]
ZEROSHOT = ["eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=2", "eval.zeroshot.batch_size=2",
            "eval.zeroshot.builtin_tasks=false"]  # piqa ships offline: no index of the harness's own tasks
SEARCH = ["search.generations=1", "search.offspring=2", "search.init_candidates=2", "search.init_tokens=128",
          "search.stages=[{survivors:1,tokens:256}]"]
DARWIN = [*SEARCH[:-1], "search.stages=[{survivors:1,tokens:256,train_tokens:128}]", "search.train_windows=4"]
TRAIN = ["train.tokens=512", "train.batch=2"]


def test_every_experiment_is_listed():
    assert len(EXPERIMENTS) >= 26
    assert {"cpu_depth_table", "cpu_sparse_table", "cpu_quant_table", "cpu_quant_frac_table"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs_one_generation_on_tiny(name, compose, tmp_path, monkeypatch):
    from evoexp.run import run_job

    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path / "cache"))
    base = compose([f"experiment={name}"])
    evopress = base.search.kind in ("evopress", "darwinlm")
    search = {"evopress": SEARCH, "darwinlm": DARWIN}.get(base.search.kind, [])
    zeroshot = bool(base.eval.zeroshot.tasks)
    train = TRAIN if base.train.kind != "none" else []
    cfg = compose([f"experiment={name}", *TINY, *search, *(ZEROSHOT if zeroshot else []), *train])
    cfg = _without_hydra(cfg)
    run_job(cfg, tmp_path / "run")
    result = read_json(tmp_path / "run" / "result.json")
    assert result["status"] == "done"
    assert result["method"]["kind"] == base.method.kind
    if evopress:
        assert result["search"]["generations"] == 1
        refs = base.search.references or []
        assert set(refs) <= set(result["models"]), f"{name}: references {refs} not all evaluated"
    if zeroshot:  # the experiment asked for zero-shot accuracy: it was computed
        assert "piqa" in result["metrics"]["zeroshot"]["tasks"]
    if train:  # and post-training: the found model trained and evaluated again
        assert f"{result['found']}_trained" in result["models"]


def _without_hydra(cfg):
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def test_paper_rows_use_the_paper_schedules(compose):
    depth = compose(["experiment=paper_depth_llama3_8b"])
    assert (depth.model.name, depth.search.offspring, depth.data.calib_windows) == ("llama3_8b", 32, 16)
    assert depth.hydra.sweeper.params["method.target"] == "0.125,0.25,0.375,0.5"
    sparse = compose(["experiment=paper_sparse_phi3_medium"])
    assert (sparse.search.generations, sparse.search.offspring, sparse.database.windows) == (400, 64, 1024)
    frac = compose(["experiment=paper_quant_frac_llama2_7b"])
    assert frac.data.seq_len == 4096 and frac.data.calib_windows == 128
    assert frac.search.reference_settings.random.candidates == 32
    assert frac.hydra.sweeper.params["method.target"] == "2.25,2.5"


def test_darwinlm_rows_use_the_papers_targets_and_schedule(compose):
    llama2 = compose(["experiment=paper_darwinlm_llama2_7b"])
    assert (llama2.model.name, llama2.method.target, llama2.search.kind, llama2.search.generations) == \
        ("llama2_7b", 0.62, "darwinlm", 200)
    assert [s.train_tokens for s in llama2.search.stages] == [10000, 50000, 100000, 200000]
    assert llama2.database.windows * llama2.database.seq_len == 2**23 and llama2.export.kind == "auto"
    assert compose(["experiment=paper_darwinlm_llama31_8b"]).database.windows == 2**24 // 8192
    table = compose(["experiment=cpu_structured_table"])
    assert table.hydra.sweeper.params["search"] == \
        "darwinlm_cpu,evopress_darwinlm_cpu,uniform,bonsai_cpu,bonsai_prior_cpu,bonsai_random_cpu"
    for search in ("bonsai_cpu", "bonsai_prior_cpu", "bonsai_random_cpu"):  # Bonsai's own calibration, not the table's
        bonsai = compose(["experiment=cpu_structured_table", f"search={search}"]).search
        assert (bonsai.kind, bonsai.samples, bonsai.seq_len) == ("bonsai", 8, 512)
    # the ablation is DarwinLM's schedule without the training
    darwin, plain = (compose(["experiment=cpu_structured_table", f"search={s}"]).search
                     for s in ("darwinlm_cpu", "evopress_darwinlm_cpu"))
    assert (plain.kind, plain.generations, plain.offspring) == ("evopress", darwin.generations, darwin.offspring)
    assert [(s.survivors, s.tokens) for s in plain.stages] == [(s.survivors, s.tokens) for s in darwin.stages]


def test_launcher_profiles_compose(compose):
    assert compose(["hydra/launcher=slurm"]).hydra.launcher.gpus_per_node == 1
    assert compose(["hydra/launcher=local"]).hydra.launcher.n_jobs == 2
    seeds = compose(["experiment=cpu_depth_table", "sweep=seeds"]).hydra.sweeper.params
    assert dict(seeds) == {"method.target": "0.125,0.25,0.375,0.5", "seed": "0,1,2"}


def test_bad_reference_settings_fail_in_one_line(tmp_path):
    out = run_cli(*TINY, "method=sparse", "search=evopress", "search.references=[random]",
                  "search.reference_settings={random:{candidats:32}}", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("evoexp: error: search.reference_settings.random: "
                                                          "unknown key(s) ['candidats']")


def test_sweep_then_table_then_figures(tmp_path, capsys):
    """The acceptance path on tiny: experiment x seeds as a multirun, re-launch skips, evoexp-table renders."""
    args = ["experiment=cpu_depth_table", *TINY, *SEARCH, "search.track_every=1", "method.target=0.25",
            "seed=0,1", "-m"]
    env = {"EVOEXP_OUT": str(tmp_path), "EVOEXP_CACHE": str(tmp_path / "cache")}
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted((tmp_path / "sweeps" / "cpu_depth_table").glob("*/result.json"))
    assert len(jobs) == 2 and {read_json(p)["config"]["seed"] for p in jobs} == {0, 1}
    again = run_cli(*args, env=env)
    assert again.returncode == 0 and again.stdout.count("already finished") + again.stderr.count(
        "already finished") == 2

    for job in jobs:
        history = [json.loads(line) for line in (job.parent / "history.jsonl").read_text().splitlines()]
        assert set(history[-1]["heldout"]) == {"wikitext2:test"} and history[-1]["heldout"]["wikitext2:test"] > 1
        for fig in ("convergence.png", "dropped_sub_blocks.png"):
            png = job.parent / "figures" / fig
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert table_main([str(tmp_path / "sweeps" / "cpu_depth_table"), "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert {"dense", "shortgpt", "window_cosine", "subcloning", "shortened_llama", "evopress"} <= set(rows)
    assert list(rows)[1] == "dense" and list(rows)[-1] == "evopress"  # header first, EvoPress last
    ppl = [(r := read_json(p))["models"]["evopress"]["ppl"]["wikitext2:test"][r["config"]["dtype"]]["ppl"]
           for p in jobs]
    mean = sum(ppl) / 2
    std = abs(ppl[0] - ppl[1]) / 2 ** 0.5
    assert f"{mean:.2f} ± {std:.2f}" in rows["evopress"]
    csv_rows = (tmp_path / "t.csv").read_text().splitlines()
    assert any(r.startswith("tiny,drop,evopress,0.25,Wiki2 PPL,") and r.endswith(",2") for r in csv_rows)
    assert r"\toprule" in (tmp_path / "t.tex").read_text()


def _fake_result(path: Path, target, seed, fitness, ppl_evo, ppl_uni, zeroshot=None):
    pb = {str(b): {"q_proj": 3.0 + (b % 2), "down_proj": 3.0 - (b % 2)} for b in range(4)}
    entry = lambda p: {"ppl": {"wikitext2:test": {"protocol": {"windows": 4, "seq_len": 128},  # noqa: E731
                                                   "float32": {"ppl": p}}}, "per_block": pb}
    models = {"dense": entry(10.0), "evopress": entry(ppl_evo), "uniform": entry(ppl_uni)}
    if zeroshot is not None:
        models["evopress"]["zeroshot"] = {"average": zeroshot, "report_metrics": {"piqa": "acc"},
                                          "tasks": {"piqa": {"acc": zeroshot}},
                                          "protocol": {"lm_eval": "0.4.13", "limit": None}}
    result = {"status": "done", "model": {"name": "m"}, "method": {"kind": "quant", "target": target},
              "config": {"seed": seed, "fitness": {"kind": fitness}}, "models": models,
              "allocation": {"search": "evopress", "per_block": pb, "numel": {"q_proj": 10, "down_proj": 30}}}
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps(result))
    return result


def test_table_splits_rows_by_config_and_averages_seeds(tmp_path, capsys):
    _fake_result(tmp_path / "a", 3, 0, "kl", 12.0, 15.0, zeroshot=0.60)
    _fake_result(tmp_path / "b", 3, 1, "kl", 14.0, 15.0, zeroshot=0.62)
    _fake_result(tmp_path / "c", 3, 0, "ppl", 13.0, 15.0)
    (tmp_path / "d" / ".hydra").mkdir(parents=True)  # a job that has not finished
    assert table_main([str(tmp_path), "--by", "fitness.kind", "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert "(1 unfinished run(s) left out)" in out.err
    rows = {tuple(r.split(",")[2:5]): r.split(",")[5:] for r in out.out.strip().splitlines()[1:]}
    assert rows[("evopress (fitness.kind=kl)", "3", "Wiki2 PPL")] == ["13.0", repr(2 ** 0.5), "2"]
    assert rows[("evopress (fitness.kind=ppl)", "3", "Wiki2 PPL")][2] == "1"
    assert rows[("dense", "3", "Wiki2 PPL")] == ["10.0", "0.0", "2"]  # once per seed, not once per run
    assert float(rows[("evopress (fitness.kind=kl)", "3", "0-shot avg")][0]) == pytest.approx(0.61)
    assert table_main([str(tmp_path), "--by", "fitness.kind"]) == 0
    md = capsys.readouterr().out
    assert "| method | 3 bit Wiki2 PPL | 3 bit 0-shot avg |" in md
    assert "| evopress (fitness.kind=kl) | **13.00 ± 1.41** | 61.0 ± 1.4 |" in md
    assert "| evopress (fitness.kind=ppl) | **13.00** | – |" in md  # ties are all bold
    assert "0-shot avg: mean of piqa acc" in md


def test_table_lists_each_trained_model_after_its_one_shot_one():
    from evoexp.report.table import row_order

    found = ["dense", "darwinlm", "darwinlm_trained", "uniform_trained", "evopress", "uniform", "evopress_trained",
             "random (x=1)"]
    assert sorted(found, key=lambda r: row_order(r, found)) == [
        "dense", "uniform", "uniform_trained", "random (x=1)", "evopress", "evopress_trained", "darwinlm",
        "darwinlm_trained"]


def test_table_reports_an_empty_dir_in_one_line(tmp_path, capsys):
    assert table_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("evoexp-table: error: no finished result.json under")


def test_level_profile_figure_from_a_result(tmp_path):
    from evoexp.report.figures import write_figures
    from evoexp.report.results import read_run

    result = _fake_result(tmp_path / "run", 3, 0, "kl", 12.0, 15.0)
    (tmp_path / "run" / "history.jsonl").write_text(
        "".join(json.dumps({"generation": g, "parent_fitness": 1.0 / g}) + "\n" for g in (1, 2, 3)))
    paths = write_figures(read_run(result, tmp_path / "run"))
    assert sorted(p.name for p in paths) == ["bits_profile.png", "convergence.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


@pytest.mark.parametrize("sweep", sorted((CONF.parent / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_files_drive_valid_overrides(sweep, compose):
    """Every W&B sweep's first grid point, passed as `key=value` (args_no_hyphens), composes."""
    import yaml

    spec = yaml.safe_load(sweep.read_text())
    assert spec["program"] == "evoexp" and spec["command"] == ["${program}", "${args_no_hyphens}"]
    assert spec["metric"]["name"].startswith("eval/ppl/")
    overrides = [f"{k}={p['value'] if 'value' in p else p['values'][0]}" for k, p in spec["parameters"].items()]
    cfg = compose(overrides)
    assert cfg.method.kind in ("drop", "sparse", "quant")


@pytest.mark.parametrize("sweep", ["cpu_depth_methods", "cpu_sparse_methods"])
def test_method_sweeps_compose_with_every_search(sweep, compose):
    params = compose([f"sweep={sweep}"]).hydra.sweeper.params
    for search in params["search"].split(","):
        cfg = compose([f"sweep={sweep}", f"search={search}"])
        assert cfg.search.references == [] and cfg.sweep_name == sweep


def test_table_cost_columns_split_the_training_off_the_one_shot_row(tmp_path, capsys):
    result = _fake_result(tmp_path / "a", 0.5, 0, "kl", 12.0, 15.0)
    result["method"]["kind"] = "structured"
    result["models"]["evopress_trained"] = result["models"]["evopress"]
    result["found"] = "evopress"
    result["timings"] = {"load_model": 6.0, "teacher": 60.0, "search": 480.0, "reference_uniform": 30.0,
                         "eval_ppl_evopress": 60.0, "train": 300.0, "eval_ppl_evopress_trained": 60.0}
    result["memory"] = {"peak_rss_mib": 4096.0}  # no per-step peaks (a run of an older evoexp)
    (tmp_path / "a" / "result.json").write_text(json.dumps(result))

    def table() -> dict:
        assert table_main([str(tmp_path), "--cost", "--format", "csv"]) == 0
        return {tuple(r.split(",")[2:5]): float(r.split(",")[5])
                for r in capsys.readouterr().out.strip().splitlines()[1:]}

    rows = table()
    assert rows[("evopress", "0.5", "method min")] == 9.0  # teacher + search: no loading, evaluation, reference
    assert rows[("evopress_trained", "0.5", "method min")] == 14.0  # + the training
    assert rows[("evopress_trained", "0.5", "peak GiB")] == 4.0 and ("uniform", "0.5", "method min") not in rows
    assert ("evopress", "0.5", "peak GiB") not in rows  # the overall peak may be the training's: not known
    # per-step records (the run dir's timings.jsonl): each row gets the peak of its own steps
    steps = [("teacher", 60.0, 1024.0), ("search", 440.0, 2048.0), ("eval_ppl_evopress", 60.0, 2560.0),
             ("train", 300.0, 6144.0), ("eval_ppl_evopress_trained", 60.0, 6144.0),
             ("search", 40.0, 1024.0)]  # a resumed process
    (tmp_path / "a" / "timings.jsonl").write_text("".join(
        json.dumps({"key": k, "seconds": s, "peak_rss_mib": p}) + "\n" for k, s, p in steps))
    rows = table()
    assert rows[("evopress", "0.5", "method min")] == 9.0 and rows[("evopress", "0.5", "peak GiB")] == 2.0
    assert rows[("evopress_trained", "0.5", "method min")] == 14.0
    assert rows[("evopress_trained", "0.5", "peak GiB")] == 6.0
    # a record restored from the search's own log: its seconds count, its peak is not known
    with open(tmp_path / "a" / "timings.jsonl", "a") as f:
        f.write(json.dumps({"key": "search", "seconds": 600.0, "restored_from": "history.jsonl"}) + "\n")
    rows = table()
    assert rows[("evopress", "0.5", "method min")] == 19.0 and rows[("evopress_trained", "0.5", "method min")] == 24.0
    assert ("evopress", "0.5", "peak GiB") not in rows and ("evopress_trained", "0.5", "peak GiB") not in rows
    # result.json alone (no timings.jsonl), as a finished run writes it now: a database built inside the search
    # counts once
    (tmp_path / "a" / "timings.jsonl").unlink()
    result["timings"] = {"database": 120.0, "search": 540.0, "eval_ppl_evopress": 60.0}
    result["timings_nested"] = {"database": 120.0}
    result["memory"] = {"peak_rss_mib": 2048.0, "peak_rss_mib_by_step": {"database": 1024.0, "search": 1536.0,
                                                                         "eval_ppl_evopress": 2048.0}}
    result["models"].pop("evopress_trained")
    (tmp_path / "a" / "result.json").write_text(json.dumps(result))
    rows = table()
    assert rows[("evopress", "0.5", "method min")] == 9.0 and rows[("evopress", "0.5", "peak GiB")] == 1.5
