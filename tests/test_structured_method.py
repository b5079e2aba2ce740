"""method=structured (issue 33): exact parameter budgets, the compact database, searches from the CLI and the
physically shrunk export, on the tiny model (8 blocks, 4 query / 2 KV heads of 16, MLP 128)."""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from evoexp.config import MagnitudeCfg, StructuredMethodCfg, ZipLMCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, DatabaseSpec, LevelApplier, build_database
from evoexp.database.provision import resolve_propagation
from evoexp.database.store import decode_structured, encode_structured
from evoexp.errors import UserError
from evoexp.methods.structured import (kept_state, measure_structured, spread, structured_budget, structured_levels,
                                       structured_units)
from evoexp.models.heads import geometry, removed_params
from evoexp.solvers.structured import ZipLM
from evoexp.utils import read_json
from tests.conftest import run_cli

SMALL = ["model=tiny", "logger=none", "eval.windows=2", "database.windows=8", "data.calib_windows=8",
         "fitness.report_tokens=1024", "resume=false"]
EVO = ["search=evopress", "search.generations=2", "search.offspring=4", "search.init_candidates=4",
       "search.init_tokens=256", "search.stages=[{survivors:2,tokens:512},{survivors:1,tokens:1024}]"]
HEAD, NEURON, BLOCK = 2 * 16 * 64, 3 * 64, 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64  # per block: 36,992


@pytest.fixture(scope="module")
def windows(tiny):
    stream = load_tokens("wikitext2:validation", tiny.tokenizer)
    return calibration_windows(stream, tiny.tokenizer, 64, 8, seed=0, bos=False)


def database(tiny, tmp_path, method, solver, win=None, proto=None):
    units = structured_units(geometry(tiny.adapter), method)
    lv = structured_levels(units, method)
    propagation, reference = resolve_propagation("dense", "structured", lv.grid, None, None)
    spec = DatabaseSpec(kind="structured", model={"name": "tiny", "fingerprint": tiny.fingerprint},
                        calibration=proto.as_dict() if proto else {"kind": "none"}, solver=asdict(solver),
                        propagation=propagation if win is not None else "none", reference=reference, grid=lv.grid,
                        dtype="float32", compute_dtype="float32",
                        extra={"group_size": {u.name: u.group_size for u in units}, "kv_groups": method.kv_groups})
    db = Database(tmp_path, spec)
    return db, lv, build_database(db, tiny.adapter, win, solver, batch=4)


def test_units_and_budget_rounding(tiny):
    units = structured_units(geometry(tiny.adapter), StructuredMethodCfg(target=0.3))
    assert [u.short for u in units[:2]] == ["o_proj", "down_proj"] and len(units) == 16
    assert {(u.group_size, u.step, u.top, u.step_params) for u in units} == {(16, 1, 4, HEAD), (1, 8, 16, 8 * NEURON)}
    assert sum(u.part_params for u in units) == 8 * BLOCK == sum(p.numel() for b in tiny.adapter.blocks
                                                                 for p in b.parameters())
    b = structured_budget(units, StructuredMethodCfg(target=0.3))
    # attention 0.3 x 98,816 = 14.47 heads -> 14; MLP 0.3 x 197,120 = 38.5 steps of 1,536 -> 39 (halves up)
    assert b.steps == (14, 39) and b.params == 14 * HEAD + 39 * 8 * NEURON == 88_576
    assert structured_budget(units, StructuredMethodCfg(target=0.25)).steps == (12, 32)
    with pytest.raises(UserError, match=r"^method.target: 0.7 removes 69,632 attn parameters, more than the "
                                        r"removable heads hold \(65,536, 0.663 of the attn parameters\)"):
        structured_budget(units, StructuredMethodCfg(target=0.7))


@pytest.mark.parametrize("budget", ["group", "params"])
@pytest.mark.parametrize("target", [0.1, 0.3, 0.45, 0.6])
def test_every_state_removes_exactly_the_budget(tiny, target, budget):
    method = StructuredMethodCfg(target=target, budget=budget)
    units = structured_units(geometry(tiny.adapter), method)
    b, lv = structured_budget(units, method), structured_levels(units, method)
    step = np.array([u.step_params for u in units])
    rng = np.random.default_rng(0)
    state, states, attn = lv.space.uniform_state(), [], set()
    for _ in range(200):
        child = lv.space.mutate(state, rng)
        if lv.space.feasible(child):
            state = child
            states.append(state)
            attn.add(int((state * step)[lv.space.part == 0].sum()))
    states += lv.space.random_states(rng, 20)
    assert all(lv.space.feasible(s) and int((s * step).sum()) == b.params for s in states)
    if budget == "group":  # attention and MLP each hold their own share
        assert attn == {b.steps[0] * HEAD}
    else:  # pooled: trades of 3 heads (6,144 parameters) for 4 MLP steps of 8 neurons, and back
        assert len(attn) > 1 and all((a - b.steps[0] * HEAD) % 6144 == 0 for a in attn)


