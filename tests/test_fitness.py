"""Fitness functions checked against hand computations on the tiny model."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evoexp.blockrun import BlockRunner
from evoexp.errors import UserError
from evoexp.fitness import Minibatch, Teacher, sample_minibatch
from evoexp.models import DecoderAdapter


@pytest.fixture(scope="module")
def setup(tiny):
    """The tiny model with a sharpened head: random init gives near-uniform outputs, where KL is symmetric."""
    tiny = copy.deepcopy(tiny)
    tiny.adapter = DecoderAdapter(tiny.model)
    tiny.adapter.lm_head.weight.data *= 30
    windows = torch.randint(3, 259, (3, 24), generator=torch.Generator().manual_seed(0))
    return tiny, BlockRunner(tiny.adapter), windows


def student_hidden(tiny, runner, ids, scale_block=1):
    """A perturbed student: one block's MLP output scaled down (weights restored afterwards)."""
    w = tiny.adapter.mlp(scale_block).down_proj.weight
    saved = w.data.clone()
    w.data *= 5.0
    try:
        return runner.final(runner.run(runner.embed(ids), 0))
    finally:
        w.data = saved


def test_kl_direction_and_per_token_mean(setup):
    tiny, runner, windows = setup
    teacher = Teacher(tiny.adapter, windows, "kl", chunk_tokens=7).build(runner)
    ids, length = [0, 2], 24
    hidden = student_hidden(tiny, runner, windows[ids])
    total, count = teacher.loss_sum(hidden, ids, length)
    with torch.no_grad():
        logp = F.log_softmax(tiny.model(windows[ids]).logits[:, :-1].double(), -1)  # teacher P
        logq = F.log_softmax(tiny.adapter.logits(hidden)[:, :-1].double(), -1)  # student Q
    kl_pq = (logp.exp() * (logp - logq)).sum(-1)  # KL(P || Q) per position
    kl_qp = (logq.exp() * (logq - logp)).sum(-1)
    assert count == 2 * 23
    assert total / count == pytest.approx(kl_pq.mean().item(), rel=2e-3)
    assert abs(kl_pq.mean().item() - kl_qp.mean().item()) > 50 * abs(total / count - kl_pq.mean().item())


def test_kl_of_teacher_with_itself_is_zero(setup):
    tiny, runner, windows = setup
    teacher = Teacher(tiny.adapter, windows, "kl").build(runner)
    hidden = runner.final(runner.run(runner.embed(windows), 0))
    total, count = teacher.loss_sum(hidden, [0, 1, 2], 24)
    assert abs(total / count) < 1e-5


def test_topk_kl_matches_hand_computation(setup):
    tiny, runner, windows = setup
    k = 5
    teacher = Teacher(tiny.adapter, windows, "topk_kl", topk=k, chunk_tokens=10).build(runner)
    hidden = student_hidden(tiny, runner, windows[[1]])
    total, count = teacher.loss_sum(hidden, [1], 24)
    with torch.no_grad():
        zt = tiny.model(windows[[1]]).logits[0, :-1].double()
        zs = tiny.adapter.logits(hidden)[0, :-1].double()
    idx = zt.topk(k, -1).indices
    p = F.log_softmax(zt.gather(-1, idx), -1)
    q = F.log_softmax(zs.gather(-1, idx), -1)
    assert total / count == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-5)


def test_ppl_fitness_is_mean_nll(setup):
    tiny, runner, windows = setup
    teacher = Teacher(tiny.adapter, windows, "ppl")
    hidden = runner.final(runner.run(runner.embed(windows[:, :10]), 0))
    total, count = teacher.loss_sum(hidden, [0, 1, 2], 10)
    with torch.no_grad():
        ref = tiny.model(windows[:, :10], labels=windows[:, :10]).loss.item()
    assert total / count == pytest.approx(ref, rel=1e-5)


