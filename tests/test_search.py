"""The EvoPress engine on synthetic fitness functions: budgets, selection, optimality, resume."""
import numpy as np
import pytest

from evoexp.errors import UserError
from evoexp.fitness import Minibatch
from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage
from evoexp.search.space import LevelSpace


def drop_space(n=8, k=3, groups=2):
    """Depth-pruning shape: `groups` types of n binary units, k dropped per type."""
    names = [f"{t}{i}" for t in "am"[:groups] for i in range(n)]
    return LevelSpace(names, np.zeros(n * groups), np.ones(n * groups),
                      [np.arange(g * n, (g + 1) * n) for g in range(groups)], [k] * groups,
                      np.tile(np.arange(n), groups))


class FnEvaluator:
    """Scores states with a plain function; records every call so tests can inspect the selection."""

    def __init__(self, fn, noise=0.0):
        self.fn, self.noise, self.calls, self.evaluations = fn, noise, [], 0

    def score(self, states, batch, parent=None, desc=None):
        self.calls.append(([s.copy() for s in states], parent))
        self.evaluations += len(states)
        rng = np.random.default_rng(batch.items[0][0])  # noise depends on the minibatch only, like real data
        return [float(self.fn(s)) + self.noise * rng.standard_normal() for s in states]


def sampler(tokens, rng):
    return Minibatch([(int(rng.integers(1 << 30)), tokens)])


def settings(gens, offspring=8, stages=((2, 64), (1, 256)), init="random"):
    return EvoPressSettings(generations=gens, offspring=offspring, stages=[Stage(s, t) for s, t in stages],
                            init=init, init_candidates=8, init_tokens=64)


def test_switches_preserve_budget_exactly():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 12))
        lo = rng.integers(-3, 1, n)
        hi = lo + rng.integers(0, 5, n)
        cut = int(rng.integers(1, n)) if n > 2 else 1
        groups = [np.arange(cut), np.arange(cut, n)]
        targets = [int(rng.integers(lo[g].sum(), hi[g].sum() + 1)) for g in groups]
        space = LevelSpace([str(i) for i in range(n)], lo, hi, groups, targets, np.arange(n))
        state = space.random_state(rng)
        assert space.feasible(state)
        for _ in range(50):
            child = space.mutate(state, rng)
            assert space.feasible(child)
            assert [child[g].sum() for g in groups] == targets
            state = child


def test_switch_counts_follow_min_of_two_uniforms():
    space = drop_space(n=30, k=10, groups=1)
    rng = np.random.default_rng(1)
    parent = space.random_state(rng)
    moved = [int(np.abs(space.mutate(parent, rng) - parent).sum()) // 2 for _ in range(9000)]
    freq = np.bincount(moved, minlength=4)[1:4] / 9000
    # P(n=1,2,3) = 5/9, 3/9, 1/9; a later switch can undo an earlier one, so counts can only shrink.
    assert freq[0] >= 5 / 9 - 0.03 and freq[2] <= 1 / 9 + 0.02 and freq[1] > 0.25


def test_parent_enters_only_at_last_stage():
    ev = FnEvaluator(lambda s: float(s @ np.arange(len(s))))
    EvoPress(settings(3, stages=((4, 64), (2, 128), (1, 256))), drop_space(), ev, sampler, seed=0).run()
    gen_calls = ev.calls[1:]  # the first call is the random initialisation
    assert len(gen_calls) == 9
    for i, (states, parent) in enumerate(gen_calls):
        has_parent = any(np.array_equal(s, parent) for s in states)
        assert has_parent == (i % 3 == 2)
        assert len(states) == [8, 4, 2 + 1][i % 3]


def test_children_are_distinct_and_differ_from_parent():
    ev = FnEvaluator(lambda s: 0.0)
    EvoPress(settings(2, offspring=16), drop_space(), ev, sampler, seed=0).run()
    states, parent = ev.calls[1]
    keys = {s.tobytes() for s in states}
    assert len(keys) == 16 and parent.tobytes() not in keys


def test_exhausted_space_is_a_clear_error():
    space = drop_space(n=3, k=1, groups=1)  # only 2 neighbours exist
    with pytest.raises(UserError, match="exhausted"):
        EvoPress(settings(1, offspring=5), space, FnEvaluator(lambda s: 0.0), sampler, seed=0).run()


def brute_force_best(space, fn):
    return min(space.all_states(10**6), key=fn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_optimum_separable(seed):
    space = drop_space()
    w = np.random.default_rng(100 + seed).normal(size=space.size)
    fn = lambda s: float(s @ w)  # noqa: E731
    res = EvoPress(settings(25), space, FnEvaluator(fn), sampler, seed=seed).run()
    assert fn(res.state) == pytest.approx(fn(brute_force_best(space, fn)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_optimum_non_separable(seed):
    """Dropping neighbouring blocks interacts (like removing adjacent layers of a network)."""
    space = drop_space()
    rng = np.random.default_rng(200 + seed)
    w = rng.normal(size=space.size)
    coupling = rng.normal(size=(space.size, space.size)) * 0.6
    coupling = np.triu(coupling, 1)
    fn = lambda s: float(s @ w + s @ coupling @ s)  # noqa: E731
    res = EvoPress(settings(40, offspring=16), space, FnEvaluator(fn), sampler, seed=seed).run()
    assert fn(res.state) == pytest.approx(fn(brute_force_best(space, fn)))


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    space = drop_space()
    w = np.random.default_rng(7).normal(size=space.size)
    fn = lambda s: float(s @ w)  # noqa: E731
    full = EvoPress(settings(12), space, FnEvaluator(fn, noise=0.3), sampler, seed=3, run_dir=tmp_path / "a").run()

    class Killed(Exception):
        pass

    def kill_at(gen):
        def cb(record):
            if record["generation"] == gen:
                raise Killed
        return cb

    run_dir = tmp_path / "b"
    for gen in (4, 9):
        with pytest.raises(Killed):
            EvoPress(settings(12), space, FnEvaluator(fn, noise=0.3), sampler, seed=3, run_dir=run_dir,
                     on_generation=kill_at(gen)).run()
    resumed = EvoPress(settings(12), space, FnEvaluator(fn, noise=0.3), sampler, seed=3, run_dir=run_dir).run()
    assert np.array_equal(resumed.state, full.state) and resumed.fitness == full.fitness
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert len(lines) == 12

    with pytest.raises(UserError, match="other settings"):
        EvoPress(settings(13), space, FnEvaluator(fn), sampler, seed=3, run_dir=run_dir).run()
