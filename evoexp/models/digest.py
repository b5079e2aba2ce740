"""What a model computes, as one digest: evaluations of equal digests are equal, so they are computed once.

Two runs often hold the same compressed model: uniform levels or a prior-only pruning at every seed of a sweep,
a baseline repeated across experiments. The digest covers everything the forward depends on: every parameter's
and buffer's name, dtype, shape and bytes, the module tree (each module's name and class, and its plain
attributes: head counts, groupings, flags) and the model config. A model with forward hooks gets no digest (a
hook can change the output without changing any of that), and nothing is cached for it.
"""
from __future__ import annotations

import hashlib
import json

from torch import nn
from torch.nn.modules import module as module_globals

from evoexp.tensorfiles import tensor_bytes

PLAIN = (bool, int, float, str, type(None))
DIGEST_VERSION = 1


def _plain_attributes(m: nn.Module) -> dict:
    """A module's own settings (num_heads, head_dim, layer_idx, ...): scalars and small tuples / lists of them."""
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, PLAIN) or (isinstance(v, (tuple, list)) and len(v) <= 4096
                                    and all(isinstance(x, PLAIN) for x in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _hooked(model: nn.Module) -> bool:
    if any(getattr(module_globals, name, None) for name in
           ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def state_digest(model: nn.Module) -> str | None:
    """sha256 of what `model` computes (see the module doc); None where a forward hook is registered."""
    if _hooked(model):
        return None
    h = hashlib.sha256(f"evoexp-state-v{DIGEST_VERSION}".encode())
    config = getattr(model, "config", None)
    tree = {"config": config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else None,
            "modules": [[name, type(m).__module__ + "." + type(m).__qualname__, _plain_attributes(m)]
                        for name, m in model.named_modules()]}
    h.update(json.dumps(tree, sort_keys=True, default=repr).encode())
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            h.update(json.dumps([kind, name, str(t.dtype), list(t.shape)]).encode())
            h.update(tensor_bytes(t))
    return h.hexdigest()
