"""Perplexity against plain transformers, dtype casting, and the dense-figure cache."""
import math

import pytest
import torch

from evoexp.config import DType, EvalCfg
from evoexp.data import eval_windows, load_tokens
from evoexp.eval import evaluate_ppl, parameters_as, windows_nll


def reference_ppl(model, windows):
    """What transformers itself reports: mean of per-window losses (all windows have equal length)."""
    device = next(model.parameters()).device  # the embedded fixture is on the GPU with EVOEXP_TEST_DEVICE=cuda
    with torch.no_grad():
        losses = [model(w[None].to(device), labels=w[None].to(device)).loss.double() for w in windows]
    return math.exp(torch.stack(losses).mean().item())


def test_tiny_ppl_matches_transformers(tiny):
    stream = load_tokens("wikitext2:test", tiny.tokenizer)
    windows, _ = eval_windows(stream, tiny.tokenizer, seq_len=96, windows=3, bos=False)
    nll, count = windows_nll(tiny, windows, batch_size=2, chunk_tokens=50)
    assert count == 3 * 95
    assert math.exp(nll / count) == pytest.approx(reference_ppl(tiny.model, windows), rel=1e-6)


def test_parameters_as_restores_exactly_and_keeps_buffers(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    inv_freq = tiny.model.model.rotary_emb.inv_freq
    with parameters_as(tiny.model, torch.bfloat16):
        assert tiny.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert tiny.model.model.rotary_emb.inv_freq.dtype == torch.float32
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert tiny.model.model.rotary_emb.inv_freq is inv_freq


def test_dense_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path))
    cfg = EvalCfg(datasets=["wikitext2:test"], seq_len=64, windows=2, dtypes=[DType.float32, DType.bfloat16])
    first = evaluate_ppl(tiny, cfg, "float32", dense=True)["wikitext2:test"]
    assert not first["float32"]["cached"] and not first["bfloat16"]["cached"]
    assert first["float32"]["ppl"] != first["bfloat16"]["ppl"]
    assert len(list((tmp_path / "dense_ppl").glob("*.json"))) == 2
    second = evaluate_ppl(tiny, cfg, "float32", dense=True)["wikitext2:test"]
    assert second["float32"]["cached"] and second["float32"]["ppl"] == first["float32"]["ppl"]
    # A different protocol is a different key; a compressed (non-dense) model never reads the cache.
    cfg.windows = 3
    assert not evaluate_ppl(tiny, cfg, "float32", dense=True)["wikitext2:test"]["float32"]["cached"]
    assert not evaluate_ppl(tiny, cfg, "float32", dense=False)["wikitext2:test"]["float32"]["cached"]


def test_figures_kept_in_the_run_dir_are_not_computed_again(tiny, tmp_path, monkeypatch):
    """A run killed among its evaluations: the rerun reads the figures it already has, per state and dtype."""
    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path / "cache"))
    cfg = EvalCfg(datasets=["wikitext2:test"], seq_len=64, windows=2, dtypes=[DType.float32, DType.bfloat16])
    run = tmp_path / "run"
    first = evaluate_ppl(tiny, cfg, "float32", dense=False, run_dir=run, state_id=["drop", 3])["wikitext2:test"]
    assert len((run / "scores" / "eval_ppl.jsonl").read_text().splitlines()) == 2
    again = evaluate_ppl(tiny, cfg, "float32", dense=False, run_dir=run, state_id=["drop", 3])["wikitext2:test"]
    assert again["float32"]["resumed"] and again["bfloat16"]["resumed"]
    assert [again[d]["ppl"] for d in ("float32", "bfloat16")] == [first[d]["ppl"] for d in ("float32", "bfloat16")]
    other = evaluate_ppl(tiny, cfg, "float32", dense=False, run_dir=run, state_id=["drop", 4])["wikitext2:test"]
    assert "resumed" not in other["float32"]  # another model state is another figure
    cfg.windows = 3  # and so is another protocol
    assert "resumed" not in evaluate_ppl(tiny, cfg, "float32", dense=False, run_dir=run,
                                         state_id=["drop", 3])["wikitext2:test"]["float32"]
    assert len((run / "scores" / "eval_ppl.jsonl").read_text().splitlines()) == 6


@pytest.mark.embedded
def test_embedded_ppl_matches_transformers(embedded):
    stream = load_tokens("wikitext2:test", embedded.tokenizer)
    windows, _ = eval_windows(stream, embedded.tokenizer, seq_len=2048, windows=2, bos=False)
    nll, count = windows_nll(embedded, windows)
    ours = math.exp(nll / count)
    assert ours == pytest.approx(reference_ppl(embedded.model, windows), rel=1e-5)
    with parameters_as(embedded.model, torch.bfloat16):
        nll16, _ = windows_nll(embedded, windows)
    assert math.exp(nll16 / count) == pytest.approx(ours, rel=0.01)


@pytest.mark.embedded
def test_embedded_first_8_windows_reference(embedded):
    """wikitext-2 test, first 8 windows of 2,048, no BOS, fp32: 19.26 as recorded in the data README."""
    stream = load_tokens("wikitext2:test", embedded.tokenizer)
    windows, _ = eval_windows(stream, embedded.tokenizer, seq_len=2048, windows=8, bos=False)
    nll, count = windows_nll(embedded, windows)
    assert math.exp(nll / count) == pytest.approx(19.26, rel=0.005)
