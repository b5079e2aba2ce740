"""Putting database levels into the model (an `Applier`): only layers whose level changed are touched.

Searches switch a few layers per candidate, back and forth between a handful of levels: decoded weights are
kept in an LRU cache (bounded by `cache_gb`), so a level seen recently costs no decoding and no disk read. The
model gets its own copy of a cached level (see `evoexp.models.applier`), so at most one cache's worth of extra
memory, and nothing written to the model reaches the cache.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from evoexp.database.store import Database
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.applier import Applier, OwnedTensors


class LevelApplier(Applier):
    def __init__(self, adapter: DecoderAdapter, db: Database, cache_gb: float = 0.0):
        self.adapter, self.db = adapter, db
        self.current: dict[str, int] = {}
        self.owned = OwnedTensors()
        self.cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.cache_limit, self.cache_bytes = int(cache_gb * 2 ** 30), 0
        self.loads = 0  # decodes from the database (cache misses)

    def apply(self, levels: dict[str, int]) -> None:
        """Set each named layer to a level (an index into its grid)."""
        for name, level in levels.items():
            weight = self.adapter.module(name).weight
            if self.current.get(name) == level and not self.owned.written(weight):
                continue
            like = self.owned.originals.get(weight, weight.data)
            self.owned.install(weight, *self._weight(name, int(level), like))
            self.current[name] = level

    def _weight(self, name: str, level: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The level's weight, and whether it is this call's own tensor (not one the cache keeps)."""
        key = (name, level)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], False
        w = self.db.weight(name, level).to(like.device, like.dtype)
        self.loads += 1
        if not self.cache_limit:
            return w, True
        self.cache[key] = w
        self.cache_bytes += w.numel() * w.element_size()
        while self.cache_bytes > self.cache_limit and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()
        return w, False

    def restore(self) -> None:
        self.owned.restore()
        self.current.clear()
