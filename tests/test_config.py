"""Every config file composes into the typed schema; bad overrides fail naming the key."""
import json

import pytest
import torch
from hydra.errors import ConfigCompositionException

from evoexp.config import DataCfg, EvalCfg, ModelCfg, RunCfg
from evoexp.recipes.registry import RECIPES

from .conftest import CONF, run_cfg, run_cli

# Options that need a value the user must supply.
REQUIRED = {
    "model/hf": ["model.path=/some/checkpoint"],
    "data/text_file": ["data.calib=/a.txt", "data.eval=/b.txt"],
    **{f"solver/{s}": ["method=sparse"] for s in ("sparsegpt", "wanda", "magnitude", "fista")},
    **{f"solver/{s}": ["method=quant"] for s in ("gptq", "rtn")},
    **{f"solver/{s}": ["method=structured"] for s in ("ziplm", "wanda_sp", "random")},
}
GROUPS = ["model", "data", "method", "search", "solver", "database", "fitness", "eval", "logger", "export", "train"]


def group_options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield f"{group}/{path.stem}"


@pytest.mark.parametrize("option", list(group_options()))
def test_every_group_option_composes_to_typed_config(compose, option):
    group, name = option.split("/")
    cfg = compose([*REQUIRED.get(option, []), f"{group}={name}"])
    run = run_cfg(cfg)
    assert isinstance(run, RunCfg)
    assert isinstance(run.model, ModelCfg) and isinstance(run.data, DataCfg) and isinstance(run.eval, EvalCfg)
    assert run.name == f"{cfg.hydra.runtime.choices.method}-{cfg.hydra.runtime.choices.model}"
    if group == "solver":
        assert run.solver.kind == name


def test_methods_bring_their_default_solver(compose):
    assert run_cfg(compose(["method=sparse"])).solver.kind == "sparsegpt"
    assert run_cfg(compose(["method=quant"])).solver.kind == "gptq"
    assert run_cfg(compose(["method=structured"])).solver.kind == "ziplm"
    assert run_cfg(compose(["method=quant", "solver=rtn"])).solver.group_size == 128
    assert run_cfg(compose([])).solver is None
    db = run_cfg(compose(["database=evopress", "model=llama3_8b"])).database
    assert db.windows * db.seq_len == 2 ** 23 and db.propagation == "auto"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(compose, name):
    cfg = compose([f"experiment={name}", "model=tiny"])
    run = run_cfg(cfg)
    assert isinstance(run, RunCfg) and run.model.name == "tiny"
    assert run.method.kind in RECIPES and run.name == f"{cfg.hydra.runtime.choices.method}-tiny"


def test_all_conf_files_are_covered():
    """No config file sits outside the groups the tests compose."""
    files = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    covered = {f"{o}.yaml" for o in group_options()} | {f"experiment/{p.name}" for p in (CONF / "experiment").glob("*.yaml")}
    covered |= {"config.yaml", "hydra/output/evoexp.yaml", "hydra/help/evoexp.yaml"}
    # composed in tests/test_experiments.py (launcher profiles, and every sweep with every search it sweeps)
    covered |= {"hydra/launcher/local.yaml", "hydra/launcher/slurm.yaml"}
    covered |= {f"sweep/{p.name}" for p in (CONF / "sweep").glob("*.yaml")}
    assert files <= covered, files - covered


def test_defaults(compose):
    run = run_cfg(compose([]))
    assert run.model.name == "smollm2_135m" and run.model.source == "embedded"
    assert run.data.calib == "wikitext2:validation" and run.data.eval == "wikitext2:test"
    assert run.eval.datasets == ["wikitext2:test"] and run.eval.seq_len == 2048 and run.eval.bos is False
    assert run.method.kind == "drop" and run.method.target == 0.25 and run.method.unit == "sub_block"
    assert run.search.kind == "evopress" and run.search.offspring == 16 and run.search.generations == 60
    assert run.dtype.value == "auto" and run.data.seq_len == 1024 and run.data.calib_windows == 32
    assert run.logger.kind == "wandb"


