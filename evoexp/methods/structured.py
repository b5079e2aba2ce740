"""Structured pruning's units, budgets and level spaces (method=structured): whole heads and neurons per block.

The units are every block's o_proj and down_proj. Level ℓ of an o_proj removes ℓ·`method.attn_step` query heads
(its input columns, head_dim each; with `method.kv_groups` whole KV groups: their query heads and K/V head), of a
down_proj ℓ·step neurons (one input column each), step = `method.mlp_step` or the width in `method.mlp_levels`
equal steps. Zeroing those columns is exactly the removal: a removed head's q rows (a neuron's gate / up rows)
then no longer reach the output, so the model computes what the physically shrunk one does.

The budget is in parameters. A level step removes `step_params`: per head its q rows (and q bias) and o_proj
columns (without GQA its own k and v rows too, which always go with it), per neuron its gate and up rows (and biases) and down_proj column, per KV group its query heads plus
its k and v rows. `method.target` is a fraction of the decoder blocks' parameters (every parameter of their
attention and MLP sub-blocks, norms included; embeddings and the head excluded). `budget=group` (DarwinLM):
attention and MLP each remove the whole number of steps nearest to target × their own parameters, and switches
stay within attention or within MLP. `budget=params`: the same total, pooled, and a switch may trade attention
for MLP steps in exactly equal parameter amounts. Every state of either space removes exactly the same number of
unit parameters; a K/V head whose last query head goes (and the norm of a sub-block with nothing left) goes with
it on top, which `measure_structured` counts from the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from evoexp.errors import UserError
from evoexp.methods.layerwise import LayerLevels
from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.models.heads import BlockGeometry, BlockState, StructuredState, geometry, removed_params
from evoexp.search.space import LevelSpace

PARTS = ("attn", "mlp")


@dataclass(frozen=True)
class StructuredUnit(LinearInfo):
    """An o_proj (part attn) or down_proj (part mlp) as a unit of the level space."""

    part: str = "attn"
    group_size: int = 1  # input columns per group: head_dim (a head), head_dim x queries per KV head, 1 (a neuron)
    step: int = 1  # groups removed per level
    top: int = 0  # highest level
    step_params: int = 0  # parameters one level removes
    part_params: int = 0  # parameters of the unit's whole sub-block in its block (the group rule's base)


def attn_step_of(method, units: int, what: str = "query heads") -> int:
    if units % method.attn_step:
        raise UserError(f"method.attn_step: {method.attn_step} does not divide the {units} {what} of a block "
                        f"(choose a divisor of {units})")
    return method.attn_step


def mlp_step_of(method, width: int) -> int:
    if method.mlp_step is not None:
        if width % method.mlp_step:
            raise UserError(f"method.mlp_step: {method.mlp_step} neurons do not divide the MLP width {width} "
                            f"(choose a divisor of {width})")
        return method.mlp_step
    if width % method.mlp_levels:
        raise UserError(f"method.mlp_levels: {method.mlp_levels} equal steps do not divide the MLP width {width} "
                        f"(choose a divisor of {width}, or set method.mlp_step)")
    return width // method.mlp_levels


def attention_groups(g: BlockGeometry, kv_groups: bool) -> tuple[int, int, int]:
    """(input columns per group, groups, parameters per group) of a block's o_proj. Without GQA (one query head
    per K/V head) a removed query head always takes its K/V head along, so its step counts both."""
    if not kv_groups:
        return g.head_dim, g.num_q_heads, g.head_params + (0 if g.is_gqa else g.kv_head_params)
    per = g.num_q_heads // g.num_kv_heads
    if g.num_q_heads % g.num_kv_heads or g.kv_of_q != tuple(h // per for h in range(g.num_q_heads)):
        raise UserError(f"method.kv_groups: block {g.block} has uneven KV groups (a shrunk model); set "
                        "method.kv_groups=false to remove query heads")
    return g.head_dim * per, g.num_kv_heads, per * g.head_params + g.kv_head_params


def structured_units(geoms: list[BlockGeometry], method) -> list[StructuredUnit]:
    """Every block's o_proj and down_proj as units, in block order. A sub-block with an output bias keeps one
    step at least: masking leaves the bias, which only physically dropping the sub-block would remove."""
    if method.kv_groups and not any(g.is_gqa for g in geoms):
        g = geoms[0]
        raise UserError(f"method.kv_groups: KV-group removal needs a GQA model (block 0 has {g.num_q_heads} query "
                        f"heads and {g.num_kv_heads} KV heads); set method.kv_groups=false to remove query heads")
    out = []
    for g in geoms:
        size, groups, per_group = attention_groups(g, method.kv_groups)
        a = attn_step_of(method, groups, "KV groups" if method.kv_groups else "query heads")
        m = mlp_step_of(method, g.mlp_width)
        attn = g.num_q_heads * g.head_params + g.num_kv_heads * g.kv_head_params + g.attn_fixed
        mlp = g.mlp_width * g.neuron_params + g.mlp_fixed
        q_width = g.num_q_heads * g.head_dim
        out += [StructuredUnit(g.attn_out, g.block, "o_proj", "attn_out", q_width, g.hidden, "attn", size, a,
                               groups // a - g.o_bias, a * per_group, attn),
                StructuredUnit(g.mlp_out, g.block, "down_proj", "mlp_out", g.mlp_width, g.hidden, "mlp", 1, m,
                               g.mlp_width // m - g.mlp_out_bias, m * g.neuron_params, mlp)]
    return out


@dataclass(frozen=True)
class Budget:
    """What every allocation removes, in level steps per part, and the parameters behind them."""

    steps: tuple[int, int]  # attention, MLP
    step_params: tuple[int, int]
    part_params: tuple[int, int]  # all blocks' attention / MLP parameters
    pooled: bool

    @property
    def params(self) -> int:
        return sum(s * w for s, w in zip(self.steps, self.step_params))

    @property
    def block_params(self) -> int:
        return sum(self.part_params)


def structured_budget(units: list[StructuredUnit], method) -> Budget:
    """Each part removes the whole number of steps nearest to target × its parameters (halves round up)."""
    steps, weights, totals = [], [], []
    for part in PARTS:
        mine = [u for u in units if u.part == part]
        sizes = sorted({u.step_params for u in mine})
        if len(sizes) > 1:
            raise UserError(f"method.mlp_levels: blocks have MLP widths {sorted({u.in_features for u in mine})}, so "
                            "equal level counts are unequal parameter steps; set method.mlp_step to a neuron count "
                            "dividing every width")
        total, room = sum(u.part_params for u in mine), sum(u.top for u in mine)
        n = math.floor(method.target * total / sizes[0] + 0.5)
        if n > room:
            what = "KV groups" if part == "attn" and method.kv_groups else "heads" if part == "attn" else "neurons"
            raise UserError(f"method.target: {method.target} removes {n * sizes[0]:,} {part} parameters, more than "
                            f"the removable {what} hold ({room * sizes[0]:,}, {room * sizes[0] / total:.3f} of the "
                            f"{part} parameters); lower it")
        steps.append(n)
        weights.append(sizes[0])
        totals.append(total)
    return Budget(tuple(steps), tuple(weights), tuple(totals), method.budget == "params")


def spread(steps: int, hi: np.ndarray) -> np.ndarray:
    """`steps` levels over units capped at `hi`, as evenly as the caps allow: every unit at one common level (or
    its cap), and the steps left one each to evenly spaced units among those with room."""
    level = 0
    while level < hi.max(initial=0) and np.minimum(hi, level + 1).sum() <= steps:
        level += 1
    state = np.minimum(hi, level).astype(np.int64)
    left = steps - int(state.sum())
    room = np.flatnonzero(state < hi)
    if left:
        state[room[(np.arange(left) * len(room) + len(room) // 2) // left]] += 1
    return state


@dataclass
class StructuredSpace(LevelSpace):
    """The level space of structured units: `uniform_state` spreads each part's steps evenly over the blocks, and
    with one pooled group a switch either swaps a step within a part or trades attention for MLP steps (or back)
    in exactly equal parameter amounts (lcm of the two step sizes)."""

    part: np.ndarray = field(default=None)  # 0: attention unit, 1: MLP unit
    part_steps: tuple[int, int] = (0, 0)  # the per-group budget in steps (the uniform spread's)

    def uniform_state(self) -> np.ndarray:
        state = self.lo.copy()
        for p, steps in enumerate(self.part_steps):
            idx = np.flatnonzero(self.part == p)
            state[idx] = spread(steps, self.hi[idx])
        return state

    def switch(self, state: np.ndarray, rng: np.random.Generator) -> bool:
        if len(self.groups) > 1:
            return super().switch(state, rng)
        up_part = int(rng.integers(2))
        down_part = up_part if rng.random() < 0.5 else 1 - up_part
        units = [np.flatnonzero(self.part == p) for p in (up_part, down_part)]
        w_up, w_down = (int(self.weights[u[0]]) for u in units)
        lcm = w_up * w_down // math.gcd(w_up, w_down)
        trial = state.copy()
        for units_of, sign, count in ((units[0], 1, lcm // w_up), (units[1], -1, lcm // w_down)):
            for _ in range(count):
                free = units_of[trial[units_of] < self.hi[units_of]] if sign > 0 else \
                    units_of[trial[units_of] > self.lo[units_of]]
                if free.size == 0:
                    return False
                trial[free[rng.integers(free.size)]] += sign
        if np.array_equal(trial, state):
            return False
        state[:] = trial
        return True


def structured_levels(units: list[StructuredUnit], method) -> LayerLevels:
    """The level space (see the module docstring) and the database grid behind it: level ℓ of a unit is
    ℓ·step groups removed, ℓ = 0..top."""
    budget = structured_budget(units, method)
    part = np.array([PARTS.index(u.part) for u in units])
    hi = np.array([u.top for u in units])
    weights = None
    if budget.pooled:
        g = math.gcd(*budget.step_params)
        weights = np.array([u.step_params // g for u in units])
        groups, targets = [np.arange(len(units))], [budget.params // g]
    else:
        groups, targets = [np.flatnonzero(part == p) for p in range(2)], list(budget.steps)
    space = StructuredSpace([u.name for u in units], np.zeros(len(units)), hi, groups, targets,
                            [u.block for u in units], weights=weights, part=part, part_steps=budget.steps)
    grid = {u.name: [lvl * u.step for lvl in range(u.top + 1)] for u in units}
    return LayerLevels(space, grid, [[u.name] for u in units], np.zeros(len(units), dtype=np.int64),
                       np.array([u.numel for u in units]))


def uniform_values(units: list[StructuredUnit], method) -> dict[str, int]:
    """Groups removed per unit in the uniform spread (the one-shot pipeline's allocation)."""
    lv = structured_levels(units, method)
    return lv.values(lv.space.uniform_state())


# --- what a model holds --------------------------------------------------------------------------------------
def kept_state(adapter: DecoderAdapter, geoms: list[BlockGeometry]) -> StructuredState:
    """The heads and neurons the model's weights keep: a head (a neuron) is gone when all its o_proj (down_proj)
    input columns are zero."""
    blocks = []
    for g in geoms:
        o = adapter.module(g.attn_out).weight.detach()
        heads = (o != 0).view(o.shape[0], g.num_q_heads, g.head_dim).any(2).any(0)
        neurons = (adapter.module(g.mlp_out).weight.detach() != 0).any(0)
        blocks.append(BlockState(tuple(heads.nonzero().flatten().tolist()),
                                 tuple(neurons.nonzero().flatten().tolist())))
    return StructuredState(tuple(blocks))


def measure_structured(adapter: DecoderAdapter, kv_groups: bool = False) -> dict:
    """Parameters removed, counted from the model's weights: `unit_params` by the units' own parameters (what the
    budget counts), `removed_params` everything the shrunk model no longer has (freed K/V heads and emptied
    sub-blocks' norms included), as fractions of the decoder blocks' parameters too."""
    geoms = geometry(adapter)
    state = kept_state(adapter, geoms)
    units = 0
    for g, b in zip(geoms, state.blocks):
        units += (g.num_q_heads - len(b.heads)) * g.head_params + (g.mlp_width - len(b.neurons)) * g.neuron_params
        if kv_groups or not g.is_gqa:  # a KV group's, or (no GQA) a query head's own K/V head
            units += (g.num_kv_heads - len(b.kept_kv(g))) * g.kv_head_params
    blocks = sum(p.numel() for block in adapter.blocks for p in block.parameters())
    removed = removed_params(geoms, state)
    total = sum(p.numel() for p in adapter.model.parameters())
    return {"fraction": removed / blocks, "removed_params": removed, "unit_params": units,
            "unit_fraction": units / blocks, "block_params": blocks, "params": total - removed,
            "heads_kept": [len(b.heads) for b in state.blocks], "kv_heads_kept": [len(b.kept_kv(g))
                                                                             for g, b in zip(geoms, state.blocks)],
            "neurons_kept": [len(b.neurons) for b in state.blocks],
            "heads": [g.num_q_heads for g in geoms], "neurons": [g.mlp_width for g in geoms]}


def structured_summary(a: dict) -> str:
    return (f"{a['fraction']:.2%} of the decoder blocks' parameters removed ({a['removed_params'] / 1e6:.3f}M of "
            f"{a['block_params'] / 1e6:.3f}M; heads and neurons {a['unit_params'] / 1e6:.3f}M), "
            f"{sum(a['heads_kept'])}/{sum(a['heads'])} heads and {sum(a['neurons_kept'])}/{sum(a['neurons'])} "
            "neurons kept")


def check_geometry(method, config: dict | None) -> None:
    """The steps and kv_groups against a model's config.json before it loads (None or a shrunk model's config,
    whose layers differ: checked per block after the load)."""
    if not config or config.get("model_type") == "evoexp_hetero":
        return
    heads, width = config.get("num_attention_heads"), config.get("intermediate_size")
    kv = config.get("num_key_value_heads") or heads
    if method.kv_groups and heads and kv >= heads:
        raise UserError(f"method.kv_groups: KV-group removal needs a GQA model (the model has {heads} query heads "
                        f"and {kv} KV heads); set method.kv_groups=false to remove query heads")
    if heads:
        attn_step_of(method, kv if method.kv_groups else heads, "KV groups" if method.kv_groups else "query heads")
    if width:
        mlp_step_of(method, width)
