"""FISTAPruner's solver on random problems: monotone FISTA, the known LASSO solution, exact masks, the guard."""
import math

import pytest
import torch

from evoexp.solvers.fista import (FistaSettings, LassoProblem, PairedGram, fista, nm_mask, prune, soft_threshold,
                                  topk_mask)


def problem(d_out=24, d_in=32, n=256, drift=0.3, seed=0) -> LassoProblem:
    """X: correlated inputs with a few outlier channels; X*: X plus the drift a pruned path adds."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, d_in, generator=g) @ torch.randn(d_in, n, generator=g) / math.sqrt(d_in)
    X[:3] *= 8
    Xs = X + drift * torch.randn(d_in, n, generator=g)
    W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    return gram_of(X, Xs).problem(W)


def gram_of(X, Xs) -> PairedGram:
    gram = PairedGram(X.shape[0])
    for i in range(0, X.shape[1], 100):  # in batches, as calibration arrives
        gram.add_batch(X[:, i: i + 100].T, None if Xs is None else Xs[:, i: i + 100].T)
    return gram


def exact_loss(p, X, Xs, V):
    return float(0.5 * ((V @ Xs - p.W @ X) ** 2).sum() / X.shape[1])


@pytest.mark.parametrize("paired", [True, False])
def test_gram_loss_equals_the_token_loss(paired):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 256, generator=g)
    Xs = X + 0.1 * torch.randn(8, 256, generator=g) if paired else None
    W = torch.randn(4, 8, generator=g)
    p = gram_of(X, Xs).problem(W)
    Xs = X if Xs is None else Xs
    for V in (torch.randn(4, 8, generator=g), W * topk_mask(W, 0.5), W + 1e-4 * torch.randn(4, 8, generator=g)):
        assert p.loss(V) == pytest.approx(exact_loss(p, X, Xs, V), rel=1e-3, abs=1e-9)
    assert p.scale == pytest.approx(0.5 * float(((W @ X) ** 2).sum()) / 256, rel=1e-5)


def test_tiny_relative_errors_are_resolved():
    """A weight change of 1e-4 against outputs of order 1: the stable form still gives the right error."""
    g = torch.Generator().manual_seed(5)
    X = 30 * torch.randn(16, 512, generator=g)
    W = torch.randn(8, 16, generator=g)
    V = W + 1e-4 * torch.randn(8, 16, generator=g)
    p = gram_of(X, None).problem(W)
    assert p.loss(V) == pytest.approx(exact_loss(p, X, X, V), rel=1e-2)


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 1e-1])
def test_fista_objective_never_increases(lam):
    p = problem()
    _, history = fista(p, torch.zeros_like(p.W), lam * p.lam_max(), iters=300)
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < history[0]


def test_fista_on_an_orthogonal_design_gives_the_soft_threshold():
    W = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    c = 2.5
    p = LassoProblem(W, c * torch.eye(6), torch.zeros(6, 6), 0.0, 0.5 * c * float((W ** 2).sum()))
    V, _ = fista(p, torch.randn(5, 6), 0.7, iters=50)
    torch.testing.assert_close(V, soft_threshold(W, 0.7 / c), atol=1e-6, rtol=0)


def coordinate_descent(p: LassoProblem, lam: float, sweeps: int = 3000) -> torch.Tensor:
    """Cyclic coordinate descent in float64: the reference solution of a small LASSO."""
    G, WC = p.G.double(), p.WC.double()
    V = torch.zeros_like(WC)
    for _ in range(sweeps):
        for j in range(G.shape[0]):
            r = WC[:, j] - V @ G[:, j] + V[:, j] * G[j, j]
            V[:, j] = torch.sign(r) * (r.abs() - lam).clamp_min(0) / G[j, j]
    return V


def test_fista_converges_to_the_lasso_solution():
    p = problem(d_out=3, d_in=10, n=200, seed=3)
    lam = 0.05 * p.lam_max()
    ref = coordinate_descent(p, lam)
    V, _ = fista(p, torch.zeros_like(p.W), lam, iters=5000)
    assert (ref == 0).any() and (ref != 0).any()  # a problem where the ℓ1 term matters
    torch.testing.assert_close(V.double(), ref, atol=2e-4, rtol=0)
    assert torch.equal(V == 0, ref == 0)


def test_masks_are_exact():
    V = torch.randn(16, 32)
    keep = topk_mask(V, 0.6)
    assert int((~keep).sum()) == round(0.6 * V.numel())
    assert V[keep].abs().min() >= V[~keep].abs().max()
    keep = nm_mask(V, 2, 4)
    assert (keep.view(16, 8, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_prune_hits_the_target_and_never_loses_to_the_warm_start(nm):
    p = problem(seed=4)
    warm = p.W * (nm_mask(p.W, *nm) if nm else topk_mask(p.W, 0.5))  # a magnitude warm start
    V, info = prune(p, warm, 0.5, FistaSettings(iters=100, bisect_steps=5), nm)
    if nm:
        assert (((V != 0).view(24, 8, 4).sum(-1)) <= 2).all()
    else:
        assert int((V == 0).sum()) >= round(0.5 * V.numel())
        assert int((V != 0).sum()) <= V.numel() - round(0.5 * V.numel())
    assert info["loss"] == pytest.approx(p.loss(V), rel=1e-5)
    assert info["loss"] < 0.8 * info["warm_loss"]  # FISTA (with the dense target) clearly beats magnitude
    # a warm start that is already the best candidate is returned unchanged
    V2, info2 = prune(p, V, 0.5, FistaSettings(iters=0, bisect_steps=1, refit_iters=0), nm)
    assert info2["loss"] <= info["loss"] * (1 + 1e-6)


FAST = ["solver.iters=20", "solver.bisect_steps=2", "solver.refit_iters=10"]


def test_cli_uniform_fista_on_tiny(tmp_path):
    from evoexp.utils import read_json
    from tests.conftest import run_cli

    out = run_cli("model=tiny", "method=sparse", "search=uniform", "method.target=0.5", "solver=fista",
                  "eval.windows=2", "logger=none", "database.windows=8", *FAST, f"hydra.run.dir={tmp_path}/run",
                  env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    result = read_json(tmp_path / "run" / "result.json")
    assert result["models"]["uniform"]["achieved"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    gains = [g for layer in result["database"]["build"]["fista"].values() for g in layer["gain_over_warm_start"]]
    assert len(gains) == 56 and min(gains) >= 0  # never worse than the SparseGPT warm start, per layer


def test_cli_evopress_builds_its_database_with_fista(tmp_path):
    from evoexp.utils import read_json
    from tests.conftest import run_cli

    out = run_cli("model=tiny", "method=sparse", "method.target=0.6", "search=evopress", "solver=fista",
                  "search.generations=2", "search.offspring=4", "search.init_candidates=4",
                  "search.stages=[{survivors:1,tokens:512}]", "search.init_tokens=256", "fitness.report_tokens=1024",
                  "method.num_levels=2", "data.calib_windows=4",
                  "eval.windows=2", "logger=none", "database.windows=4", *FAST, f"hydra.run.dir={tmp_path}/run",
                  env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    result = read_json(tmp_path / "run" / "result.json")
    assert result["config"]["solver"]["kind"] == "fista" and result["search"]["generations"] == 2
    assert result["models"]["evopress"]["achieved"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_fista_refuses_compressed_propagation_in_one_line(tmp_path):
    from tests.conftest import run_cli

    out = run_cli("model=tiny", "method=sparse", "search=uniform", "solver=fista", "database.propagation=compressed",
                  "logger=none", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("evoexp: error: database.propagation: solver=fista")


@pytest.mark.parametrize("override, message", [
    ("solver.warm_start=obs", "solver.warm_start: expected one of sparsegpt, wanda, magnitude, got 'obs'"),
    ("solver.lam_min=0", "solver.lam_min / lam_max: expected 0 < lam_min < lam_max"),
    ("solver.ratio=1.5", "solver.ratio: expected a share between 0 and 1, got 1.5"),
])
def test_bad_fista_settings_fail_in_one_line(tmp_path, override, message):
    from tests.conftest import run_cli

    out = run_cli("model=tiny", "method=sparse", "search=uniform", "solver=fista", override, "logger=none",
                  f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"evoexp: error: {message}")
