"""Tokenize a text source once (cached on disk) and cut it into calibration or evaluation windows."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from evoexp.data.sources import read_text
from evoexp.errors import UserError
from evoexp.tensorfiles import load_cached, save_safetensors
from evoexp.utils import cache_root, stable_hash

# Texts above this size are tokenized in pieces split at blank lines (whole-text tokenization of wikitext-2 is
# the reference protocol and stays whole).
WHOLE_TEXT_LIMIT = 64 << 20


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TokenStream:
    spec: str
    tokens: torch.Tensor  # 1-D int64
    fingerprint: str
    join: str


def load_tokens(spec: str, tokenizer, jsonl_field: str = "text") -> TokenStream:
    text = read_text(spec, jsonl_field)
    key = stable_hash({"text": text.fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer), "v": 1})
    path = cache_root() / "tokens" / f"{key}.safetensors"
    tokens = _cached_tokens(path)
    if tokens is None:
        tokens = _tokenize(text.text, tokenizer)
        save_safetensors({"tokens": tokens.to(torch.int32)}, path, metadata={"spec": spec})
    return TokenStream(spec, tokens, key, text.join)


def _cached_tokens(path) -> torch.Tensor | None:
    cached = load_cached(path, "tokenizing again")
    return None if cached is None else cached["tokens"].long()


def _tokenize(text: str, tokenizer) -> torch.Tensor:
    if len(text) <= WHOLE_TEXT_LIMIT:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        pieces, start = [], 0
        while start < len(text):
            end = text.find("\n\n", start + (1 << 20))
            end = len(text) if end < 0 else end + 2
            pieces.append(text[start:end])
            start = end
        ids = [t for part in tokenizer(pieces, add_special_tokens=False)["input_ids"] for t in part]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class WindowProtocol:
    """Everything that decides which tokens a set of windows holds; recorded in results and cache keys."""

    source: str
    kind: str  # calibration (random windows) | evaluation (non-overlapping from the start)
    seq_len: int
    windows: int
    bos: bool
    seed: int | None
    text_tokens: int
    tokens_key: str

    def as_dict(self) -> dict:
        return asdict(self)


def _bos_id(tokenizer, bos: bool) -> int | None:
    if not bos:
        return None
    if tokenizer.bos_token_id is None:
        raise UserError("bos=true but the tokenizer defines no BOS token")
    return tokenizer.bos_token_id


def eval_windows(stream: TokenStream, tokenizer, seq_len: int, windows: int | None, bos: bool
                 ) -> tuple[torch.Tensor, WindowProtocol]:
    """Non-overlapping windows from the start of the text; `windows=None` takes every full window."""
    bos_id = _bos_id(tokenizer, bos)
    span = seq_len - (bos_id is not None)
    full = stream.tokens.numel() // span
    if full == 0:
        raise UserError(f"{stream.spec}: {stream.tokens.numel()} tokens, fewer than one window of {seq_len}")
    n = full if windows is None else windows
    if n < 1 or n > full:
        raise UserError(f"eval.windows: {windows} requested but {stream.spec} has {full} full windows of {seq_len}")
    out = stream.tokens[: n * span].view(n, span)
    if bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id, dtype=out.dtype), out], dim=1)
    proto = WindowProtocol(stream.spec, "evaluation", seq_len, n, bos, None, stream.tokens.numel(), stream.fingerprint)
    return out, proto


def calibration_windows(stream: TokenStream, tokenizer, seq_len: int, n: int, seed: int, bos: bool
                        ) -> tuple[torch.Tensor, WindowProtocol]:
    """`n` windows of `seq_len` tokens at uniformly random offsets, reproducible from `seed`."""
    bos_id = _bos_id(tokenizer, bos)
    span = seq_len - (bos_id is not None)
    if stream.tokens.numel() < span + 1:
        raise UserError(f"data.seq_len: {seq_len} is longer than the calibration text {stream.spec}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.tokens.numel() - span + 1, (n,), generator=gen)
    out = torch.stack([stream.tokens[s: s + span] for s in starts.tolist()])
    if bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id, dtype=out.dtype), out], dim=1)
    proto = WindowProtocol(stream.spec, "calibration", seq_len, n, bos, seed, stream.tokens.numel(),
                           stream.fingerprint)
    return out, proto