def test_measured_parameters_equal_the_budget(tiny, tmp_path):
    method = StructuredMethodCfg(target=0.4, budget="params")
    db, lv, _ = database(tiny, tmp_path, method, MagnitudeCfg())
    budget = structured_budget(structured_units(geometry(tiny.adapter), method), method).params
    applier, rng = LevelApplier(tiny.adapter, db), np.random.default_rng(1)
    geoms = geometry(tiny.adapter)
    try:
        for state in [lv.space.uniform_state(), *lv.space.random_states(rng, 5)]:
            applier.apply(lv.layers_of(state))
            a = measure_structured(tiny.adapter)
            assert a["unit_params"] == budget
            removed = removed_params(geoms, kept_state(tiny.adapter, geoms))
            assert a["removed_params"] == removed >= budget  # + K/V heads whose last query head went
            freed_kv = sum(2 - k for k in a["kv_heads_kept"])
            assert removed - budget == freed_kv * 2 * 16 * 64 + 64 * sum(h == 0 for h in a["heads_kept"]) \
                + 64 * sum(n == 0 for n in a["neurons_kept"])
    finally:
        applier.restore()
    assert measure_structured(tiny.adapter)["removed_params"] == 0


def test_spread_is_as_even_as_the_caps_allow():
    assert spread(14, np.full(8, 4)).tolist() == [2, 1, 2, 2, 2, 1, 2, 2]
    assert spread(5, np.array([1, 4, 4])).tolist() == [1, 2, 2]
    assert spread(0, np.full(3, 2)).tolist() == [0, 0, 0]


def test_database_stores_kept_columns_and_round_trips(tiny, windows, tmp_path):
    win, proto = windows
    method = StructuredMethodCfg(target=0.3)
    db, lv, stats = database(tiny, tmp_path, method, ZipLMCfg(), win, proto)
    assert stats["built"] == 16
    name = tiny.adapter.linears(3)[3].name  # block 3's o_proj
    w = tiny.adapter.module(name).weight.data
    for i, heads in enumerate(db.spec.grid[name]):
        level = db.structured(name, i)
        assert level.removed == heads and level.weight.shape == (64, (4 - heads) * 16)  # kept columns only
        assert torch.equal(db.weight(name, i), level.dense(64))
    assert torch.equal(db.weight(name, 0), w)  # nothing removed: the layer as it was
    kept = [set(db.structured(name, i).kept.tolist()) for i in range(5)]
    assert all(a >= b for a, b in zip(kept, kept[1:]))  # ZipLM's levels are nested
    # encode / decode give back the solver's own output (heads of 16 columns, every head removed included)
    torch.manual_seed(0)
    solver = ZipLM(torch.randn(32, 64), group_size=16)
    solver.add_batch(torch.randn(256, 64))
    for lvl in solver.compress([0, 1, 3, 4]):
        enc = encode_structured(lvl, torch.float32)
        assert enc["kept"].dtype == torch.int32 and enc["values"].shape == (32, 64 - 16 * lvl.removed)
        assert torch.equal(decode_structured(enc["kept"], enc["values"], (32, 64), 16), lvl.dense(64))
    # resumable per layer: a removed layer file is built again, and equals the first build
    before = [db.weight(name, i) for i in range(5)]
    db.layer_file(name).unlink()
    again = Database(tmp_path, db.spec)
    assert build_database(again, tiny.adapter, win, ZipLMCfg(), batch=4)["built"] == 1
    assert all(torch.equal(again.weight(name, i), old) for i, old in enumerate(before))


