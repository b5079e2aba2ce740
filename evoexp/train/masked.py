"""AdamW over parameters whose pruned entries must stay pruned.

    opt = MaskedAdamW(params, masks, lr=1e-5, protect=True)
    loss.backward(); opt.step()          # pruned entries: no update, still exactly zero

With `protect`, each parameter with a mask (True: the entry stays) gets its gradient masked, so its Adam moments at
pruned entries stay 0 and decoupled weight decay keeps a zero at zero; the mask is re-applied after the step all
the same (exact zeros whatever the arithmetic did). A parameter stored in a lower precision (bf16) trains on an
fp32 master copy that is written back after each step: Adam steps of ~1e-5 are below half a bf16 ulp of typical
weights and would otherwise round away. Without `protect` every entry trains, in the parameter's own dtype (the
released DarwinLM code's behaviour).
"""
from __future__ import annotations

import torch
from torch import nn


class MaskedAdamW:
    def __init__(self, params: list[nn.Parameter], masks: dict[nn.Parameter, torch.Tensor], lr: float,
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), protect: bool = True):
        self.params = params
        self.masters = [p.detach().float().clone() if protect and p.dtype != torch.float32 else p for p in params]
        self.keep = [masks.get(p) if protect else None for p in params]
        for m in self.masters:
            m.requires_grad_(True)
        # foreach: one fused update over all tensors, not a Python loop over them
        self.opt = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)

    def step(self) -> None:
        """One update from the parameters' gradients (then cleared)."""
        for p, m, k in zip(self.params, self.masters, self.keep):
            if p.grad is None:
                continue
            g = p.grad if m is p else p.grad.float()
            m.grad = g * k if k is not None else g  # a pruned entry gets no update
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m, k in zip(self.params, self.masters, self.keep):
                if k is not None:
                    m.mul_(k)
                if m is not p:
                    p.copy_(m)
                p.grad = None

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(),
                "masters": [m.detach().clone() if m is not p else None for p, m in zip(self.params, self.masters)]}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            for m, saved in zip(self.masters, state["masters"]):
                if saved is not None:
                    m.copy_(saved)


def trainable(params: list[nn.Parameter]):
    """Context: `params` require gradients inside it, and get their flags back after (grads cleared)."""
    return _Trainable(params)


class _Trainable:
    def __init__(self, params):
        self.params, self.flags = params, [p.requires_grad for p in params]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.grad = None
            p.requires_grad_(flag)
        return False
