"""Non-uniform sparsity and bit-widths end to end on the tiny model: EvoPress and every baseline, same budget."""
import json

import pytest

from evoexp.utils import read_json
from tests.conftest import run_cli

SMALL = ["model=tiny", "logger=none", "eval.windows=2", "database.windows=8", "data.calib_windows=8",
         "search=evopress", "search.generations=2", "search.offspring=4", "search.init_candidates=4",
         "search.init_tokens=256", "search.stages=[{survivors:2,tokens:512},{survivors:1,tokens:1024}]",
         "fitness.report_tokens=1024", "resume=false"]


def run(tmp_path, *args):
    out = run_cli(*SMALL, *args, f"hydra.run.dir={tmp_path}/run", env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    return read_json(tmp_path / "run" / "result.json")


def test_sparse_search_and_baselines_hold_the_same_number_of_nonzeros(tmp_path):
    result = run(tmp_path, "method=sparse", "method.target=0.6", "search.references=[uniform,owl,dp,random]")
    models = result["models"]
    assert set(models) == {"dense", "evopress", "uniform", "owl", "dp", "random"}
    zeros = {name: m["achieved"]["zeros"] for name, m in models.items() if name != "dense"}
    assert len(set(zeros.values())) == 1, zeros  # every allocation prunes exactly as many weights
    assert models["uniform"]["achieved"]["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert models["dense"]["fitness"] == pytest.approx(0, abs=1e-5)
    assert all(m["fitness"] > 1e-5 for name, m in models.items() if name != "dense")
    alloc = read_json(tmp_path / "run" / "allocation.json")
    values = alloc["levels"]
    assert len(values) == 56 and len(set(values.values())) > 1  # EvoPress moved away from uniform
    assert result["search"]["generations"] == 2
    history = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["generation"] for h in history] == [1, 2]
    owl = result["models"]["owl"]
    assert owl["achieved"]["params"] == models["uniform"]["achieved"]["params"]
    # one-off scorings are kept for a killed run's rerun: a line per model scored
    report = (tmp_path / "run" / "scores" / "report_fitness.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["fitness"] for line in report) == sorted(m["fitness"] for m in models.values())
    # the databases are built inside the search and OWL's reference: their seconds are not counted twice
    steps = {r["key"]: r.get("within") for r in map(json.loads, (tmp_path / "run" / "timings.jsonl").open())}
    assert steps["database"] == "search" and steps["database_owl"] == "reference_owl" and steps["search"] is None
    assert result["timings_nested"]["database"] == result["timings"]["database"] > 0
    assert result["memory"]["peak_rss_mib_by_step"]["search"] <= result["memory"]["peak_rss_mib"]


@pytest.mark.parametrize("target,rule", [(3, "size"), (2.5, "none")])
def test_quant_search_and_baselines_keep_the_bit_budget(tmp_path, target, rule):
    refs = "[uniform,dp,random]" if target == int(target) else "[dp,random]"
    result = run(tmp_path, "method=quant", f"method.target={target}", f"method.group_rule={rule}",
                 f"search.references={refs}")
    models = result["models"]
    bits = {name: m["achieved"]["bits"] for name, m in models.items() if name != "dense"}
    assert bits["dp"] <= target + 1e-9
    if target == int(target):
        assert bits["evopress"] == bits["uniform"] == bits["random"] == target
    else:  # the start's random budget, kept exactly by the search
        start = read_json(tmp_path / "run" / "allocation.json")["achieved"]["bits"]
        assert target - 0.2 < bits["evopress"] == start <= target
        assert bits["random"] <= target


def test_owl_and_the_other_baselines_run_over_a_compressed_propagation_database(tmp_path):
    result = run(tmp_path, "method=sparse", "method.target=0.6", "database.propagation=compressed",
                 "search.references=[owl,dp,random]")
    models = result["models"]
    zeros = {name: m["achieved"]["zeros"] for name, m in models.items() if name != "dense"}
    assert set(zeros) == {"evopress", "owl", "dp", "random"} and len(set(zeros.values())) == 1, zeros
    manifests = [read_json(p) for p in (tmp_path / "cache" / "databases").glob("*/manifest.json")]
    assert len(manifests) == 2  # the search's grid (DP and random share it) and OWL's own
    for manifest in manifests:
        spec = manifest["spec"]
        assert spec["propagation"] == "compressed"
        for name, index in spec["reference"].items():  # every block's inputs come from the target level
            assert spec["grid"][name][index] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("target", [2.5])  # 3 bits: see test_allocate
def test_quant_dp_holds_every_size_group_at_the_target(tmp_path, target):
    args = ["model=tiny", "logger=none", "eval.windows=1", "database.windows=8", "data.calib_windows=8",
            "fitness.report_tokens=1024", "method=quant", f"method.target={target}", "search=dp",
            "search.budget=groups",
            f"hydra.run.dir={tmp_path}/run"]
    out = run_cli(*args, env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    levels = read_json(tmp_path / "run" / "allocation.json")["levels"]
    import torch
    from evoexp.config import ModelCfg
    from evoexp.models import load_model

    model = load_model(ModelCfg(name="tiny", source="tiny"), torch.device("cpu"), torch.float32).model
    sizes = {name: model.get_submodule(name).weight.numel() for name in levels}
    groups: dict[int, list[int]] = {}
    for name, bits in levels.items():
        groups.setdefault(sizes[name], []).append(bits)
    assert len(groups) > 1
    for bits in groups.values():  # each group of equal-size layers spends at most its share, to the bit
        assert sum(bits) == int(target * len(bits)), (target, bits)
    assert len(set(levels.values())) > 1  # the errors moved bits between layers of a group