def run(tmp_path, *args):
    out = run_cli(*SMALL, "method=structured", *args, f"hydra.run.dir={tmp_path}/run",
                  env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    return read_json(tmp_path / "run" / "result.json"), out.stdout


@pytest.mark.parametrize("budget", ["group", "params"])
def test_evopress_and_every_baseline_remove_the_same_parameters(tmp_path, budget):
    result, stdout = run(tmp_path, *EVO, "method.target=0.3", f"method.budget={budget}",
                         "search.references=[uniform,random,dp]", "search.reference_settings={random:{candidates:4}}")
    models = result["models"]
    assert set(models) == {"dense", "evopress", "uniform", "random", "dp"}
    spent = {name: m["achieved"]["unit_params"] for name, m in models.items() if name != "dense"}
    assert set(spent.values()) == {88_576} and models["evopress"]["achieved"]["budget_params"] == 88_576
    assert all(m["achieved"]["removed_params"] >= 88_576 and m["fitness"] > 0 for n, m in models.items()
               if n != "dense")
    assert "found by evopress: " in stdout and "of the decoder blocks' parameters removed" in stdout
    assert (tmp_path / "run" / "figures" / "kept_heads_neurons.png").stat().st_size > 10_000
    alloc = read_json(tmp_path / "run" / "allocation.json")
    assert set(alloc["per_block"]["0"]) == {"o_proj", "down_proj"} and len(alloc["levels"]) == 16
    if budget == "group":
        assert {sum(m["achieved"]["heads_kept"]) for n, m in models.items() if n != "dense"} == {32 - 14}


def masked_logits(tmp_path, tiny, x):
    """The tiny model with the run's allocation put in from its database (as the search applied it)."""
    result = read_json(tmp_path / "run" / "result.json")
    alloc = read_json(tmp_path / "run" / "allocation.json")
    manifest = json.loads((tmp_path / "run" / "model" / "allocation.json").read_text())
    assert manifest["levels"] == alloc["levels"]
    path = Path(result["database"]["path"])
    db = Database(path.parent, DatabaseSpec(**read_json(path / "manifest.json")["spec"]),
                  label=path.name.rsplit("-", 1)[0])
    applier = LevelApplier(tiny.adapter, db)
    applier.apply({n: db.spec.grid[n].index(v) for n, v in alloc["levels"].items()})
    try:
        with torch.no_grad():
            return tiny.model(x).logits
    finally:
        applier.restore()


@pytest.mark.parametrize("args", [["solver=wanda_sp", "method.target=0.3"],
                                  ["solver=magnitude", "method.kv_groups=true", "method.target=0.45"]])
def test_export_is_a_smaller_checkpoint_with_the_masked_logits(tmp_path, tiny, args):
    from evoexp.models.shrink import load_shrunk

    result, stdout = run(tmp_path, "search=uniform", "export=auto", *args)
    out = tmp_path / "run" / "model"
    assert "trust_remote_code=True) loads it" in stdout
    shrunk = load_shrunk(out, dtype=torch.float32)
    achieved = result["models"]["uniform"]["achieved"]
    assert sum(p.numel() for p in shrunk.parameters()) == achieved["params"] < tiny.num_params
    x = torch.randint(3, 259, (2, 24))
    with torch.no_grad():
        got = shrunk(x).logits
    assert (got - masked_logits(tmp_path, tiny, x)).abs().max().item() < 1e-5
    if "method.kv_groups=true" in args:  # whole KV groups: a block keeps 0, 2 or 4 query heads
        assert set(achieved["heads_kept"]) <= {0, 2, 4} and achieved["unit_params"] == achieved["budget_params"]


def test_without_gqa_a_head_step_counts_its_kv_head():
    """One query head per K/V head (MHA, like Llama-2): a removed head always takes its K/V head along, so its step
    counts q, k, v rows and o_proj columns, and the measured removal equals the budget exactly."""
    from evoexp.models.adapter import DecoderAdapter
    from tests.test_structured_models import tiny as random_decoder

    adapter = DecoderAdapter(random_decoder(heads=4, kv=4, layers=2))
    method = StructuredMethodCfg(target=0.5, mlp_step=8)
    units = structured_units(geometry(adapter), method)
    g = geometry(adapter)[0]
    assert units[0].step_params == g.head_params + g.kv_head_params == 4 * 8 * 32
    budget = structured_budget(units, method)
    assert budget.steps == (4, 5)  # half of 2 x 4 heads; 0.5 x 2 x 3,840 MLP parameters in steps of 8 x 96
    with torch.no_grad():  # heads 0, 2 of block 0 and 1, 3 of block 1; 24 + 16 neurons
        for block, heads, neurons in ((0, (0, 2), range(0, 24)), (1, (1, 3), range(10, 26))):
            b = adapter.blocks[block]
            for h in heads:
                b.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            b.mlp.down_proj.weight[:, list(neurons)] = 0
    a = measure_structured(adapter)
    assert a["unit_params"] == budget.params == a["removed_params"] == 4 * 1024 + 5 * 8 * 96
