"""Depth pruning on the tiny model: level spaces, candidate evaluation, baselines and the CLI commands."""
import json
import shutil

import numpy as np
import pytest
import torch

from evoexp.config import DropMethodCfg
from evoexp.errors import UserError
from evoexp.fitness import Teacher, sample_minibatch
from evoexp.methods.depth import depth_space, score_baseline
from evoexp.search.evaluator import CandidateEvaluator

from .conftest import run_cli


def test_depth_spaces():
    ds = depth_space(DropMethodCfg(target=0.25), 30)
    assert ds.k == 7 and ds.space.size == 60 and ds.space.targets == [7, 7]
    assert ds.default_generations == int(7 * 23 / 1.5)
    cfg = ds.to_config(ds.space.random_state(np.random.default_rng(0)))
    assert sum(cfg.attn) == 7 and sum(cfg.mlp) == 7
    blocks = depth_space(DropMethodCfg(target=0.5, unit="block"), 8)
    assert blocks.space.size == 8 and blocks.k == 4
    cfg = blocks.to_config(blocks.space.random_state(np.random.default_rng(0)))
    assert cfg.attn == cfg.mlp and sum(cfg.attn) == 4
    pairs = depth_space(DropMethodCfg(target=0.5, unit="pair"), 8)
    assert pairs.space.names == ["pair.0-1", "pair.2-3", "pair.4-5", "pair.6-7"] and pairs.k == 2
    cfg = pairs.to_config(np.array([0, 1, 0, 1]))
    assert cfg.attn == [False, False, True, True, False, False, True, True]
    white = depth_space(DropMethodCfg(target=0.25, droppable=[1, 2, 5]), 8)
    for _ in range(20):
        st = white.space.mutate(white.space.random_state(np.random.default_rng(_)), np.random.default_rng(_))
        dropped = np.flatnonzero(st[:8]).tolist() + np.flatnonzero(st[8:]).tolist()
        assert set(dropped) <= {1, 2, 5}
    with pytest.raises(UserError, match="method.target"):
        depth_space(DropMethodCfg(target=0.01), 8)
    with pytest.raises(UserError, match="method.droppable"):
        depth_space(DropMethodCfg(droppable=[9]), 8)


@pytest.fixture(scope="module")
def rig(depth_rig):
    return depth_rig


def evaluator(rig, incremental=True, kind=None):
    tiny, runner, ds, applier, teacher = rig
    if kind:
        teacher = Teacher(tiny.adapter, teacher.windows, kind)
    return CandidateEvaluator(runner, teacher, lambda st: applier.apply(ds.to_config(st)), ds.space.unit_block,
                              max_batch=4, incremental=incremental)


def test_incremental_scoring_equals_full_forwards(rig):
    _, _, ds, _, _ = rig
    rng = np.random.default_rng(0)
    parent = ds.space.random_state(rng)
    kids = [ds.space.mutate(parent, rng) for _ in range(6)] + [parent]
    batch = sample_minibatch(12, 32, 200, rng)
    fast, naive = evaluator(rig), evaluator(rig, incremental=False)
    a = fast.score(kids, batch, parent=parent)
    b = naive.score(kids, batch, parent=parent)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert fast.block_passes < naive.block_passes


