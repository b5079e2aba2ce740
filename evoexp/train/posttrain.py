"""Post-compression training of a found model, in place (`train=finetune|distill`).

    trainer = PostTrainer(model, params, windows, settings, masks, out_dir / "train", teacher_hidden=h, head=head)
    record = trainer.run()        # resumes from out_dir/train/checkpoint.pt; returns the loss history and timings

- finetune: next-token cross-entropy on the training windows.
- distill: KL(teacher || student) per token, plus `ce_weight` x next-token loss. The teacher is the dense model's
  final hidden states on the training windows, computed once before compression is applied (`teacher_states`)
  and turned into logits through the head, which stays frozen: one hidden-size vector per token instead of a
  vocabulary-size one. The student's (`hidden_of`) must run with autograd.
- Pruned entries stay pruned (`MaskedAdamW`); the parameters trained are the ones given (evoexp: the decoder
  blocks and the final norm).
- A plain loop (torch AdamW, transformers' warmup + cosine / linear / constant schedules) rather than a trainer
  framework: the masked update, the KL against stored teacher states and an exactly resumable state in evoexp's
  atomic, checked files are each a few lines here and each a custom hook there.
- Checkpoints every `checkpoint_every` steps and at the end (the trained parameters, optimizer, schedule, step,
  data order and RNG), written atomically: a killed training resumes and ends where an uninterrupted one would.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evoexp.errors import UserError
from evoexp.train.masked import MaskedAdamW, trainable
from evoexp.utils import atomic_path, progress, stable_hash

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
# 2: train=distill trains the decoder blocks (version 1 computed the student through BlockRunner, in inference mode:
# only the final norm got a gradient); a checkpoint of another version is trained again, not resumed
TRAIN_VERSION = 2


@dataclass
class PostTrainSettings:
    kind: str = "finetune"  # finetune | distill
    tokens: int = 524_288
    batch: int = 4  # sequences per optimizer step
    lr: float = 5e-5
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.01
    ce_weight: float = 0.0  # distill: weight of the next-token loss added to the KL
    checkpoint_every: int = 50  # steps
    seed: int = 0

    def steps(self, seq_len: int) -> int:
        """Optimizer steps of `batch` windows of `seq_len` tokens that cover `tokens` (the last one may overshoot)."""
        return max(1, -(-self.tokens // (self.batch * seq_len)))


@torch.no_grad()
def teacher_states(hidden_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch: int = 4
                   ) -> torch.Tensor:
    """The dense model's final (normed) hidden states on every training window [n, seq_len, hidden], in fp16:
    computed before the compression is put in place."""
    starts = range(0, windows.shape[0], batch)
    bar = progress(starts, desc="teacher states", unit="batch")
    return torch.cat([hidden_of(windows[i: i + batch]).half().cpu() for i in bar])


class PostTrainer:
    def __init__(self, model: nn.Module, params: list[nn.Parameter], windows: torch.Tensor, s: PostTrainSettings,
                 masks: dict[nn.Parameter, torch.Tensor], out_dir: Path,
                 hidden_of: Callable[[torch.Tensor], torch.Tensor] | None = None, head: nn.Module | None = None,
                 teacher_hidden: torch.Tensor | None = None, log_fn: Callable[[dict], None] | None = None,
                 identity: dict | None = None):
        """`hidden_of(ids)`: the student's final hidden states, and `head`, for distill (with `teacher_hidden`).
        `identity`: what else decides the trained parameters' values (e.g. LoRA's settings), part of the
        checkpoint's key."""
        if s.kind not in ("finetune", "distill"):
            raise UserError(f"train: expected none, finetune or distill, got {s.kind!r}")
        self.model, self.params, self.windows, self.s, self.masks = model, params, windows, s, masks
        self.out_dir, self.hidden_of, self.head = Path(out_dir), hidden_of, head
        self.teacher_hidden, self.log_fn = teacher_hidden, log_fn or (lambda _r: None)
        self.steps = s.steps(windows.shape[1])
        self.key = stable_hash({"settings": asdict(s), "windows": list(windows.shape),
                                "params": [list(p.shape) for p in params], **({"also": identity} if identity else {})})

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        opt = MaskedAdamW(self.params, self.masks, s.lr, s.weight_decay)
        sched = self._schedule(opt.opt)
        rng = np.random.Generator(np.random.PCG64(s.seed))
        step, history, order = 0, [], self._order(rng)
        saved = self._load(opt, sched)
        if saved is not None:
            step, history, order = saved["step"], saved["history"], saved["order"]
            rng.bit_generator.state = saved["rng"]
            if "torch_rng" in saved:  # dropout (LoRA's) draws from it
                torch.set_rng_state(saved["torch_rng"])
            log.info("post-training: resuming at step %d/%d", step, self.steps)
        bar = progress(total=self.steps, initial=step, desc=f"train ({s.kind})", unit="step")
        was_training, t0, seen = self.model.training, time.time(), 0
        self.model.train()
        try:
            with trainable(self.params):
                while step < self.steps:
                    ids = self.windows[order[step]].to(self.params[0].device)
                    loss, parts = self._loss(ids, order[step])
                    if not loss.requires_grad:
                        raise RuntimeError("post-training: the loss has no gradient (hidden_of must run with autograd)")
                    loss.backward()
                    opt.step()
                    sched.step()
                    step, seen = step + 1, seen + ids.numel()
                    record = {"step": step, "loss": float(loss.detach()), **parts, "lr": sched.get_last_lr()[0]}
                    history.append(record)
                    self.log_fn(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{seen / (time.time() - t0):.0f}")
                    bar.update()
                    if step % s.checkpoint_every == 0 or step == self.steps:
                        self._save(opt, sched, step, history, order, rng)
        finally:
            bar.close()
            self.model.train(was_training)
        return {"steps": self.steps, "tokens": self.steps * s.batch * self.windows.shape[1], "history": history}

    def _order(self, rng: np.random.Generator) -> list[list[int]]:
        """Which windows each step trains on: passes over the windows in seeded random orders."""
        n, out = self.windows.shape[0], []
        while len(out) < self.steps:
            perm = rng.permutation(n).tolist()
            out += [perm[i: i + self.s.batch] for i in range(0, n - self.s.batch + 1, self.s.batch)] or [perm]
        return out[: self.steps]

    def _loss(self, ids: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, dict]:
        if self.s.kind == "finetune":
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss, {}
        h = self.hidden_of(ids)[:, :-1]
        z = self.head(h).float()
        with torch.no_grad():
            t = self.head(self.teacher_hidden[rows][:, :-1].to(h.device, h.dtype)).float()
            logp_t = F.log_softmax(t, -1)
        logq = F.log_softmax(z, -1)
        kl = (logp_t.exp() * (logp_t - logq)).sum(-1).mean()
        parts = {"kl": float(kl.detach())}
        if not self.s.ce_weight:
            return kl, parts
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))
        parts["ce"] = float(ce.detach())
        return kl + self.s.ce_weight * ce, parts

    def _schedule(self, opt):
        from transformers import get_scheduler  # the schedules users know, by name

        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.s.schedule]
        return get_scheduler(name, opt, num_warmup_steps=int(self.s.warmup * self.steps),
                             num_training_steps=self.steps)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _save(self, opt, sched, step, history, order, rng) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {"key": self.key, "version": TRAIN_VERSION, "step": step, "history": history, "order": order,
                 "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "params": [p.detach().clone() for p in self.params], "opt": opt.state_dict(),
                 "sched": sched.state_dict()}
        with atomic_path(self.out_dir / CHECKPOINT) as tmp:
            torch.save(state, tmp)

    def _load(self, opt, sched) -> dict | None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return None
        try:
            state = torch.load(path, weights_only=False)
        except Exception as ex:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise UserError(f"{path}: damaged ({type(ex).__name__}); delete it to train from the start") from ex
        if isinstance(state, dict) and state.get("version", 1) != TRAIN_VERSION:
            log.warning("%s: written by another evoexp training (version %s, this is %d): training from the start",
                        path, state.get("version", 1), TRAIN_VERSION)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise UserError(f"{path}: holds a training with other settings; delete it (or resume=false) to start over")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        return state
