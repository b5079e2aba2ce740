"""The applier contract shared by every method that puts a compression state into a model in place.

An applier is made once per model (per-level weights: once per database) and then
- `apply(state)`: the model now computes `state`; only what changed since the last call is touched, because
  searches switch a few units per candidate;
- `restore()`: the model is exactly the one the applier was made on (the same tensors and modules).

It owns what it installs. A tensor it puts into the model is its own (never a cached database tensor, never the
dense weights that `restore()` puts back), so writes to the model afterwards — fine-tuning a candidate in place —
change nothing the applier or a later candidate reads; and `apply` re-installs a unit whose installed tensor was
written to since (seen by the parameter's version counter, which in-place ops and optimizer steps advance; a
write through `param.data` bypasses it, so train parameters, not their `.data`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Applier(ABC):
    @abstractmethod
    def apply(self, state: Any) -> None:
        """Put `state` into the model."""

    @abstractmethod
    def restore(self) -> None:
        """Give the model back exactly as it was before the first `apply`."""


class OwnedTensors:
    """Installs tensors into parameters as the installer's own copies and puts the originals back on restore.

    `install(param, value, owned)`: `owned=False` means `value` is shared (e.g. kept in a cache), so a copy is
    installed; a tensor made for this call alone (`owned=True`) is installed as it is.
    """

    def __init__(self):
        self.originals: dict[nn.Parameter, torch.Tensor] = {}
        self.versions: dict[nn.Parameter, int] = {}

    def install(self, param: nn.Parameter, value: torch.Tensor, owned: bool) -> None:
        self.originals.setdefault(param, param.data)
        param.data = value if owned else value.clone()
        self.versions[param] = param._version

    def written(self, param: nn.Parameter) -> bool:
        """Whether the tensor installed in `param` was modified in place since it was installed."""
        return param in self.versions and param._version != self.versions[param]

    def restore(self) -> None:
        for param, original in self.originals.items():
            param.data = original
        self.originals.clear()
        self.versions.clear()
