"""The recipe contract: every method kind has a registered recipe, whose `validate` catches bad configs before
any model is loaded; results round-trip through the written schema; the kept depth table still renders."""
import time

import pytest

from evoexp.errors import UserError
from evoexp.recipes.contract import ModelEval, RecipeResult
from evoexp.recipes.registry import RECIPES, recipe_for
from evoexp.report.results import find_runs
from evoexp.report.table import collect, markdown
from tests.conftest import CONF, ROOT, run_cfg, run_cli

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
TINY = ["model=tiny", "logger=none"]
# One config mistake per method kind that `validate` must stop, with the start of its message.
BAD = {
    "dense": (["method=dense", "search=none", "export=hf"], "export: method=dense writes no model"),
    "drop": (["method=drop", "export=gptq"], "export: method=drop exports as hf, not gptq"),
    "sparse": (["method=sparse", "search=shortgpt"], "search: 'shortgpt' does not apply to method=sparse"),
    "quant": (["method=quant", "search=owl"], "search: owl allocates sparsity"),
    "structured": (["method=structured", "export=gptq"], "export: gptq packs quantized weights and cannot hold a "
                   "shrunk model"),
}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_has_a_registered_recipe(name, compose):
    kind = compose([f"method={name}"]).method.kind
    assert kind in RECIPES, f"conf/method/{name}.yaml: method.kind={kind} has no recipe in recipes/registry.py"
    assert kind in RECIPES[kind].kinds


def test_every_recipe_kind_has_a_bad_config_case():
    assert set(BAD) == set(RECIPES)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_validate_rejects_a_bad_config_before_the_model_loads(kind, compose, monkeypatch, tmp_path):
    import evoexp.run

    overrides, message = BAD[kind]
    rc = run_cfg(compose([*TINY, *overrides]))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        recipe_for(kind).validate(rc)
    assert time.perf_counter() - t0 < 1.0  # config checks only: no model, tokenizer or text
    # and the job stops there: loading a model would fail this test with another error
    monkeypatch.setattr(evoexp.run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = compose([*TINY, *overrides])
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        evoexp.run.run_job(_without_hydra(cfg), tmp_path / "run")
    assert not (tmp_path / "run" / "progress_config.json").exists()  # nothing written to the run dir


def _without_hydra(cfg):
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def test_unknown_method_kind_is_one_line():
    with pytest.raises(UserError, match=r"^method: unknown kind 'prune' \(expected one of dense, drop"):
        recipe_for("prune")


@pytest.mark.parametrize("overrides, message", [
    (["export=gptq"], "evoexp: error: export: method=drop exports as hf, not gptq"),
    (["search.references=[random]"], "evoexp: error: search.references: 'random' is not a depth baseline"),
    (["method.unit=blocks"], "evoexp: error: method.unit: expected one of sub_block, block, pair, got 'blocks'"),
    (["method.target=1.5"], "evoexp: error: method.target: expected a fraction in (0, 1), got 1.5"),
    (["method.target=0.05"], "evoexp: error: method.target=0.05: drops 0 of 8 units, 8 of which may be dropped"),
])
def test_depth_config_mistakes_fail_in_one_line_before_the_model_loads(overrides, message, tmp_path):
    out = run_cli(*TINY, "method=drop", *overrides, f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [message] or out.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in out.stderr
    log = (tmp_path / "run" / "evoexp.log")
    assert not log.exists() or "model tiny:" not in log.read_text()  # stopped before loading the model


def test_recipe_result_round_trips_through_result_json():
    models = {"dense": ModelEval(fitness=0.0, fitness_kind="kl", fitness_tokens=256, ppl={"w": {"float32": {"ppl": 9.0}}},
                                 details={"lines": ["none", "none"]}),
              "evopress": ModelEval(fitness=0.5, fitness_kind="kl", fitness_tokens=256,
                                    ppl={"w": {"float32": {"ppl": 11.0}}}, details={"lines": ["attn", "none"]})}
    result = RecipeResult("evopress", models, {"search": "evopress", "summary": "s"}, {"generations": 3},
                          {"calibration": {"windows": 4}})
    written = {"method": {"kind": "drop"}, "config": {"search": {"kind": "evopress"}}, **result.to_json()}
    assert written["models"]["evopress"] == {"fitness": 0.5, "fitness_kind": "kl", "fitness_tokens": 256,
                                             "lines": ["attn", "none"], "ppl": {"w": {"float32": {"ppl": 11.0}}}}
    assert RecipeResult.from_json(written) == result
    plain = RecipeResult("dense", {"dense": ModelEval(ppl={"w": {"float32": {"ppl": 9.0}}})})
    assert plain.to_json() == {}  # a plain evaluation: its figures are the run's metrics
    back = RecipeResult.from_json({"method": {"kind": "dense"}, "metrics": {"ppl": {"w": {"float32": {"ppl": 9.0}}}}})
    assert back == plain


def test_kept_depth_table_renders_as_benchmarks_shows_it():
    """The run dirs kept from before the recipe contract still render, with exactly BENCHMARKS.md's figures."""
    runs, unfinished = find_runs([str(ROOT / "bench" / "results" / "sweeps" / "cpu_depth_table")])
    assert (len(runs), unfinished) == (12, 0)
    rows = [line for line in markdown(collect(runs, [], None, False)).splitlines() if line.startswith("| ")]
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    assert len(rows) == 7 and rows[0].startswith("| method | 12.5% Wiki2 PPL")
    assert [r for r in rows if r not in benchmarks] == []
    evopress = next(r for r in rows if r.startswith("| evopress"))
    assert "**31.34 ± 1.35**" in evopress and "**471.69 ± 24.62**" in evopress
