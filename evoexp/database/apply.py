"""Putting database levels into the model: only layers whose level changed are touched, originals kept.

Searches switch a few layers per candidate, back and forth between a handful of levels: decoded weights are
kept in an LRU cache (bounded by `cache_gb`), so a level seen recently costs no decoding and no disk read.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from evoexp.database.store import Database
from evoexp.models.adapter import DecoderAdapter


class LevelApplier:
    def __init__(self, adapter: DecoderAdapter, db: Database, cache_gb: float = 0.0):
        self.adapter, self.db = adapter, db
        self.current: dict[str, int] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.cache_limit, self.cache_bytes = int(cache_gb * 2 ** 30), 0
        self.loads = 0  # decodes from the database (cache misses)

    def apply(self, levels: dict[str, int]) -> None:
        """Set each named layer to a level (an index into its grid)."""
        for name, level in levels.items():
            if self.current.get(name) == level:
                continue
            module = self.adapter.module(name)
            original = self.originals.setdefault(name, module.weight.data)
            module.weight.data = self._weight(name, int(level), original)
            self.current[name] = level

    def _weight(self, name: str, level: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, level)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        w = self.db.weight(name, level).to(like.device, like.dtype)
        self.loads += 1
        if self.cache_limit:
            self.cache[key] = w
            self.cache_bytes += w.numel() * w.element_size()
            while self.cache_bytes > self.cache_limit and len(self.cache) > 1:
                _, old = self.cache.popitem(last=False)
                self.cache_bytes -= old.numel() * old.element_size()
        return w

    def restore(self) -> None:
        for name, w in self.originals.items():
            self.adapter.module(name).weight.data = w
        self.originals.clear()
        self.current.clear()
