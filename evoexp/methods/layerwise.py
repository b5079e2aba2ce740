"""Level grids for per-layer sparsity and bit-widths, the level spaces searches walk over them, and an
allocation (a level of every layer of one database)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from evoexp.database import Database
from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.search.space import LevelSpace
from evoexp.solvers.quant import MAX_BITS



@dataclass
class Allocation:
    """A level (index into the database grid) for every layer."""

    db: Database
    levels: dict[str, int]
    info: dict = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        return {name: self.db.spec.grid[name][i] for name, i in self.levels.items()}


def per_block(layers: list[LinearInfo], values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Level value of every projection per block (for profiles and plots)."""
    out: dict[str, dict[str, float]] = {}
    for li in layers:
        out.setdefault(str(li.block), {})[li.short] = values[li.name]
    return out


def units(adapter: DecoderAdapter) -> list[LinearInfo]:
    """The compressible layers: every linear of every block (embeddings and the head stay dense)."""
    return adapter.linears()


def check_sparse(method, layers: list[LinearInfo]) -> None:
    if not 0.0 <= method.target < 1.0:
        raise UserError(f"method.target: a sparsity in [0, 1) is expected, got {method.target}")
    if method.nm is None:
        return
    if len(method.nm) != 2 or not 0 < method.nm[0] < method.nm[1]:
        raise UserError(f"method.nm: expected [n, m] with 0 < n < m, got {list(method.nm)}")
    n, m = method.nm
    if not math.isclose(method.target, n / m):
        raise UserError(f"method.nm: {n}:{m} prunes exactly {n / m:g} of the weights, but method.target is "
                        f"{method.target} (set method.target={n / m:g})")
    bad = [li for li in layers if li.in_features % m]
    if bad:
        raise UserError(f"method.nm: {bad[0].name} has {bad[0].in_features} inputs, not a multiple of m={m}")


def check_quant(method) -> None:
    bad = [b for b in method.levels if not (isinstance(b, int) and 1 <= b <= MAX_BITS)]
    if bad or not method.levels:
        raise UserError(f"method.levels: bit-widths between 1 and {MAX_BITS} expected, got {list(method.levels)}")


def uniform_grid(method, layers: list[LinearInfo]) -> dict[str, list]:
    """One level per layer, the target: the standard one-shot pipelines."""
    if method.kind == "sparse":
        check_sparse(method, layers)
        return {li.name: [float(method.target)] for li in layers}
    check_quant(method)
    if float(method.target) != int(method.target) or not 1 <= method.target <= MAX_BITS:
        raise UserError(f"method.target: search=uniform needs a whole bit-width between 1 and {MAX_BITS}, got "
                        f"{method.target} (fractional targets need a search over bit-widths)")
    return {li.name: [int(method.target)] for li in layers}


# --- level spaces for the searches (EvoPress, random, OWL, DP) ------------------------------------------------
@dataclass
class LayerLevels:
    """A search space over per-layer levels and the database grid behind it.

    A search state holds one integer level per unit; `layers_of(state)` turns it into {layer: grid index}.
    Sparse: unit = layer, level ℓ means exactly z0 + ℓ·step zeros, so any ±1 switch keeps the total count of
    non-zeros. Quant: unit = layer (or a tied q/k/v or gate/up group), level = index into the bit-widths, and
    switches stay within groups of equal size, so the total number of bits is kept.
    """

    space: LevelSpace
    grid: dict[str, list]  # layer -> level values (sparsities or bit-widths) in level order
    unit_layers: list[list[str]]  # layers each unit sets
    offset: np.ndarray  # grid index = level - offset (the unit's lowest level)
    numel: np.ndarray  # weights per unit

    def layers_of(self, state: np.ndarray) -> dict[str, int]:
        return {name: int(state[u] - self.offset[u]) for u, names in enumerate(self.unit_layers) for name in names}

    def values(self, state: np.ndarray) -> dict[str, float]:
        return {name: self.grid[name][i] for name, i in self.layers_of(state).items()}


def default_step(target: float, hidden: int, num_levels: int) -> int:
    """EvoPress's default level step in weights: 0.5 · min(s, 1 − s) / L · hidden²."""
    return max(1, int(0.5 * min(target, 1 - target) / num_levels * hidden * hidden))