def test_experiment_overrides_primary_values(compose):
    run = run_cfg(compose(["experiment=dense_reference"]))
    assert run.eval.windows is None
    assert [d.value for d in run.eval.dtypes] == ["float32", "bfloat16"]
    assert run.tags == ["reference"]


@pytest.mark.parametrize("override,key", [("eval.windws=2", "eval.windws"), ("seedd=1", "seedd"),
                                          ("eval.windows=abc", "eval.windows"), ("dtype=fp8", "dtype"),
                                          ("model.seq_len=1.5", "model.seq_len")])
def test_bad_override_fails_at_composition(compose, override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert key.split(".")[-1] in str(info.value) + str(info.value.__cause__)


def test_run_dir_is_deterministic_and_ignores_logger(compose):
    a = compose(["model=tiny", "eval.windows=2", "logger=none"])
    b = compose(["eval.windows=2", "model=tiny", "logger=wandb"])
    assert a.hydra.run.dir == b.hydra.run.dir
    assert a.hydra.run.dir.endswith("runs/drop-tiny/eval.windows=2,model=tiny")
    assert compose([]).hydra.run.dir.endswith("runs/drop-smollm2_135m/default")


def test_paper_schedule_calibration_follows_the_model(compose):
    paper = run_cfg(compose(["search=evopress", "model=llama3_8b"]))
    assert paper.data.seq_len == 8192 and paper.data.calib_windows == 16  # 131,072 tokens
    assert [(s.survivors, s.tokens) for s in paper.search.stages] == [(2, 2048), (1, 32768)]
    assert paper.search.offspring == 32 and paper.search.init_candidates == 64 and paper.search.generations is None
    assert run_cfg(compose(["search=evopress", "model=llama2_7b"])).data.calib_windows == 32  # seq 4096


# --- the command line, as users run it --------------------------------------------------------------------------
def one_line_error(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("evoexp: error: ")
    return lines[0]


@pytest.mark.parametrize("args,expect", [
    (["model=tiny", "eval.windws=2"], "eval.windws"),
    (["model=tiny", "eval.windows=abc"], "eval.windows"),
    (["model=/no/such/checkpoint"], "model.path '/no/such/checkpoint'"),
    (["model=no_such_option"], "model/no_such_option"),
    (["model=tiny", "data.calib=/no/such/file.txt"], "data.calib"),
    (["model=tiny", "eval.windows=100000"], "eval.windows"),
])
def test_cli_user_errors_are_one_line(tmp_path, args, expect):
    proc = run_cli(*args, "logger=none", env={"EVOEXP_OUT": str(tmp_path)})
    assert expect in one_line_error(proc)


def test_cli_tiny_dense_run_writes_run_dir(tmp_path):
    args = ["model=tiny", "method=dense", "search=none", "eval.windows=2", "logger=none"]
    proc = run_cli(*args, env={"EVOEXP_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "dense-tiny" / "eval.windows=2,method=dense,model=tiny,search=none"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done"
    entry = result["metrics"]["ppl"]["wikitext2:test"]
    assert entry["protocol"]["windows"] == 2 and entry["protocol"]["seq_len"] == 256
    # A random model over 259 byte tokens: PPL near the vocabulary size, far from 1.
    assert 100 < entry["float32"]["ppl"] < 600
    assert result["versions"]["torch"] == torch.__version__ and set(result["timings"]) == {"load_model", "eval_ppl"}
    assert 100 < result["memory"]["peak_rss_mib"] < 24 * 1024  # this process's peak, measured
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "evoexp.log").exists()
    assert f"{entry['float32']['ppl']:.4f}" in proc.stdout

    again = run_cli(*args, "threads=1", f"hydra.run.dir='{run_dir}'", env={"EVOEXP_OUT": str(tmp_path)})
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr  # threads: same numbers
    # the same dir asked for other settings: the finished result is not passed off as theirs
    other = [*args[:-2], "eval.windows=3", "logger=none", f"hydra.run.dir='{run_dir}'"]
    assert "eval.windows=2 there, 3 now" in one_line_error(run_cli(*other, env={"EVOEXP_OUT": str(tmp_path)}))
    redo = run_cli(*other, "resume=false", env={"EVOEXP_OUT": str(tmp_path)})
    assert redo.returncode == 0, redo.stderr
    assert json.loads((run_dir / "result.json").read_text())["config"]["eval"]["windows"] == 3


@pytest.mark.parametrize("flags, fast", [({"fma", "avx2"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                                         ({"amx_bf16", "amx_tile"}, "bfloat16"), (set(), "float32")])
def test_auto_dtype_is_bf16_only_where_the_cpu_runs_it_natively(compose, monkeypatch, flags, fast):
    import torch

    from evoexp.models import loading
    from evoexp.run import resolve_auto_dtypes

    monkeypatch.setattr(loading, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", cpu) == fast
    assert [loading.resolve_dtype(d, cpu) for d in ("float32", "bfloat16")] == ["float32", "bfloat16"]
    cfg = compose(["eval.dtypes=[auto,float32]", "database.dtype=auto", "device=cpu"])  # the CPU default: auto
    resolve_auto_dtypes(cfg)
    run = run_cfg(cfg)
    assert run.dtype.value == fast and [d.value for d in run.eval.dtypes] == [fast, "float32"]
    assert run.database.dtype.value == fast and run.eval.zeroshot.dtype is None


def test_enum_settings_are_stored_by_name_and_old_run_dirs_still_match():
    from evoexp.run import config_changes

    assert config_changes({"dtype": "DType.float32", "device": "Device.auto"}, {"dtype": "float32", "device": "auto"}) == []
    assert config_changes({"dtype": "DType.float32"}, {"dtype": "bfloat16"}) == ["dtype='float32' there, 'bfloat16' now"]


def test_cli_auto_dtype_records_what_ran(tmp_path):
    from evoexp.models import resolve_device, resolve_dtype

    args = ["model=tiny", "method=dense", "search=none", "eval.windows=1", "logger=none", "dtype=auto"]
    proc = run_cli(*args, env={"EVOEXP_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("runs/dense-tiny/*/result.json")).read_text())
    ran = resolve_dtype("auto", resolve_device("auto"))  # bf16 on a GPU that runs it natively
    assert result["config"]["dtype"] == ran and result["config"]["device"] == "auto"
    assert set(result["metrics"]["ppl"]["wikitext2:test"]) == {"protocol", ran}


def test_cli_help_and_cfg():
    help_ = run_cli("--help")
    assert help_.returncode == 0 and "model: " in help_.stdout and "smollm2_135m" in help_.stdout
    job = run_cli("model=tiny", "--cfg", "job")
    assert job.returncode == 0 and "source: tiny" in job.stdout


def test_cli_multirun_one_dir_and_one_wandb_run_per_job(tmp_path):
    # `-m` after an override, as users type it (`evoexp experiment=X -m seed=0,1,2`); Hydra alone rejects that order
    proc = run_cli("model=tiny", "-m", "method=dense", "search=none", "eval.windows=1", "seed=0,1", "sweep_name=t",
                   "logger=wandb", "logger.mode=offline", env={"EVOEXP_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    dirs = sorted((tmp_path / "sweeps" / "t").glob("*seed=*"))
    assert [d.name.split(",")[-1] for d in dirs] == ["seed=0", "seed=1"]
    ids = [(d / "wandb_id.txt").read_text() for d in dirs]
    assert ids[0] != ids[1]
    for d, run_id in zip(dirs, ids):
        assert json.loads((d / "result.json").read_text())["status"] == "done"
        assert len(list((d / "wandb").glob(f"offline-run-*-{run_id.strip()}"))) == 1
