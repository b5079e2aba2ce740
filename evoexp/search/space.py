"""Level spaces: one integer level per unit, with the budget held exactly by construction.

Units are split into switch groups. Within a group the sum of levels is the budget: a level-switch raises one
unit and lowers another by the same step, so every reachable state spends exactly the same budget and no
repair step is ever needed. (Depth pruning: a group is the attention or the MLP sub-blocks, level 1 = dropped.
Sparsity: equal parameter steps make all layers one group. Quantization: layers of equal size form a group.)
A group may also weigh its units (`weights`, e.g. weights per bit for quantization with group_rule=none): the
budget is then the weighted sum, and a switch raises one unit and lowers others whose weights add up exactly.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from evoexp.errors import UserError


@dataclass
class LevelSpace:
    names: list[str]
    lo: np.ndarray  # lowest allowed level per unit
    hi: np.ndarray  # highest allowed level per unit
    groups: list[np.ndarray]  # unit indices per switch group
    targets: list[int]  # the fixed sum of levels of each group
    unit_block: np.ndarray  # decoder block of each unit (candidates are re-run from their first changed block)
    group_weights: np.ndarray = field(default=None)  # probability of choosing a group for a switch
    weights: np.ndarray = field(default=None)  # budget cost of one level per unit (default 1)

    def __post_init__(self):
        self.lo, self.hi = np.asarray(self.lo, dtype=np.int64), np.asarray(self.hi, dtype=np.int64)
        self.weights = (np.ones(len(self.names), dtype=np.int64) if self.weights is None
                        else np.asarray(self.weights, dtype=np.int64))
        if np.any(self.weights < 1):
            raise ValueError("LevelSpace.weights must be positive integers")
        self.unit_block = np.asarray(self.unit_block, dtype=np.int64)
        self.groups = [np.asarray(g, dtype=np.int64) for g in self.groups]
        if self.group_weights is None:
            self.group_weights = np.array([len(g) for g in self.groups], dtype=float)
        for g, t in zip(self.groups, self.targets):
            lo, hi = self.spent(self.lo, g), self.spent(self.hi, g)
            if not lo <= t <= hi:
                raise UserError(f"budget {t} is outside what units {[self.names[i] for i in g[:3]]}... allow "
                                f"({lo}..{hi})")

    @property
    def size(self) -> int:
        return len(self.names)

    def spent(self, state: np.ndarray, g: np.ndarray) -> int:
        return int((self.weights[g] * state[g]).sum())

    def feasible(self, state: np.ndarray) -> bool:
        return bool(np.all(state >= self.lo) and np.all(state <= self.hi)
                    and all(self.spent(state, g) == t for g, t in zip(self.groups, self.targets)))

    def switch(self, state: np.ndarray, rng: np.random.Generator) -> bool:
        """One level switch in place: +1 on one unit, -1 on another of the same group. False if none exists."""
        movable = [gi for gi, g in enumerate(self.groups)
                   if np.any(state[g] < self.hi[g]) and np.any(state[g] > self.lo[g])]
        if not movable:
            return False
        w = self.group_weights[movable]
        g = self.groups[movable[rng.choice(len(movable), p=w / w.sum())]]
        if np.any(self.weights[g] != self.weights[g[0]]):
            return self._weighted_switch(state, g, rng)
        up = g[state[g] < self.hi[g]]
        a = up[rng.integers(len(up))]
        down = g[(state[g] > self.lo[g]) & (g != a)]
        if down.size == 0:
            return False
        b = down[rng.integers(len(down))]
        state[a] += 1
        state[b] -= 1
        return True

    def _weighted_switch(self, state: np.ndarray, g: np.ndarray, rng: np.random.Generator) -> bool:
        """Move one unit a level (up or down at random), then move other units the other way until their
        weights add up to exactly the same amount. False (state untouched) when that cannot be done."""
        sign = 1 if rng.random() < 0.5 else -1
        first = g[state[g] < self.hi[g]] if sign > 0 else g[state[g] > self.lo[g]]
        if first.size == 0:
            return False
        a = first[rng.integers(first.size)]
        trial = state.copy()
        trial[a] += sign
        debt = int(self.weights[a])
        while debt > 0:
            room = trial[g] > self.lo[g] if sign > 0 else trial[g] < self.hi[g]
            other = g[room & (g != a) & (self.weights[g] <= debt)]
            if other.size == 0:
                return False
            b = other[rng.integers(other.size)]
            trial[b] -= sign
            debt -= int(self.weights[b])
        state[:] = trial
        return True

    def mutate(self, parent: np.ndarray, rng: np.random.Generator, max_switches: int = 3) -> np.ndarray:
        """A child with min(U{1..m}, U{1..m}) switches (P = 5/9, 3/9, 1/9 for m = 3, as in EvoPress)."""
        n = min(rng.integers(1, max_switches + 1), rng.integers(1, max_switches + 1))
        child = parent.copy()
        for _ in range(n):
            self.switch(child, rng)
        return child

    def random_state(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly spread feasible state: each group's budget handed out one step at a time at random."""
        state = self.lo.copy()
        for g, t in zip(self.groups, self.targets):
            for _ in range(1000):
                state[g] = self.lo[g]
                left = t - self.spent(state, g)
                while left > 0:
                    room = g[(state[g] < self.hi[g]) & (self.weights[g] <= left)]
                    if room.size == 0:
                        break
                    u = room[rng.integers(len(room))]
                    state[u] += 1
                    left -= int(self.weights[u])
                if left == 0:
                    break
            else:
                raise UserError(f"no random state spends the budget {t} of units {[self.names[i] for i in g[:3]]}...")
        return state

    def random_states(self, rng: np.random.Generator, n: int, max_tries: int = 100) -> list[np.ndarray]:
        """Up to `n` distinct random feasible states (fewer only if the space is that small)."""
        states, seen = [], set()
        for _ in range(max_tries * n):
            st = self.random_state(rng)
            if st.tobytes() not in seen:
                seen.add(st.tobytes())
                states.append(st)
                if len(states) == n:
                    break
        return states

    def uniform_state(self) -> np.ndarray:
        """Every unit of a group at the same level (the usual start for sparsity and integer bit targets)."""
        state = self.lo.copy()
        for g, t in zip(self.groups, self.targets):
            per_level = int(self.weights[g].sum())
            state[g] = t // per_level
            if t % per_level or not self.feasible_group(state, g):
                raise UserError("search.init=uniform: the budget cannot be split evenly; use search.init=random")
        return state

    def feasible_group(self, state: np.ndarray, g: np.ndarray) -> bool:
        return bool(np.all(state[g] >= self.lo[g]) and np.all(state[g] <= self.hi[g]))

    def count_states(self) -> int:
        if np.any(self.weights != 1):
            raise UserError("counting / enumerating states needs unweighted groups")
        total = 1
        for g, t in zip(self.groups, self.targets):
            total *= _count_sum(self.lo[g], self.hi[g], t)
        return total

    def all_states(self, limit: int):
        """Every feasible state (for brute force on small spaces)."""
        n = self.count_states()
        if n > limit:
            raise UserError(f"search=brute: the space has {n:,} states, more than search.max_states={limit:,}")
        per_group = [list(_vectors(self.lo[g], self.hi[g], t)) for g, t in zip(self.groups, self.targets)]
        for combo in itertools.product(*per_group):
            state = self.lo.copy()
            for g, vec in zip(self.groups, combo):
                state[g] = vec
            yield state


def _count_sum(lo: np.ndarray, hi: np.ndarray, total: int) -> int:
    ways = {0: 1}
    for a, b in zip(lo.tolist(), hi.tolist()):
        nxt: dict[int, int] = {}
        for s, c in ways.items():
            for v in range(a, b + 1):
                nxt[s + v] = nxt.get(s + v, 0) + c
        ways = nxt
    return ways.get(total, 0)


def _vectors(lo: np.ndarray, hi: np.ndarray, total: int):
    if len(lo) == 0:
        if total == 0:
            yield np.zeros(0, dtype=np.int64)
        return
    rest_lo, rest_hi = int(lo[1:].sum()), int(hi[1:].sum())
    for v in range(int(lo[0]), int(hi[0]) + 1):
        if rest_lo <= total - v <= rest_hi:
            for tail in _vectors(lo[1:], hi[1:], total - v):
                yield np.concatenate([[v], tail]).astype(np.int64)

