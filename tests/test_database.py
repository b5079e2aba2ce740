"""The per-level database: compact encodings, hash keys, resumable builds, uniform one-shot runs from the CLI."""
import os
import json
from dataclasses import replace

import pytest
import torch

from .conftest import run_cli
from evoexp.config import GPTQCfg, RTNCfg, SparseGPTCfg, WandaCfg
from evoexp.data import calibration_windows, load_tokens
from evoexp.database import Database, DatabaseSpec, LevelApplier, build_database, decode_sparse, encode_sparse
from evoexp.errors import UserError
from evoexp.database.provision import resolve_propagation
from evoexp.utils import read_json

SPARSE_LEVELS = [0.3, 0.5, 0.7]
BITS = [2, 3, 4]


@pytest.fixture(scope="module")
def windows(tiny):
    stream = load_tokens("wikitext2:validation", tiny.tokenizer)
    return calibration_windows(stream, tiny.tokenizer, 64, 8, seed=0, bos=False)


def spec_for(tiny, proto, kind, levels, propagation, solver, ref_value=None):
    grid = {li.name: list(levels) for li in tiny.adapter.linears()}
    prop, reference = resolve_propagation(propagation, kind, grid, ref_value, ref_value)
    from dataclasses import asdict

    return DatabaseSpec(kind=kind, model={"name": "tiny", "fingerprint": tiny.fingerprint},
                        calibration=proto.as_dict(), solver=asdict(solver), propagation=prop, reference=reference,
                        grid=grid, dtype="float32", compute_dtype="float32")


def tensors(db):
    return {name: [db.weight(name, i) for i in range(len(levels))] for name, levels in db.spec.grid.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_encoding_round_trips_and_is_compact(dtype):
    torch.manual_seed(0)
    w = torch.randn(48, 80).to(dtype)
    w[torch.rand_like(w, dtype=torch.float32) < 0.6] = 0
    enc = encode_sparse(w, dtype)
    assert torch.equal(decode_sparse(enc["mask"], enc["values"], tuple(w.shape)), w)
    stored = enc["mask"].numel() + enc["values"].numel() * enc["values"].element_size()
    assert stored < 0.6 * w.numel() * w.element_size()  # mask bits + 40% of the values


def test_build_stores_every_level_exactly(tiny, windows, tmp_path):
    win, proto = windows
    db = Database(tmp_path, spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg()))
    stats = build_database(db, tiny.adapter, win, SparseGPTCfg(), batch=4)
    assert stats["built"] == 56 and not db.complete
    db.mark_complete({"build": stats})
    for name in db.spec.grid:
        n = tiny.adapter.module(name).weight.numel()
        for i, s in enumerate(SPARSE_LEVELS):
            assert int((db.weight(name, i) == 0).sum()) == round(s * n), (name, s)
    # the same spec reopens the same files; anything else is a different database
    again = Database(tmp_path, spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg()))
    assert again.path == db.path and again.complete and build_database(again, tiny.adapter, win, SparseGPTCfg())[
        "built"] == 0
    for changed in (spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg(damp=0.02)),
                    spec_for(tiny, proto, "sparse", [0.3, 0.5], "dense", SparseGPTCfg()),
                    spec_for(tiny, replace(proto, seed=1), "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg())):
        other = Database(tmp_path, changed)
        assert other.path != db.path and not other.has(next(iter(changed.grid)))


def test_manifest_of_a_different_spec_is_refused(tiny, windows, tmp_path):
    _, proto = windows
    spec = spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg())
    db = Database(tmp_path, spec)
    manifest = read_json(db.manifest)
    manifest["spec"]["solver"]["damp"] = 0.5
    db.manifest.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different spec"):
        Database(tmp_path, spec)


class Killed(Exception):
    pass


