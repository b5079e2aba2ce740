"""Perplexity on held-out text under a pinned protocol, with the dense model's figures cached per protocol."""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evoexp.config import EvalCfg
from evoexp.data import eval_windows, load_tokens
from evoexp.models import LoadedModel
from evoexp.eval.shared import shared_figure
from evoexp.utils import KeyedLog, cache_root, progress, read_cached_json, stable_hash, write_json

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PPL_VERSION = 1  # bump when the computation changes, so cached dense figures are not reused


@contextmanager
def parameters_as(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run with parameters cast to `dtype`, restoring the originals exactly afterwards.

    Only parameters are cast: buffers such as RoPE's inv_freq stay in fp32, as when loading in that dtype.
    """
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    originals = [p.data for p in params]
    for p in params:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in zip(params, originals):
            p.data = data


@torch.inference_mode()
def windows_nll(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 1, chunk_tokens: int = 2048,
                desc: str = "ppl", kept: KeyedLog | None = None) -> tuple[float, int]:
    """Summed NLL (fp64) and count over every predicted position: position t predicts token t+1 of its window.

    Logits are computed in chunks of `chunk_tokens` positions, so no [batch, seq, vocab] tensor is formed. With
    `kept`, every window's sum is kept as soon as it is computed and the windows it already holds are skipped, so
    an evaluation killed at window k goes on from window k; the total is summed in window order either way.
    """
    device = next(loaded.model.parameters()).device
    done = {int(k): v for k, v in kept.done.items()} if kept is not None else {}
    todo = [i for i in range(windows.shape[0]) if i not in done]
    if done:
        log.info("%s: %d of %d windows computed by an earlier run (%s)", desc, len(done), windows.shape[0],
                 kept.path)
    bar = progress(total=windows.shape[0], initial=len(done), desc=desc, unit="win")
    for start in range(0, len(todo), batch_size):
        rows = todo[start: start + batch_size]
        x = windows[rows].to(device)
        hidden = loaded.adapter.hidden_states(x)[:, :-1]
        for row, h, targets in zip(rows, hidden, x[:, 1:]):
            nll = 0.0
            for i in range(0, targets.numel(), chunk_tokens):
                logits = loaded.adapter.logits(h[i: i + chunk_tokens]).float()
                nll += F.cross_entropy(logits, targets[i: i + chunk_tokens], reduction="sum").double().item()
            done[row] = [nll, targets.numel()]
            if kept is not None:
                kept.add(str(row), done[row])
        bar.update(len(rows))
        bar.set_postfix(ppl=f"{math.exp(sum(v[0] for v in done.values()) / sum(v[1] for v in done.values())):.3f}")
    bar.close()
    ordered = [done[i] for i in range(windows.shape[0])]
    return sum(v[0] for v in ordered), sum(v[1] for v in ordered)


def window_log(loaded: LoadedModel, cfg: EvalCfg, figure_key: str, dense: bool, run_dir: Path | None,
               state_id: object) -> KeyedLog | None:
    """Where an evaluation keeps its per-window sums until it is finished: next to the dense cache for the dense
    model, in the run dir for a compressed state; None when the figure is not kept anywhere."""
    context = {"figure": figure_key, "state": state_id, "batch": cfg.batch_size, "v": PPL_VERSION}
    if dense and cfg.cache_dense:  # shared by every run of this model and protocol, like the dense figure
        context["state"] = "dense"
        return KeyedLog(cache_root() / "dense_ppl" / f"{figure_key}.windows.jsonl", context, field="nll")
    if run_dir is not None and state_id is not None:
        name = stable_hash({"model": loaded.fingerprint, **context})
        return KeyedLog(Path(run_dir) / "scores" / "ppl_windows" / f"{name}.jsonl", context, field="nll")
    return None


def evaluate_ppl(loaded: LoadedModel, cfg: EvalCfg, run_dtype: str, dense: bool, run_dir: Path | None = None,
                 state_id: object = None, digest: str | None = None) -> dict:
    """PPL of every `cfg.datasets` source in every `cfg.dtypes` (default: the run's dtype).

    With `dense` and `cfg.cache_dense`, figures are read from / written to the dense cache keyed by the model
    fingerprint and the full protocol, so each (model, protocol) is computed once; a compressed model's with its
    `digest` (models/digest.py: what it computes) likewise, in the state cache. With a `run_dir` and a
    `state_id` (what identifies the model state, e.g. the sub-blocks dropped), each figure is also kept in
    `<run_dir>/scores/eval_ppl.jsonl`, so a run killed among its evaluations redoes only those not finished.
    """
    results: dict = {}
    dtypes = [d.value if hasattr(d, "value") else str(d) for d in cfg.dtypes] or [run_dtype]
    kept = None
    if run_dir is not None and state_id is not None:
        kept = KeyedLog(Path(run_dir) / "scores" / "eval_ppl.jsonl", {"model": loaded.fingerprint, "v": PPL_VERSION},
                        field="ppl")
    for spec in cfg.datasets:
        stream = load_tokens(spec, loaded.tokenizer)
        windows, proto = eval_windows(stream, loaded.tokenizer, cfg.seq_len, cfg.windows, cfg.bos)
        entry = {"protocol": proto.as_dict()}
        for dtype in dtypes:
            key = stable_hash({"model": loaded.fingerprint, "protocol": proto.as_dict(), "dtype": dtype,
                               "v": PPL_VERSION})
            cache_file = shared_figure("ppl", key, dense, cfg.cache_dense, digest)
            kept_key = stable_hash({"figure": key, "state": state_id})
            mine = kept is not None and kept_key in kept.done  # a compressed model's own figure goes first
            cached = read_cached_json(cache_file) if cache_file is not None and (dense or not mine) else None
            if cached is not None:  # (a damaged one is None: recomputed)
                entry[dtype] = {**cached, "cached": True}
                log.info("%s %s: %sPPL %.4f (cached: %s)", spec, dtype, "dense " if dense else "",
                         entry[dtype]["ppl"], "the dense model's" if dense else "a model of the same weights")
                if not dense and kept is not None:  # the run's own record of what it reported, as if computed
                    kept.add(kept_key, {k: cached[k] for k in ("ppl", "nll", "predicted_tokens", "seconds")})
                continue
            if mine:
                entry[dtype] = {**kept.done[kept_key], "cached": False, "resumed": True}
                log.info("%s %s: PPL %.4f (computed by an earlier run: %s)", spec, dtype, entry[dtype]["ppl"],
                         kept.path)
                continue
            t0 = time.time()
            partial = window_log(loaded, cfg, key, dense, run_dir, state_id)
            with parameters_as(loaded.model, DTYPES[dtype]):
                nll, count = windows_nll(loaded, windows, cfg.batch_size, desc=f"ppl {spec} {dtype}", kept=partial)
            figures = {"ppl": math.exp(nll / count), "nll": nll / count, "predicted_tokens": count,
                       "seconds": round(time.time() - t0, 2)}
            log.info("%s %s: PPL %.4f over %d windows (%.1f s)", spec, dtype, figures["ppl"], proto.windows,
                     figures["seconds"])
            if cache_file is not None:
                write_json(cache_file, {**figures, "model": loaded.fingerprint, "state": digest,
                                        "protocol": proto.as_dict(), "dtype": dtype})
            if kept is not None:
                kept.add(kept_key, figures)
            if partial is not None:  # the figure is kept whole now
                partial.path.unlink(missing_ok=True)
            entry[dtype] = {**figures, "cached": False}
        results[spec] = entry
    return results


class HeldOutTracker:
    """Held-out PPL of a search state on the first few eval windows: the convergence figure's second curve.

    The windows are tokenized once; each call puts the state into the model with `apply` and returns
    {dataset: PPL} in the run's dtype.
    """

    def __init__(self, loaded: LoadedModel, cfg: EvalCfg, dtype: str, windows: int, apply):
        self.loaded, self.dtype, self.apply = loaded, DTYPES[dtype], apply
        self.windows = {spec: eval_windows(load_tokens(spec, loaded.tokenizer), loaded.tokenizer, cfg.seq_len,
                                           windows, cfg.bos)[0] for spec in cfg.datasets}

    def __call__(self, state) -> dict[str, float]:
        self.apply(state)
        out = {}
        with parameters_as(self.loaded.model, self.dtype):
            for spec, w in self.windows.items():
                nll, count = windows_nll(self.loaded, w, desc=f"track {spec}")
                out[spec] = math.exp(nll / count)
        log.info("held-out PPL of the parent: %s", "  ".join(f"{k} {v:.3f}" for k, v in out.items()))
        return out


def heldout_tracker(loaded: LoadedModel, cfg: EvalCfg, dtype: str, every: int, windows: int,
                    apply) -> HeldOutTracker | None:
    """The tracker a search asks for (tracking `every` k > 0 generations and something to evaluate), else None."""
    if not every or not cfg.datasets:
        return None
    return HeldOutTracker(loaded, cfg, dtype, windows, apply)
