"""Candidate fitness against the dense teacher, from the student's final hidden states (lower is better).

- kl: mean over predicted positions of KL(P_teacher || Q_student) over the whole vocabulary.
- topk_kl: the same on the teacher's top-k tokens only, both sides renormalised over that support; the
  student's head is evaluated on those vocabulary rows only.
- ppl: the student's mean next-token NLL (log-perplexity), no teacher needed.

The teacher's targets are computed once per calibration token and kept in memory, or in a memory-mapped file
when larger than `max_memory_gb`. For kl, since the student's logits are z = W h (+ b) with the head W shared
by teacher and student, the cross term factorises: Σ_v p_v z_v = h · (pᵀW) (+ p·b). So per position the
teacher keeps one hidden-size vector pᵀW and the scalar Σ p·log p - p·b, and a candidate costs its head matmul
plus one log-sum-exp: KL = Σ p log p - h·(pᵀW) - p·b + logsumexp(z). With Gemma-2 style logit soft-capping z
is not linear in h, and the teacher keeps fp16 probabilities instead.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter
from evoexp.utils import progress

log = logging.getLogger(__name__)
KINDS = ("kl", "topk_kl", "ppl")


@dataclass
class Minibatch:
    """Calibration windows (index, number of tokens used from its start); the same for every candidate."""

    items: list[tuple[int, int]]

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.items)

    def groups(self, max_batch: int) -> list[tuple[list[int], int]]:
        """Windows of equal length batched together (at most `max_batch` per batch)."""
        by_len: dict[int, list[int]] = {}
        for idx, n in self.items:
            by_len.setdefault(n, []).append(idx)
        return [(ids[i: i + max_batch], n) for n, ids in sorted(by_len.items(), reverse=True)
                for i in range(0, len(ids), max_batch)]


def sample_minibatch(num_windows: int, seq_len: int, tokens: int, rng: np.random.Generator) -> Minibatch:
    """Distinct random windows until exactly `tokens` tokens; the last one is truncated."""
    if tokens > num_windows * seq_len:
        raise UserError(f"search.stages: a stage asks for {tokens} tokens but the calibration set has "
                        f"{num_windows} x {seq_len} = {num_windows * seq_len} (raise data.calib_windows)")
    if tokens < 2:
        raise UserError("search.stages: tokens must be at least 2")
    order = rng.permutation(num_windows)
    items, left = [], tokens
    for idx in order:
        take = min(seq_len, left)
        if take < 2:  # a 1-token window predicts nothing; give its token to the previous window instead
            break
        items.append((int(idx), take))
        left -= take
        if left == 0:
            break
    return Minibatch(items)


def minibatch(teacher: Teacher, tokens: int, rng: np.random.Generator) -> Minibatch:
    n, seq = teacher.windows.shape
    return sample_minibatch(n, seq, tokens, rng)


class Teacher:
    """Dense-model targets for every calibration window, and the fitness of student hidden states."""

    def __init__(self, adapter: DecoderAdapter, windows: torch.Tensor, kind: str = "kl", topk: int = 512,
                 chunk_tokens: int = 2048, max_memory_gb: float = 8.0, storage_dir: Path | None = None):
        if kind not in KINDS:
            raise UserError(f"fitness.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.adapter, self.windows, self.kind = adapter, windows, kind
        self.topk, self.chunk = topk, chunk_tokens
        self.max_memory_gb, self.storage_dir = max_memory_gb, storage_dir
        self.probs = self.neg_entropy = self.top_idx = self.top_logp = self.p_head = None
        self.factorised = not getattr(adapter.config, "final_logit_softcapping", None)

    # --- building ----------------------------------------------------------------------------------------------
    def _alloc(self, name: str, shape: tuple, dtype: np.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes <= self.max_memory_gb * 2**30 or self.storage_dir is None:
            return torch.from_numpy(np.empty(shape, dtype=dtype))
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        path = self.storage_dir / f"teacher_{name}.npy"
        log.info("teacher %s: %.1f GiB memory-mapped at %s", name, nbytes / 2**30, path)
        return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape))

    @torch.inference_mode()
    def build(self, runner, batch: int = 8) -> "Teacher":
        if self.kind == "ppl":
            return self
        for name, (shape, dtype) in self._layout().items():
            setattr(self, name, self._alloc(name, shape, dtype))
        n = self.windows.shape[0]
        device = next(self.adapter.model.parameters()).device
        for w0 in progress(range(0, n, batch), desc=f"teacher ({self.kind})", unit="batch"):
            ids = self.windows[w0: w0 + batch].to(device)
            hidden = runner.final(runner.run(runner.embed(ids), 0))[:, :-1]
            for w, h in zip(range(w0, w0 + ids.shape[0]), hidden):
                self._store(w, h)
        return self

    def _layout(self) -> dict[str, tuple[tuple, type]]:
        """The targets this teacher keeps, {name: (shape, dtype)}: none for kind=ppl."""
        if self.kind == "ppl":
            return {}
        n, positions = self.windows.shape[0], self.windows.shape[1] - 1
        vocab, width = self.adapter.lm_head.weight.shape
        if self.kind == "kl":
            name, row, dtype = ("p_head", width, np.float32) if self.factorised else ("probs", vocab, np.float16)
            return {name: ((n, positions, row), dtype), "neg_entropy": ((n, positions), np.float32)}
        k = min(self.topk, vocab)
        return {"top_idx": ((n, positions, k), np.int32), "top_logp": ((n, positions, k), np.float32)}

    # --- keeping (a cross-run cache: every job of a table scores against the same targets) ---------------------
    def targets(self) -> dict[str, torch.Tensor]:
        """The built targets by name."""
        return {name: getattr(self, name) for name in self._layout()}

    def target_bytes(self) -> int:
        """What the targets take, to decide before building whether they are worth keeping on disk."""
        return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self._layout().values())

    def load(self, targets: dict[str, torch.Tensor]) -> "Teacher":
        """Targets read back (from `targets()` of a teacher built the same way); raises ValueError when they
        are not what this teacher would build, so a stale cache entry is rebuilt instead of used."""
        want = {name: shape for name, (shape, _) in self._layout().items()}
        if {name: tuple(t.shape) for name, t in targets.items()} != want:
            raise ValueError(f"cached teacher targets do not have the shapes {want}")
        for name, tensor in targets.items():
            setattr(self, name, tensor)
        return self

    def _store(self, w: int, hidden: torch.Tensor) -> None:
        for s in range(0, hidden.shape[0], self.chunk):
            logp = F.log_softmax(self.adapter.logits(hidden[s: s + self.chunk]).float(), dim=-1)
            if self.kind == "kl" and self.factorised:
                p = logp.exp()
                head = self.adapter.lm_head
                self.p_head[w, s: s + self.chunk] = (p @ head.weight.float()).cpu()
                bias = p @ head.bias.float() if head.bias is not None else 0.0
                self.neg_entropy[w, s: s + self.chunk] = ((p * logp).sum(-1) - bias).cpu()
            elif self.kind == "kl":
                p16 = logp.exp().half()
                self.probs[w, s: s + self.chunk] = p16.cpu()
                self.neg_entropy[w, s: s + self.chunk] = (p16.float() * logp).sum(-1).cpu()
            else:
                vals, idx = logp.topk(self.top_idx.shape[-1], dim=-1)
                self.top_idx[w, s: s + self.chunk] = idx.int().cpu()
                self.top_logp[w, s: s + self.chunk] = F.log_softmax(vals, dim=-1).cpu()

    # --- scoring -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def loss_sum(self, hidden: torch.Tensor, window_ids: list[int], length: int) -> tuple[float, int]:
        """Summed per-position loss and number of positions for final hidden states [b, length, d]."""
        h = hidden[:, : length - 1].reshape(-1, hidden.shape[-1])
        rows = torch.tensor(window_ids)
        total = 0.0
        for s in range(0, h.shape[0], self.chunk):
            hs = h[s: s + self.chunk]
            sel = _flat_positions(rows, length - 1, s, hs.shape[0])
            total += self._chunk_loss(hs, *sel)
        return total, h.shape[0]

    def _chunk_loss(self, h: torch.Tensor, win: torch.Tensor, pos: torch.Tensor) -> float:
        if self.kind == "ppl":
            targets = self.windows[win, pos + 1].to(h.device)
            return F.cross_entropy(self.adapter.logits(h).float(), targets, reduction="sum").double().item()
        if self.kind == "kl" and self.factorised:
            lse = torch.logsumexp(self.adapter.logits(h).float(), dim=-1)
            cross = (h.float() * self.p_head[win, pos].to(h.device)).sum(-1)
            return (self.neg_entropy[win, pos].to(h.device) - cross + lse).double().sum().item()
        if self.kind == "kl":
            z = self.adapter.logits(h).float()
            p = self.probs[win, pos].to(h.device).float()
            cross = (p * z).sum(-1) - p.sum(-1) * torch.logsumexp(z, dim=-1)  # Σ p·log q
            return (self.neg_entropy[win, pos].to(h.device) - cross).double().sum().item()
        idx = self.top_idx[win, pos].to(h.device).long()
        rows, inverse = torch.unique(idx, return_inverse=True)
        z = self.adapter.logits(h, rows=rows).float()
        slogp = F.log_softmax(torch.gather(z, 1, inverse), dim=-1)
        tlogp = self.top_logp[win, pos].to(h.device)
        return (tlogp.exp() * (tlogp - slogp)).double().sum().item()


def _flat_positions(window_ids: torch.Tensor, positions: int, start: int, count: int):
    """(window, position) of flattened rows [start, start+count) of a [len(window_ids), positions] block."""
    flat = torch.arange(start, start + count)
    return window_ids[flat // positions], flat % positions