def test_one_off_scoring_resumes_from_the_run_dir(rig, tmp_path, caplog):
    """A killed best-of-N scoring keeps what it scored: the rerun scores only the rest, to the same numbers."""
    tiny, runner, ds, applier, teacher = rig
    rng = np.random.default_rng(5)
    states = ds.space.random_states(rng, 6)
    batch = sample_minibatch(12, 32, 200, rng)

    def ev(**context):
        return CandidateEvaluator(runner, teacher, lambda st: applier.apply(ds.to_config(st)), ds.space.unit_block,
                                  max_batch=4, scores_dir=tmp_path, context=context)

    first = ev(units=ds.space.names)
    fits = first.score(states, batch, desc="Best of N")
    log = tmp_path / "scores" / "best_of_n.jsonl"
    assert first.evaluations == 6 and len(log.read_text().splitlines()) == 6
    np.testing.assert_allclose(fits, evaluator(rig).score(states, batch), rtol=1e-6)

    lines = log.read_text().splitlines()  # a kill after three candidates, the fourth line half written
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    resumed = ev(units=ds.space.names)
    with caplog.at_level("INFO", logger="evoexp.search.evaluator"):
        assert resumed.score(states, batch, desc="Best of N") == fits and resumed.evaluations == 3
    assert "Best of N: 3 of 6 candidates were scored by an earlier run" in caplog.text
    again = ev(units=ds.space.names)
    assert again.score(states, batch, desc="Best of N") == fits and again.evaluations == 0

    other_batch = sample_minibatch(12, 32, 100, np.random.default_rng(6))
    assert ev(units=ds.space.names).score(states[:2], other_batch, desc="Best of N") != fits[:2]
    other_meaning = ev(units=["something", "else"])  # a state that means other units is not the same candidate
    other_meaning.score(states[:2], batch, desc="Best of N")
    assert other_meaning.evaluations == 2
    plain = evaluator(rig)  # no scores_dir: nothing kept, nothing read
    plain.score(states, batch, desc="Best of N")
    assert plain.evaluations == 6


def test_dense_state_has_zero_kl_and_drops_hurt(rig):
    _, _, ds, _, _ = rig
    batch = sample_minibatch(12, 32, 128, np.random.default_rng(1))
    dense = np.zeros(ds.space.size, dtype=np.int64)
    fits = evaluator(rig).score([dense, ds.space.random_state(np.random.default_rng(2))], batch)
    assert abs(fits[0]) < 1e-6 and fits[1] > 1e-4