@pytest.mark.parametrize("kind,levels,propagation,solver,ref", [
    ("sparse", SPARSE_LEVELS, "compressed", SparseGPTCfg(), 0.5),
    ("quant", BITS, "reference", GPTQCfg(group_size=32), 3),
    ("sparse", SPARSE_LEVELS, "dense", WandaCfg(), None),
])
def test_killed_build_resumes_per_layer_and_equals_an_uninterrupted_one(tiny, windows, tmp_path, monkeypatch,
                                                                        kind, levels, propagation, solver, ref):
    win, proto = windows
    spec = spec_for(tiny, proto, kind, levels, propagation, solver, ref)
    fresh = Database(tmp_path / "fresh", spec)
    build_database(fresh, tiny.adapter, win, solver, batch=4)

    db = Database(tmp_path / "killed", spec)
    saved = []
    original = Database.save_layer

    def dying(self, name, shape, results, extra=None):
        if len(saved) == 23:  # in the middle of block 3
            raise Killed
        saved.append(name)
        original(self, name, shape, results, extra)

    monkeypatch.setattr(Database, "save_layer", dying)
    with pytest.raises(Killed):
        build_database(db, tiny.adapter, win, solver, batch=4)
    monkeypatch.setattr(Database, "save_layer", original)
    assert sum(db.has(n) for n in spec.grid) == 23
    stats = build_database(Database(tmp_path / "killed", spec), tiny.adapter, win, solver, batch=4)
    assert stats["reused"] == 23 and stats["built"] == 56 - 23
    a, b = tensors(fresh), tensors(db)
    for name in spec.grid:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name
        assert torch.equal(fresh.errors(name), db.errors(name))


def test_stored_errors_are_the_relative_output_error_of_each_level(tiny, windows, tmp_path):
    """errors[l] = <dW H dW^T> / <W H W^T> with H from the same calibration inputs: grows with sparsity."""
    win, proto = windows
    db = Database(tmp_path, spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg()))
    build_database(db, tiny.adapter, win, SparseGPTCfg(), batch=4)
    for name in db.spec.grid:
        err = db.errors(name)
        assert err.dtype == torch.float64 and len(err) == 3
        assert 0 < err[0] < err[1] < err[2] < 1, name
    name = "model.layers.0.self_attn.q_proj"
    x = torch.cat([tiny.adapter.model.model.embed_tokens(w) for w in win]).reshape(-1, 64)
    x = tiny.adapter.blocks[0].input_layernorm(x)
    W = tiny.adapter.module(name).weight
    for level in range(3):  # block 0's q_proj input is the normed embedding: recompute the error directly
        dW = W - db.weight(name, level)
        direct = ((x @ dW.T).square().sum() / (x @ W.T).square().sum()).item()
        assert db.errors(name)[level].item() == pytest.approx(direct, rel=1e-4)


def test_propagation_choices_change_later_blocks_only(tiny, windows, tmp_path):
    win, proto = windows
    built = {}
    for prop in ("dense", "compressed"):
        db = Database(tmp_path, spec_for(tiny, proto, "sparse", [0.5], prop, SparseGPTCfg(), 0.5))
        build_database(db, tiny.adapter, win, SparseGPTCfg(), batch=4)
        built[prop] = tensors(db)
    first, last = tiny.adapter.linears(0)[0].name, tiny.adapter.linears(7)[0].name
    assert torch.equal(built["dense"][first][0], built["compressed"][first][0])
    assert not torch.equal(built["dense"][last][0], built["compressed"][last][0])
    grid = {"a": [2, 3, 4]}
    assert resolve_propagation("auto", "quant", grid, 4, 3) == ("reference", {"a": 1})
    assert resolve_propagation("auto", "sparse", {"a": [0.5]}, 0.5, 3) == ("compressed", {"a": 0})
    with pytest.raises(UserError, match="reference_level"):
        resolve_propagation("reference", "quant", grid, 4, 8)
    # equal-parameter sparse levels hold the target only up to one weight's rounding
    levels = {"a": [0.5750024, 0.6000012, 0.625]}
    assert resolve_propagation("compressed", "sparse", levels, 0.6, 3) == ("compressed", {"a": 1})
    with pytest.raises(UserError, match="method.target: 0.61 is not a level"):
        resolve_propagation("compressed", "sparse", levels, 0.61, 3)


