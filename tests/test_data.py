"""Text sources, the token cache, and the calibration / evaluation window protocols."""
import json

import pytest
import torch

from evoexp.data import calibration_windows, check_source, eval_windows, load_tokens, read_text, sources
from evoexp.errors import UserError
from evoexp.models.tiny import byte_tokenizer


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_builtin_wikitext2_is_shipped():
    test = read_text("wikitext2:test")
    assert len(test.text) == 1_285_622 and test.text.startswith(" = Robert Boulter = \n")
    assert read_text("wikitext2:validation").text.count("<unk>") > 100  # the tokenized variant


def test_byte_tokenizer_roundtrip(tok):
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and all(i >= 3 for i in ids)  # é is two UTF-8 bytes
    assert tok.decode(ids) == "héllo"


def test_token_cache_roundtrip(tok, tmp_path):
    first = load_tokens("wikitext2:test", tok)
    files = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    second = load_tokens("wikitext2:test", tok)
    assert torch.equal(first.tokens, second.tokens) and first.fingerprint == second.fingerprint
    assert first.tokens.numel() == len(read_text("wikitext2:test").text.encode("utf-8"))


def test_eval_windows_are_consecutive_and_cover_the_start(tok):
    stream = load_tokens("wikitext2:test", tok)
    win, proto = eval_windows(stream, tok, seq_len=64, windows=3, bos=False)
    assert win.shape == (3, 64) and torch.equal(win.flatten(), stream.tokens[:192])
    assert proto.windows == 3 and proto.kind == "evaluation" and not proto.bos
    everything, proto_all = eval_windows(stream, tok, seq_len=64, windows=None, bos=False)
    assert proto_all.windows == stream.tokens.numel() // 64
    with_bos, _ = eval_windows(stream, tok, seq_len=64, windows=2, bos=True)
    assert (with_bos[:, 0] == tok.bos_token_id).all() and torch.equal(with_bos[:, 1:].flatten(), stream.tokens[:126])
    with pytest.raises(UserError, match="eval.windows"):
        eval_windows(stream, tok, seq_len=64, windows=10**7, bos=False)


def test_calibration_windows_reproducible_and_contiguous(tok):
    stream = load_tokens("wikitext2:validation", tok)
    a, proto = calibration_windows(stream, tok, seq_len=32, n=16, seed=3, bos=False)
    b, _ = calibration_windows(stream, tok, seq_len=32, n=16, seed=3, bos=False)
    c, _ = calibration_windows(stream, tok, seq_len=32, n=16, seed=4, bos=False)
    assert a.shape == (16, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert proto.seed == 3 and proto.kind == "calibration"
    text = stream.tokens.tolist()
    for row in a.tolist()[:4]:  # each window is a contiguous slice of the token stream
        starts = [i for i in range(len(text) - 31) if text[i] == row[0] and text[i:i + 32] == row]
        assert starts
    with_bos, _ = calibration_windows(stream, tok, seq_len=32, n=4, seed=3, bos=True)
    assert (with_bos[:, 0] == tok.bos_token_id).all()


def test_local_text_and_jsonl_sources(tok, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n")
    assert read_text(str(txt)).text == "hello world\n"
    js = tmp_path / "b.jsonl"
    js.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(str(js)).text == "one\n\ntwo"
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no field 'text'"):
        read_text(str(bad))
    assert read_text(str(bad), jsonl_field="body").text == "x"
    broken = tmp_path / "d.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(UserError, match=r"d.jsonl:1: not valid JSON"):
        read_text(str(broken))


def test_source_checks():
    check_source("wikitext2:test", "k")
    check_source("c4:validation", "k")
    with pytest.raises(UserError, match="k: 'wikitext2:train' has no split 'train'"):
        check_source("wikitext2:train", "k")
    with pytest.raises(UserError, match="k: '/no/file.txt' is neither"):
        check_source("/no/file.txt", "k")


def test_online_corpora_fail_fast_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(UserError, match="unreachable"):
        read_text("c4:validation")


@pytest.mark.embedded
def test_wikitext2_reference_token_count(embedded):
    stream = load_tokens("wikitext2:test", embedded.tokenizer)
    assert stream.tokens.numel() == 301_948
    _, proto = eval_windows(stream, embedded.tokenizer, seq_len=2048, windows=None, bos=False)
    assert proto.windows == 147