def test_minibatch_exact_tokens_distinct_windows():
    rng = np.random.default_rng(0)
    mb = sample_minibatch(10, 64, 200, rng)
    assert mb.tokens == 200 and [n for _, n in mb.items] == [64, 64, 64, 8]
    assert len({i for i, _ in mb.items}) == 4
    assert mb.groups(2) == [([mb.items[0][0], mb.items[1][0]], 64), ([mb.items[2][0]], 64), ([mb.items[3][0]], 8)]
    with pytest.raises(UserError, match="calib_windows"):
        sample_minibatch(2, 64, 129, rng)
    tokens = Minibatch([(0, 5), (3, 7)]).tokens
    assert tokens == 12 and type(tokens) is int  # a plain int: it goes into JSON records


def test_kl_with_softcapped_logits_keeps_probabilities():
    """Gemma-2 soft-capping makes logits non-linear in h: the teacher stores probabilities instead."""
    from .test_adapter import family_model

    model = family_model("gemma2")
    model.lm_head.weight.data *= 20
    adapter = DecoderAdapter(model)
    runner = BlockRunner(adapter)
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    teacher = Teacher(adapter, windows, "kl").build(runner)
    assert not teacher.factorised and teacher.probs is not None
    mlp = adapter.mlp(1).down_proj.weight
    saved = mlp.data.clone()
    mlp.data *= 4
    hidden = runner.final(runner.run(runner.embed(windows), 0))
    mlp.data = saved
    total, count = teacher.loss_sum(hidden, [0, 1], 16)
    with torch.no_grad():
        logp = F.log_softmax(model(windows).logits[:, :-1].double(), -1)
        logq = F.log_softmax(adapter.logits(hidden)[:, :-1].double(), -1)
    assert total / count == pytest.approx((logp.exp() * (logp - logq)).sum(-1).mean().item(), rel=2e-3)


@pytest.mark.parametrize("kind", ["kl", "topk_kl"])
def test_teacher_targets_are_cached_per_settings_and_rebuilt_when_damaged(setup, kind, tmp_path, monkeypatch, caplog):
    """build_teacher keeps a run's targets in the cache: the next job reads them back (no dense pass) and scores
    exactly as with built ones; other windows or settings make another entry, and a damaged file is rebuilt."""
    from types import SimpleNamespace

    from evoexp.recipes.common import build_teacher

    tiny, runner, windows = setup
    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path))
    caplog.set_level("INFO", logger="evoexp")
    passes = []

    class Counting:
        def __getattr__(self, name):
            return getattr(runner, name)

        def run(self, *args, **kw):
            passes.append(1)
            return runner.run(*args, **kw)

    def ctx(topk=7, max_gb=8.0):
        fitness = SimpleNamespace(kind=kind, topk=topk, chunk_tokens=2048, max_memory_gb=max_gb)
        return SimpleNamespace(loaded=SimpleNamespace(adapter=tiny.adapter, fingerprint="tiny:test"),
                               rc=SimpleNamespace(fitness=fitness, dtype=SimpleNamespace(value="float32")),
                               out_dir=tmp_path / "run")

    hidden = student_hidden(tiny, runner, windows[[0, 2]])
    built = build_teacher(ctx(), windows, Counting())
    assert len(passes) == 1
    again = build_teacher(ctx(), windows, Counting())
    assert len(passes) == 1 and "read back" in caplog.text
    assert all(torch.equal(again.targets()[k], v) for k, v in built.targets().items())
    assert again.loss_sum(hidden, [0, 2], 24) == built.loss_sum(hidden, [0, 2], 24)
    build_teacher(ctx(), windows[:, :16], Counting())  # other windows: another entry
    if kind == "topk_kl":
        build_teacher(ctx(topk=5), windows, Counting())  # another support size: another entry
    entries = sorted((tmp_path / "fitness_targets").iterdir())
    assert len(passes) == len(entries) == (3 if kind == "topk_kl" else 2)
    small = build_teacher(ctx(max_gb=1e-9), windows, Counting())  # memory-mapped size: not kept
    assert len(passes) == len(entries) + 1 and len(list((tmp_path / "fitness_targets").iterdir())) == len(entries)
    assert small.loss_sum(hidden, [0, 2], 24) == built.loss_sum(hidden, [0, 2], 24)
    path = max(entries, key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    count = len(passes)
    redone = build_teacher(ctx(), windows, Counting())
    assert len(passes) == count + 1 and "damaged" in caplog.text
    assert redone.loss_sum(hidden, [0, 2], 24) == built.loss_sum(hidden, [0, 2], 24)