def test_shortgpt_drops_least_influential_blocks(rig):
    tiny, runner, ds, applier, teacher = rig
    batch = sample_minibatch(12, 32, 12 * 32, np.random.default_rng(0))
    state = score_baseline("shortgpt", ds, evaluator(rig, kind="ppl"), batch)
    cfg = ds.to_config(state)
    assert cfg.attn == cfg.mlp and sum(cfg.attn) == ds.k
    # Block Influence by hand, from hooks on the blocks of the dense model.
    applier.restore()
    io = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: io.__setitem__(i, (a[0], o[0] if isinstance(o, tuple) else o)))
             for i, blk in enumerate(tiny.adapter.blocks)]
    bi = np.zeros(tiny.adapter.num_blocks)
    with torch.no_grad():
        for idx, n in batch.items:
            tiny.model(teacher.windows[idx: idx + 1, :n])
            for i, (h_in, h_out) in io.items():
                bi[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().item()
    for h in hooks:
        h.remove()
    assert [i for i, d in enumerate(cfg.attn) if d] == sorted(np.argsort(bi)[: ds.k].tolist())


@pytest.mark.parametrize("kind", ["window_cosine", "subcloning", "shortened_llama"])
def test_other_baselines_drop_k_whole_blocks(rig, kind):
    _, _, ds, _, _ = rig
    batch = sample_minibatch(12, 32, 256, np.random.default_rng(0))
    cfg = ds.to_config(score_baseline(kind, ds, evaluator(rig, kind="ppl"), batch))
    dropped = [i for i, d in enumerate(cfg.attn) if d]
    assert cfg.attn == cfg.mlp and len(dropped) == ds.k
    if kind == "window_cosine":
        assert dropped == list(range(dropped[0], dropped[0] + ds.k))


@pytest.mark.parametrize("search", ["evopress", "shortgpt", "random"])
def test_cli_depth_commands(tmp_path, search):
    args = ["model=tiny", "method=drop", "method.target=0.25", f"search={search}", "logger=none"]
    if search == "evopress":
        args.append("search.generations=2")
    proc = run_cli(*args, env={"EVOEXP_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / "drop-tiny").iterdir())
    allocation = json.loads((run_dir / "allocation.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    assert len(allocation["attn_dropped"]) == 2 and len(allocation["mlp_dropped"]) == 2
    assert allocation["search"] == search
    models = result["models"]
    assert models["dense"]["fitness"] == pytest.approx(0.0, abs=1e-6)
    assert models[search]["fitness"] > 0 and "wikitext2:test" in models[search]["ppl"]
    if search == "evopress":
        assert "shortgpt" in models
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        assert [h["generation"] for h in history] == [1, 2]


def load_keep_runs():
    import importlib.util

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location("keep_runs", ROOT / "bench" / "keep_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    """SIGKILL a tiny search mid-run, keep its run dir elsewhere and bring it back, rerun the same command: same
    allocation and history as a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    args = ["model=tiny", "method=drop", "search=evopress_cpu", "search.generations=8", "eval.windows=1",
            "logger=none", "fitness.report_tokens=2048"]
    clean = run_cli(*args, env={"EVOEXP_OUT": str(tmp_path / "clean")})
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    env = {**os.environ, "EVOEXP_OUT": str(out)}
    proc = subprocess.Popen([sys.executable, "-m", "evoexp", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    history = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob("runs/*/*/history.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            history = found[0]
            break
        time.sleep(0.05)
    assert history is not None and proc.poll() is None, "the search ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (history.parent / "result.json").exists()
    # carried through bench/keep_runs.py and back into a fresh outputs tree, as between two sessions
    keep = load_keep_runs().keep
    assert keep(out, tmp_path / "kept", 2**20)["unfinished"] == 1
    shutil.rmtree(out)
    assert keep(tmp_path / "kept", out, 2**20)["unfinished"] == 1
    resumed = run_cli(*args, env={"EVOEXP_OUT": str(out)})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming search at generation" in resumed.stdout + resumed.stderr

    def outcome(root):
        run_dir = next(root.glob("runs/*/*"))
        hist = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        return (json.loads((run_dir / "allocation.json").read_text())["units"],
                [(h["generation"], h["parent_fitness"], h["parent"]) for h in hist])

    assert outcome(out) == outcome(tmp_path / "clean")


def test_resume_false_starts_a_search_over(tmp_path):
    """A run dir with an unfinished search of other settings: resuming is refused, resume=false starts over."""
    args = ["model=tiny", "method=drop", "search=evopress_cpu", "search.generations=2", "eval.windows=1",
            "logger=none", "fitness.report_tokens=1024", f"hydra.run.dir={tmp_path}/run"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "run" / "result.json").unlink()  # as if killed after the search
    assert len((tmp_path / "run" / "scores" / "search_start.jsonl").read_text().splitlines()) == 16
    refused = run_cli(*args, "data.calib_windows=64")  # a search on other data is not this one's to go on with
    assert refused.returncode != 0
    assert "holds an unfinished run with other settings (data.calib_windows=" in refused.stderr
    other = [*args, "search.offspring=4", "eval.windows=2"]  # evaluation settings alone would not stop it
    refused = run_cli(*other)
    assert refused.returncode != 0 and "search.offspring=" in refused.stderr and "eval.windows" not in refused.stderr
    again = run_cli(*other, "resume=false")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resume=false: removed" in (tmp_path / "run" / "evoexp.log").read_text()
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [(h["generation"], h["stages"][0]["candidates"]) for h in history] == [(1, 4), (2, 4)]


def test_a_run_killed_after_its_search_redoes_no_finished_work(tmp_path):
    """Killed among the final evaluations: the rerun takes the search, the references' scorings, the report
    fitnesses and the finished PPL figures from the run dir, and reports the same numbers."""
    # its own cache (the dense figure computed, not read from an earlier test's), and no figures shared between
    # runs: the rerun is to recompute what the kill lost
    args = ["model=tiny", "method=drop", "search=evopress_cpu", "search.generations=2", "eval.windows=2",
            "logger=none", "fitness.report_tokens=1024", "search.references=[shortgpt,shortened_llama]",
            "eval.cache_states=false", f"hydra.run.dir={tmp_path}/run"]
    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    before = json.loads((run / "result.json").read_text())
    (run / "result.json").unlink()
    kept = (run / "scores" / "eval_ppl.jsonl").read_text().splitlines()
    assert len(kept) == 4  # dense, found, shortgpt, shortened_llama
    (run / "scores" / "eval_ppl.jsonl").write_text("\n".join(kept[:3]) + "\n")  # killed during the fourth
    log_before = (run / "evoexp.log").read_text()
    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (run / "evoexp.log").read_text()[len(log_before):]
    assert "resuming search at generation 2" in log
    assert log.count("computed by an earlier run") == 2 and "report fitness: 4 of 4 candidates" in log
    assert log.count("over 2 windows") == 1 and "dense PPL" in log  # the lost one again; dense from its cache
    after = json.loads((run / "result.json").read_text())
    assert set(after["models"]) == {"dense", "evopress", "shortgpt", "shortened_llama"}
    dtype = before["config"]["dtype"]  # evopress_cpu's dtype=auto, stored resolved (bfloat16 where bf16 is native)
    assert dtype in ("float32", "bfloat16")
    for name, entry in before["models"].items():
        assert after["models"][name]["fitness"] == entry["fitness"]
        assert after["models"][name]["ppl"]["wikitext2:test"][dtype]["ppl"] == \
            entry["ppl"]["wikitext2:test"][dtype]["ppl"]


def test_brute_force_and_evopress_agree_on_pair_dropping(rig):
    """Like the paper's Figure 1 (pairs of blocks), on the tiny model: EvoPress reaches the brute-force optimum."""
    from evoexp.methods.depth import brute_force
    from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage

    tiny, runner, _, applier, teacher = rig
    ds = depth_space(DropMethodCfg(target=0.5, unit="pair"), tiny.adapter.num_blocks)
    ev = CandidateEvaluator(runner, teacher, lambda st: applier.apply(ds.to_config(st)), ds.space.unit_block)
    everything = sample_minibatch(12, 32, 12 * 32, np.random.default_rng(0))  # no sampling noise
    best, best_fit = brute_force(ds, ev, everything, max_states=100)
    assert ds.space.count_states() == 6
    settings = EvoPressSettings(generations=4, offspring=4, stages=[Stage(1, 12 * 32)], init_candidates=1,
                                init_tokens=12 * 32)
    res = EvoPress(settings, ds.space, ev, lambda tokens, rng: everything, seed=1).run()
    assert np.array_equal(res.state, best) and res.fitness == pytest.approx(best_fit)
    with pytest.raises(UserError, match="max_states"):
        brute_force(ds, ev, everything, max_states=5)


def test_progress_of_every_kind_is_checked_and_forgotten(tmp_path):
    """Bonsai's rounds and a post-training checkpoint are progress like a search's state: resume=false removes
    them, and other settings are refused while they are there; post-training settings do not void a search's."""
    from evoexp.errors import UserError
    from evoexp.run import check_progress, forget_progress

    config = {"search": {"offspring": 8}, "train": {"tokens": 1024}, "eval": {"windows": 2}}
    for progress in ("bonsai", "train", "scores"):
        run = tmp_path / progress
        (run / progress).mkdir(parents=True)
        check_progress(run, config)
        check_progress(run, {**config, "train": {"tokens": 2048}, "eval": {"windows": 4}})
        with pytest.raises(UserError, match="other settings"):
            check_progress(run, {**config, "search": {"offspring": 4}})
        forget_progress(run)
        assert not (run / progress).exists()
        check_progress(run, {**config, "search": {"offspring": 4}})
