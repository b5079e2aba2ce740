"""Bonsai (issue 35): antithetic sub-models, the Lasso / Kendall-tau regression, exact round budgets, resume,
the physically shrinking model on the tiny model, and the run from the command line."""
import numpy as np
import pytest
import torch

from evoexp.search.bonsai import (HEAD, NEURON, Bonsai, BonsaiSettings, Units, antithetic_pairs, candidates,
                                  fit_coefficients, kendall_tau, schedule)
from evoexp.utils import read_json
from tests.conftest import run_cli

@pytest.fixture(scope="module")
def windows_64(tiny):
    from evoexp.data import calibration_windows, load_tokens

    stream = load_tokens("wikitext2:validation", tiny.tokenizer)
    return calibration_windows(stream, tiny.tokenizer, 64, 4, seed=0, bos=False)[0]


SMALL = ["model=tiny", "logger=none", "eval.windows=2", "method=structured", "method.target=0.3", "search=bonsai",
         "search.sub_models=10", "search.folds=2", "search.samples=4", "search.seq_len=64"]


def synthetic_units(modules=6, per=10) -> Units:
    """`modules` modules of `per` units; even modules hold heads, odd ones neurons."""
    module = np.repeat(np.arange(modules), per)
    ids = [(int(m) // 2, int(m) % 2, int(i)) for m, i in zip(module, np.tile(np.arange(per), modules))]
    return Units(module % 2, module, ids)


class Planted:
    """A model whose perplexity is 10 + the summed importance of the units it lacks (+ noise): Bonsai should
    remove the least important ones."""

    def __init__(self, units: Units, importance: np.ndarray, noise=0.0):
        self.all, self.importance, self.noise = units, importance, noise
        self.gone: set = set()
        self.scored = 0

    def units(self) -> Units:
        keep = [i for i, u in enumerate(self.all.ids) if u not in self.gone]
        return Units(self.all.part[keep], self.all.module[keep], [self.all.ids[i] for i in keep])

    def _imp(self) -> np.ndarray:
        return np.array([self.importance[self.all.ids.index(u)] for u in self.units().ids])

    def prior(self, round_index: int) -> np.ndarray:  # a noisy prior, the same in a resumed run
        return self._imp() + np.random.default_rng(round_index).normal(0, 0.5, len(self.units()))

    def perplexity(self, dropped: np.ndarray) -> float:
        self.scored += 1
        noise = np.random.default_rng(hash(tuple(np.flatnonzero(dropped).tolist())) % 2**32).normal(0, self.noise)
        return 10 + float(self._imp()[dropped].sum()) + noise

    def remove(self, ids) -> None:
        self.gone |= {tuple(u) for u in ids}


def test_antithetic_pairs_are_complements_inside_the_candidates():
    units = synthetic_units()
    prior = np.random.default_rng(0).random(len(units))
    cand, drops = candidates(units, prior, 0.1)
    assert all(cand[units.module == m].sum() == 3 for m in range(6))  # 2p·10 = 2, and one more than 1 + 1 drops
    for m in range(6):  # the candidates are each module's lowest priors
        idx = np.flatnonzero(units.module == m)
        assert set(idx[cand[idx]]) == set(idx[np.argsort(prior[idx])[:3]])
    masks = antithetic_pairs(units, prior, cand, drops, 20, np.random.default_rng(1))
    assert masks.shape == (40, 60)
    for a, b in zip(masks[::2], masks[1::2]):
        assert not (a & b).any() and np.array_equal(a | b, cand)  # complements inside the candidate set
    per_module = np.array([[a[units.module == m].sum() for m in drops] for a in masks[::2]])
    assert per_module.mean(0) == pytest.approx([drops[m] for m in drops], abs=0.35)  # drops on average
    assert len(np.unique(per_module)) > 1  # but not always the same number
    assert not masks[:, ~cand].any()  # fixed units are never dropped


def test_the_regression_recovers_planted_coefficients():
    rng = np.random.default_rng(0)
    units = synthetic_units(modules=8, per=10)
    prior = rng.random(len(units))
    cand, drops = candidates(units, prior, 0.2)
    masks = antithetic_pairs(units, prior, cand, drops, 100, rng)
    cols = np.flatnonzero(cand)
    beta = rng.exponential(1.0, len(cols))
    kept = ~masks[:, cols]
    y = -(10 + (~kept * beta).sum(1)) + rng.normal(0, 0.05, len(kept))  # -PPL
    fit, info = fit_coefficients(kept, y, (0.3, 0.1, 0.03, 0.01, 0.003), 5, 0)
    assert kendall_tau(fit, beta) > 0.9
    assert max(info["tau"].values()) > 0.9


def test_round_budgets_are_exact():
    plan = schedule((270, 46080), (135, 23040), 0.05)
    assert len(plan) == 10 and sum(h for h, _ in plan) == 135 and sum(n for _, n in plan) == 23040
    assert all(h in (13, 14) and n == 2304 for h, n in plan)
    plan = schedule((32, 1024), (14, 312), 0.05)  # the last round clipped
    assert sum(h for h, _ in plan) == 14 and sum(n for _, n in plan) == 312
    assert max(h for h, _ in plan) <= 2 and max(n for _, n in plan) <= 52
    assert schedule((32, 1024), (0, 0), 0.05) == []


@pytest.mark.parametrize("perturb", [True, False])
def test_bonsai_removes_the_least_important_units_and_resumes_exactly(perturb, tmp_path):
    units = synthetic_units(modules=8, per=20)
    importance = np.random.default_rng(3).exponential(1.0, len(units))
    s = BonsaiSettings(prune_frac=0.1, sub_models=60, folds=3, perturb=perturb, seed=1)
    removed = (32, 32)  # 40 % of the 80 heads and the 80 neurons

    def run(out, cap=None, kill_at=None):
        model = Planted(units, importance, noise=0.01)
        if kill_at is not None:
            real = model.perplexity

            def perplexity(dropped):
                if model.scored == kill_at:
                    raise KeyboardInterrupt
                return real(dropped)
            model.perplexity = perplexity
        engine = Bonsai(BonsaiSettings(**{**s.__dict__, "rounds_cap": cap}), model, (80, 80), removed, out,
                        {"model": "planted"})
        return engine.run(), model

    rounds, model = run(tmp_path / "a")
    assert [(r["heads"], r["neurons"]) for r in rounds] == [(8, 8)] * 4
    gone = [u for r in rounds for u in map(tuple, r["removed"])]
    assert sum(u[1] == HEAD for u in gone) == 32 and sum(u[1] == NEURON for u in gone) == 32
    cost = sum(importance[units.ids.index(u)] for u in gone)
    best = sum(np.sort(importance[units.part == part])[:32].sum() for part in (HEAD, NEURON))
    assert cost < best + 0.25 * (64 * importance.mean() - best)  # much nearer the best cut than a random one
    if not perturb:
        return
    with pytest.raises(KeyboardInterrupt):  # killed inside round 2
        run(tmp_path / "b", kill_at=60 + 25)
    resumed, model_b = run(tmp_path / "b")
    assert [r["removed"] for r in resumed] == [r["removed"] for r in rounds]
    assert model_b.scored == 4 * 60 - 60 - 25  # round 1 and the first 25 of round 2 were kept
    capped, _ = run(tmp_path / "c", cap=2)
    assert len(capped) == 2
    uncapped, model_c = run(tmp_path / "c")  # lifting the cap continues the same run
    assert [r["removed"] for r in uncapped] == [r["removed"] for r in rounds] and model_c.scored == 2 * 60


def test_each_round_shrinks_the_model_and_matches_the_masked_one(tiny, windows_64):
    from evoexp.models.heads import geometry
    from evoexp.recipes.bonsai import ShrunkPruning, StateApplier

    pruning = ShrunkPruning(tiny.model, windows_64, "wanda_sp", batch=2, seed=0)
    applier = StateApplier(tiny.adapter)
    sizes = [sum(p.numel() for p in pruning.current.parameters())]
    rng = np.random.default_rng(0)
    try:
        for _ in range(2):
            units = pruning.units()
            prior = pruning.prior(0)
            assert prior.shape == (len(units),)
            drop = rng.choice(len(units), 40, replace=False)
            dropped = np.zeros(len(units), dtype=bool)
            dropped[drop] = True
            masked_ppl = pruning.perplexity(dropped)
            pruning.remove([units.ids[i] for i in drop])
            sizes.append(sum(p.numel() for p in pruning.current.parameters()))
            assert pruning.perplexity(np.zeros(len(pruning.units()), dtype=bool)) == pytest.approx(masked_ppl,
                                                                                                    rel=1e-5)
            applier.apply(pruning.state)  # the dense model with the removed columns zeroed
            x = windows_64[:2]
            with torch.no_grad():
                want = tiny.model(input_ids=x).logits
                got = pruning.current(input_ids=x).logits
            assert (got - want).abs().max().item() < 1e-4
            applier.restore()
        assert sizes[0] > sizes[1] > sizes[2]
        g = geometry(tiny.adapter)
        assert sum(len(b.heads) for b in pruning.state.blocks) <= sum(x.num_q_heads for x in g)
    finally:
        applier.restore()


def test_a_run_computes_no_gradient(tiny, windows_64, tmp_path):
    from evoexp.recipes.bonsai import ShrunkPruning

    seen = []
    for p in tiny.model.parameters():  # the session's tiny model is shared: start from no gradient at all
        p.grad = None
    pruning = ShrunkPruning(tiny.model, windows_64, "wanda_sp", batch=2, seed=0)
    original = pruning._build

    def build():
        original()
        pruning.current.model.layers[0].register_forward_hook(
            lambda *_: seen.append(torch.is_grad_enabled() or not torch.is_inference_mode_enabled()))
    pruning._build = build
    build()
    Bonsai(BonsaiSettings(sub_models=6, folds=2, seed=0), pruning, (32, 1024), (4, 104), tmp_path, {}).run()
    assert seen and not any(seen)
    assert all(p.grad is None for p in tiny.model.parameters())
    assert all(not p.requires_grad for p in pruning.current.parameters())


def test_the_command_line_run_is_exact_and_exports_its_shrunk_model(tmp_path):
    env = {"EVOEXP_CACHE": str(tmp_path / "cache"), "EVOEXP_OUT": str(tmp_path / "runs")}
    run = tmp_path / "run"
    out = run_cli(*SMALL, "export=auto", f"hydra.run.dir={run}", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = read_json(run / "result.json")
    a = result["models"]["bonsai"]["achieved"]
    assert result["search"]["rounds"] == 9 and a["unit_params"] == result["allocation"]["achieved"]["budget_params"]
    assert a["unit_params"] == 14 * 2 * 16 * 64 + 312 * 3 * 64  # 14 heads and 39 steps of 8 neurons, as ZipLM's
    back = run_cli(f"model={run / 'model'}", "model.seq_len=256", "method=dense", "search=none", "eval.windows=2",
                   "logger=none", env=env)
    assert back.returncode == 0, back.stderr[-3000:]
    exported = read_json(next((tmp_path / "runs").rglob("result.json")))["metrics"]["ppl"]["wikitext2:test"]
    ppl = result["models"]["bonsai"]["ppl"]["wikitext2:test"]["float32"]["ppl"]
    assert exported["float32"]["ppl"] == pytest.approx(ppl, rel=1e-4)
    # prior-only with post-training: the trained model keeps the same heads and neurons
    prior = run_cli(*SMALL, "search=bonsai_random_cpu", "train=finetune", "train.tokens=1024",
                    f"hydra.run.dir={tmp_path / 'prior'}", env=env)
    assert prior.returncode == 0, prior.stderr[-3000:]
    result = read_json(tmp_path / "prior" / "result.json")
    models = result["models"]
    assert result["found"] == "prior_random" and result["search"]["sub_models"] == 0  # nothing scored
    assert models["prior_random_trained"]["achieved"] == models["prior_random"]["achieved"]
    assert models["prior_random"]["achieved"]["unit_params"] == a["unit_params"]


def test_a_run_killed_inside_a_round_resumes_to_the_uninterrupted_result(tmp_path):
    import signal

    from tests.conftest import start_search

    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    args = [*SMALL, "search.rounds_cap=3", "dtype=float32"]
    clean = run_cli(*args, f"hydra.run.dir={tmp_path / 'clean'}", env=env)
    assert clean.returncode == 0, clean.stderr[-3000:]
    run = tmp_path / "run"
    proc = start_search([*args, f"hydra.run.dir={run}"], run, env, generations=4,
                        watch="bonsai/round_1_scores.jsonl")  # 4 sub-models of round 2 scored
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(read_json(run / "bonsai" / "rounds.json")["rounds"]) == 1 and not (run / "result.json").exists()
    resumed = run_cli(*args, f"hydra.run.dir={run}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "bonsai: resuming after round 1" in resumed.stderr + resumed.stdout
    a, b = (read_json(d / "result.json") for d in (tmp_path / "clean", run))
    assert a["allocation"]["state"] == b["allocation"]["state"]
    assert a["models"]["bonsai"]["ppl"]["wikitext2:test"]["float32"]["ppl"] == \
        b["models"]["bonsai"]["ppl"]["wikitext2:test"]["float32"]["ppl"]
