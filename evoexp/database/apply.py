"""Putting database levels into the model: only layers whose level changed are touched, originals kept."""
from __future__ import annotations

import torch

from evoexp.database.store import Database
from evoexp.models.adapter import DecoderAdapter


class LevelApplier:
    def __init__(self, adapter: DecoderAdapter, db: Database):
        self.adapter, self.db = adapter, db
        self.current: dict[str, int] = {}
        self.originals: dict[str, torch.Tensor] = {}

    def apply(self, levels: dict[str, int]) -> None:
        """Set each named layer to a level (an index into its grid)."""
        for name, level in levels.items():
            if self.current.get(name) == level:
                continue
            module = self.adapter.module(name)
            original = self.originals.setdefault(name, module.weight.data)
            module.weight.data = self.db.weight(name, int(level)).to(original.device, original.dtype)
            self.current[name] = level

    def restore(self) -> None:
        for name, w in self.originals.items():
            self.adapter.module(name).weight.data = w
        self.originals.clear()
        self.current.clear()