def sparse_levels(layers: list[LinearInfo], target: float, step: int, num_levels: int) -> LayerLevels:
    """Equal parameter steps around the target: level ℓ of a layer with N weights prunes round(sN) + ℓ·step."""
    if step < 1:
        raise UserError(f"method.step: a positive number of weights per level is expected, got {step}")
    names, lo, hi, grid, numel = [], [], [], {}, []
    for li in layers:
        n = li.numel
        z0 = round(target * n)
        a, b = -min(z0 // step, num_levels), min((n - z0) // step, num_levels)
        names.append(li.name)
        lo.append(a)
        hi.append(b)
        numel.append(n)
        grid[li.name] = [(z0 + lvl * step) / n for lvl in range(a, b + 1)]
    blocks = [li.block for li in layers]
    space = LevelSpace(names, np.array(lo), np.array(hi), [np.arange(len(layers))], [0], blocks)
    return LayerLevels(space, grid, [[n] for n in names], np.array(lo), np.array(numel))


TIES = {"attn_in": "qkv", "mlp_in": "gate_up"}  # projections serving engines fuse share one bit-width


def quant_levels(layers: list[LinearInfo], target: float, bits: list[int], group_rule: str = "size",
                 tied: bool = False, state_sums: list[int] | None = None) -> LayerLevels:
    """Bit-width levels; switch groups by unit size (`size`), projection name (`name`) or none (`none`: one
    group, each unit weighted by its size, so a switch trades exactly equal numbers of bits).

    An integer target fixes every group's budget at target bits per weight. For a fractional target the per-group
    budgets come from a start state (`state_sums`, see `group_sums`), as in EvoPress where they are whatever the
    best random initial allocation spent."""
    bits = sorted(bits)
    if bits != list(range(bits[0], bits[-1] + 1)):
        raise UserError(f"method.levels: consecutive bit-widths are expected (a level switch moves one bit), "
                        f"got {bits}")
    if group_rule not in ("size", "name", "none"):
        raise UserError(f"method.group_rule: expected size, name or none, got {group_rule!r}")
    units: dict[tuple, list[LinearInfo]] = {}
    for li in layers:
        key = (li.block, TIES[li.role]) if tied and li.role in TIES else (li.block, li.short)
        units.setdefault(key, []).append(li)
    unit_list = list(units.values())
    numel = np.array([sum(li.numel for li in u) for u in unit_list])
    weights = None
    if group_rule == "none":
        labels = [0] * len(unit_list)
        weights = numel // math.gcd(*numel.tolist())
    else:
        labels = [numel[i] if group_rule == "size" else key[1] for i, key in enumerate(units)]
    groups = [np.flatnonzero(np.array([lab == g for lab in labels])) for g in dict.fromkeys(labels)]
    base = bits[0]
    if state_sums is None:
        if target != int(target):
            raise UserError(f"method.target: {target} bits is fractional; it needs start-state budgets")
        per_unit = np.ones(len(unit_list), dtype=np.int64) if weights is None else weights
        targets = [int(per_unit[g].sum() * (int(target) - base)) for g in groups]
    else:
        targets = [int(t) for t in state_sums]
    size = len(unit_list)
    space = LevelSpace([u[0].name if len(u) == 1 else "+".join(li.short for li in u) + f"@{u[0].block}"
                        for u in unit_list], np.zeros(size), np.full(size, len(bits) - 1), groups, targets,
                       [u[0].block for u in unit_list], weights=weights)
    grid = {li.name: list(bits) for li in layers}
    return LayerLevels(space, grid, [[li.name for li in u] for u in unit_list], np.zeros(size, dtype=np.int64),
                       numel)


def group_sums(space: LevelSpace, state: np.ndarray) -> list[int]:
    """What a state spends in each switch group: the budgets a space built around it holds fixed."""
    return [space.spent(state, g) for g in space.groups]


def fractional_start(levels: LayerLevels, target: float, bits: list[int], rng: np.random.Generator) -> np.ndarray:
    """EvoPress's start for fractional bit targets: every unit at ceil(target), then random units (group chosen
    in proportion to its size in units) lowered one bit at a time until the mean is at most the target."""
    base = min(bits)
    state = np.full(levels.space.size, math.ceil(target) - base, dtype=np.int64)
    budget = target * levels.numel.sum()
    groups = levels.space.groups
    weights = np.array([len(g) for g in groups], dtype=float)
    while ((state + base) * levels.numel).sum() > budget + 1e-9:
        g = groups[rng.choice(len(groups), p=weights / weights.sum())]
        lowerable = g[state[g] > 0]
        if lowerable.size:
            state[lowerable[rng.integers(lowerable.size)]] -= 1
    return state


def bits_of(levels: LayerLevels, state: np.ndarray, base: int) -> float:
    return float(((state + base) * levels.numel).sum() / levels.numel.sum())