def test_quant_database_decodes_to_grid_values(tiny, windows, tmp_path):
    win, proto = windows
    db = Database(tmp_path, spec_for(tiny, proto, "quant", BITS, "reference", GPTQCfg(group_size=48), 3))
    build_database(db, tiny.adapter, win, GPTQCfg(group_size=48), batch=4)
    name = tiny.adapter.linears(2)[-1].name  # down_proj: 128 inputs = 2 groups of 48 + a partial one of 32
    for i, bits in enumerate(BITS):
        q = db.quantized(name, i)
        assert q.bits == bits and q.codes.dtype == torch.uint8 and q.codes.max() <= 2 ** bits - 1
        assert q.scales.shape[1] == 3 and (q.g_idx == 2).sum().item() == 32
        assert torch.equal(db.weight(name, i), q.dequantize())
    rtn = Database(tmp_path, spec_for(tiny, proto, "quant", BITS, "dense", RTNCfg(group_size=48)))
    assert build_database(rtn, tiny.adapter, None, RTNCfg(group_size=48))["built"] == 56  # no data needed


def test_level_applier_touches_only_changed_layers_and_restores(tiny, windows, tmp_path):
    win, proto = windows
    db = Database(tmp_path, spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg()))
    build_database(db, tiny.adapter, win, SparseGPTCfg(), batch=4)
    names = list(db.spec.grid)
    dense = {n: tiny.adapter.module(n).weight.data.clone() for n in names}
    applier = LevelApplier(tiny.adapter, db)
    applier.apply({n: 1 for n in names})
    assert torch.equal(tiny.adapter.module(names[5]).weight, db.weight(names[5], 1))
    before = tiny.adapter.module(names[0]).weight.data_ptr()
    applier.apply({names[0]: 1, names[1]: 2})
    assert tiny.adapter.module(names[0]).weight.data_ptr() == before  # unchanged level: not reloaded
    assert torch.equal(tiny.adapter.module(names[1]).weight, db.weight(names[1], 2))
    applier.restore()
    assert all(torch.equal(tiny.adapter.module(n).weight, dense[n]) for n in names)


def test_uniform_cli_runs_every_solver_and_reuses_its_database(tmp_path):
    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    common = ["model=tiny", "search=uniform", "eval.windows=2", "logger=none", "database.windows=16",
              f"hydra.run.dir={tmp_path}/run"]
    for method, target, solvers in (("sparse", 0.5, ("sparsegpt", "wanda", "magnitude")),
                                    ("quant", 4, ("gptq", "rtn"))):
        for solver in solvers:
            args = [*common, f"method={method}", f"method.target={target}", f"solver={solver}", "resume=false"]
            out = run_cli(*args, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            result = read_json(tmp_path / "run" / "result.json")
            achieved = result["allocation"]["achieved"]
            if method == "sparse":
                assert achieved["sparsity"] == pytest.approx(0.5, abs=1e-3)
            else:
                assert achieved["bits"] == 4
            assert result["database"]["build"]["built"] == 56 and not result["database"]["reused"]
            ppl = result["models"]["uniform"]["ppl"]["wikitext2:test"]["float32"]["ppl"]
            assert 100 < ppl < 1000
    again = run_cli(*common, "method=quant", "method.target=4", "solver=rtn", "resume=false", env=env)
    assert "database reused" in again.stdout + again.stderr
    assert read_json(tmp_path / "run" / "result.json")["database"]["reused"]
    assert len(list((tmp_path / "cache" / "databases").iterdir())) == 5


@pytest.mark.parametrize("args,message", [
    (["method=sparse", "solver=gptq"], "solver: 'gptq' does not apply to method=sparse"),
    (["method=sparse", "method.nm=[2,4]", "method.target=0.6"], "method.nm: 2:4 prunes exactly 0.5"),
    (["method=quant", "method.target=2.5"], "method.target: search=uniform needs a whole bit-width"),
    (["method=sparse", "search=shortgpt"], "search: 'shortgpt' does not apply to method=sparse"),
    (["method=quant", "search=owl"], "owl allocates sparsity"),
    (["method=sparse", "method.nm=[2,4]", "search=dp"], "only search=uniform applies"),
    (["method=sparse", "search=evopress", "search.references=[shortgpt]"], "search.references: 'shortgpt'"),
    (["method=sparse", "database.propagation=sideways"], "database.propagation"),
    (["method=quant", "method.target=3", "search=dp", "search.budget=some"], "search.budget: expected pooled"),
    (["method=quant", "method.target=3", "search=evopress", "search.references=[dp]",
      "+search.reference_settings={dp:{budget:x}}"], "search.reference_settings.dp.budget: expected pooled"),
])
def test_layerwise_config_mistakes_are_one_line_errors(tmp_path, args, message):
    extra = [] if any(a.startswith("search=") for a in args) else ["search=uniform"]
    out = run_cli("model=tiny", *extra, *args, "logger=none", "eval.windows=2", f"hydra.run.dir={tmp_path}",
                  env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 2 and message in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr


def test_level_cache_avoids_decoding_a_level_twice(tiny, windows, tmp_path):
    win, proto = windows
    db = Database(tmp_path, spec_for(tiny, proto, "sparse", SPARSE_LEVELS, "dense", SparseGPTCfg()))
    build_database(db, tiny.adapter, win, SparseGPTCfg(), batch=4)
    name = next(iter(db.spec.grid))
    cached = LevelApplier(tiny.adapter, db, cache_gb=0.01)
    for level in (0, 1, 0, 1, 2, 0):
        cached.apply({name: level})
        assert torch.equal(tiny.adapter.module(name).weight, db.weight(name, level))
    assert cached.loads == 3
    cached.restore()
    tight = LevelApplier(tiny.adapter, db, cache_gb=4096 * 4 / 2 ** 30)  # room for one 64x64 fp32 weight
    for level in (0, 1, 0):
        tight.apply({name: level})
    assert tight.loads == 3 and len(tight.cache) == 1
    tight.restore()


def test_sharded_build_equals_one_build(tmp_path):
    """Two shards fill one database (the last one goes on to evaluate); the result equals an unsharded build."""
    from evoexp.utils import read_json
    from tests.conftest import run_cli

    common = ["model=tiny", "method=sparse", "search=uniform", "method.target=0.5", "database.propagation=dense",
              "database.windows=4", "eval.windows=2", "logger=none"]
    env = {"EVOEXP_CACHE": str(tmp_path / "shared")}
    first = run_cli(*common, "database.shard=[0,2]", f"hydra.run.dir={tmp_path}/s0", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "database shard 0/2 built; 28 layers of other shards still missing" in first.stdout
    assert not (tmp_path / "s0" / "result.json").exists()
    second = run_cli(*common, "database.shard=[1,2]", f"hydra.run.dir={tmp_path}/s1", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    sharded = read_json(tmp_path / "s1" / "result.json")
    whole = run_cli(*common, f"hydra.run.dir={tmp_path}/w", env={"EVOEXP_CACHE": str(tmp_path / "own")})
    assert whole.returncode == 0, whole.stderr[-2000:]
    alone = read_json(tmp_path / "w" / "result.json")
    assert sharded["database"]["key"] == alone["database"]["key"]
    ppl = lambda r: r["models"]["uniform"]["ppl"]["wikitext2:test"]["float32"]["ppl"]  # noqa: E731
    assert ppl(sharded) == ppl(alone)
    bad = run_cli(*common, "database.propagation=compressed", "database.shard=[0,2]", f"hydra.run.dir={tmp_path}/b",
                  env=env)
    assert bad.returncode == 2 and "database.shard: blocks can be built apart only with dense" in bad.stderr


def test_parallel_jobs_build_a_shared_database_once(tmp_path):
    """Two jobs of a sweep started together on one cache: one builds the database, the other waits for it and
    reuses it (instead of building the same one beside it), and both evaluate the same model."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "EVOEXP_CACHE": str(tmp_path / "cache")}
    common = ["model=tiny", "method=sparse", "search=uniform", "method.target=0.5", "database.windows=32",
              "eval.windows=2", "logger=none"]
    procs = [subprocess.Popen([sys.executable, "-m", "evoexp", *common, f"hydra.run.dir={tmp_path}/r{i}"], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    results = [read_json(tmp_path / f"r{i}" / "result.json") for i in range(2)]
    assert sorted(r["database"]["reused"] for r in results) == [False, True]
    assert sum("database built" in log for log in logs) == 1 and sum("database reused" in log for log in logs) == 1
    ppl = [r["models"]["uniform"]["ppl"]["wikitext2:test"]["float32"]["ppl"] for r in results]
    assert ppl[0] == ppl[1]
