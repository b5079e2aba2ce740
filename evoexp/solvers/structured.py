"""Structured solvers: remove whole input groups of a layer (attention heads on o_proj, neurons on down_proj).

A group is `group_size` consecutive input columns (head_dim for o_proj, 1 for down_proj). Every solver gives
one `StructuredLevel` per requested count of removed groups, and all levels of a layer are nested (each level
keeps a subset of the previous one's groups):

    solver = ZipLM(o_proj.weight, group_size=64)
    for x in inputs: solver.add_batch(x)
    lv0, lv3 = solver.compress([0, 3])          # 0 and 3 heads removed; lv3.kept ⊂ lv0.kept

- `ZipLM` (Kurtić et al. 2023, as DarwinLM runs it): one greedy structured-OBS path with weight compensation.
- Priors with no weight update, the starting points of Bonsai- and FLAP-style baselines: `WandaSP`
  (activation-weighted column magnitude), `StructMagnitude` (weights only) and `StructRandom` (seeded).
"""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
import zlib
from dataclasses import dataclass

import torch

from evoexp.errors import check_min
from evoexp.solvers.hessian import HessianAccumulator, prepare

__all__ = ["StructuredLevel", "ZipLM", "WandaSP", "StructMagnitude", "StructRandom", "ziplm_path", "group_columns"]


@dataclass
class StructuredLevel:
    """One level of a structured layer, stored compactly: the kept groups and their columns' weights."""

    kept: torch.Tensor  # sorted LongTensor of kept group indices
    weight: torch.Tensor  # out × (len(kept)·group_size): the kept columns, in the order of `kept`
    group_size: int
    removed: int  # groups removed (the level's count)

    def columns(self) -> torch.Tensor:
        """The input columns of the kept groups, ascending."""
        return group_columns(self.kept, self.group_size)

    def dense(self, in_features: int) -> torch.Tensor:
        """The full-width weight: kept columns in place, removed ones zero (an empty `kept` gives all zeros)."""
        out = self.weight.new_zeros((self.weight.shape[0], in_features))
        out[:, self.columns().to(out.device)] = self.weight
        return out


def group_columns(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Column indices of the given groups: group k covers columns k·g … k·g + g − 1."""
    offsets = torch.arange(group_size, device=groups.device)
    return (groups.long().unsqueeze(1) * group_size + offsets).reshape(-1)


def block_inverses(blocks: torch.Tensor) -> torch.Tensor:
    """(H⁻¹_GG)⁻¹ for a batch of diagonal blocks [m, g, g]: batched Cholesky inverses; a block the Cholesky
    rejects (fp32 round-off makes a nearly singular block indefinite) falls back to its pseudo-inverse."""
    L, info = torch.linalg.cholesky_ex(blocks)
    bad = info != 0
    if bad.any():
        L[bad] = torch.eye(blocks.shape[-1], dtype=L.dtype, device=L.device)  # placeholder, replaced below
    inv = torch.cholesky_inverse(L)
    if bad.any():
        inv[bad] = torch.linalg.pinv(blocks[bad], hermitian=True)
    return inv


def obs_costs(W: torch.Tensor, Hinv: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS cost of removing each group G with optimal compensation of the rest, ρ_G = Σ_rows w_G
    (H⁻¹_GG)⁻¹ w_Gᵀ, for all groups at once; also the block inverses (H⁻¹_GG)⁻¹ [m, g, g] the update needs."""
    m = Hinv.shape[0] // g
    if g == 1:  # neurons: H⁻¹_GG is the scalar diagonal entry
        d = Hinv.diagonal()
        return W.square().sum(0) / d, d.reciprocal().view(m, 1, 1)
    blocks = Hinv.view(m, g, m, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    B = block_inverses(blocks)
    Wg = W.view(W.shape[0], m, g).transpose(0, 1)  # [m, out, g]
    return (torch.bmm(Wg, B) * Wg).sum((1, 2)), B


def remove_group(W: torch.Tensor, Hinv: torch.Tensor, p: int, g: int, B: torch.Tensor) -> None:
    """Remove group p in place: W −= W_G (H⁻¹_GG)⁻¹ H⁻¹_{G,:} (the OBS compensation, which zeroes W_G), then
    the Schur downdate H⁻¹ −= H⁻¹_{:,G} (H⁻¹_GG)⁻¹ H⁻¹_{G,:}, so H⁻¹ stays the inverse of H on the kept columns.
    The removed block is reset to the identity so the batched block inverses stay well defined."""
    cols = slice(p * g, (p + 1) * g)
    rows = Hinv[cols].clone()  # H⁻¹_{G,:}
    W.addmm_(W[:, cols] @ B, rows, alpha=-1)  # in place: no out × n or n × n temporaries per step
    Hinv.addmm_(rows.T, B @ rows, alpha=-1)
    W[:, cols] = 0  # exact zero; round-off would leave ~1e-7 there
    Hinv[cols] = 0
    Hinv[:, cols] = 0
    Hinv[cols, cols] = torch.eye(g, dtype=Hinv.dtype, device=Hinv.device)


def compact(W: torch.Tensor, Hinv: torch.Tensor, alive: torch.Tensor, gone: torch.Tensor, g: int):
    """Drop the removed groups' columns (and rows of H⁻¹) so later steps work on smaller matrices."""
    keep = (~gone).nonzero().squeeze(1)
    cols = group_columns(keep, g)
    return W[:, cols], Hinv[cols][:, cols], alive[keep]


@torch.no_grad()
def ziplm_path(W: torch.Tensor, Hinv: torch.Tensor, counts: list[int], group_size: int = 1
               ) -> list[StructuredLevel]:
    """One greedy structured-OBS path (ZipLM): at each step remove the group with the least cost ρ_G,
    compensate the kept weights and downdate H⁻¹. Returns one level per count in sorted(set(counts)).

    `W` (dead columns already zeroed) and `Hinv` (the inverse of the damped Hessian) are not modified; the
    path runs in their dtype.
    Each step costs O(out·n + n²) on the current n kept columns (plus the batched g×g inverses for heads);
    removed columns are dropped every ~n/8 removals, so the whole path is about n³/3 instead of n³.
    """
    g, n_out = group_size, W.shape[0]
    W, Hinv = W.clone(), Hinv.clone()
    total = W.shape[1] // g
    alive = torch.arange(total, device=W.device)  # original index of every group still in the matrices
    gone = torch.zeros(total, dtype=torch.bool, device=W.device)  # removed since the last compaction
    removed, pending, levels = 0, 0, []
    for target in sorted(set(counts)):
        while removed < target:
            cost, B = obs_costs(W, Hinv, g)
            cost[gone] = float("inf")
            p = int(torch.argmin(cost))
            remove_group(W, Hinv, p, g, B[p])
            gone[p] = True
            removed, pending = removed + 1, pending + 1
            if pending * 8 >= len(alive):
                W, Hinv, alive = compact(W, Hinv, alive, gone, g)
                gone, pending = gone.new_zeros(len(alive)), 0
        keep = (~gone).nonzero().squeeze(1)
        weight = W.view(n_out, len(alive), g)[:, keep].reshape(n_out, len(keep) * g)
        levels.append(StructuredLevel(alive[keep].clone(), weight.clone(), g, removed))
    return levels


def check_counts(counts: list[int], total: int, name: str) -> list[int]:
    bad = [c for c in counts if not (isinstance(c, numbers.Integral) and 0 <= c <= total)]
    if bad:
        raise ValueError(f"{name or 'layer'}: counts of removed groups must be integers in 0..{total}, got {bad}")
    return sorted(set(counts))


class StructuredSolver:
    """Shared shape of the structured solvers (the `_Solver` interface): one object per layer, `add_batch(x)`
    with the layer's inputs, then `compress(counts)` -> one `StructuredLevel` per count of removed groups."""

    needs_data = True
    propagation: str | None = None
    true_sequential = False

    @staticmethod
    def check_config(cfg) -> None:
        """One-line UserErrors for settings the config schema cannot express, before the model loads."""

    def __init__(self, weight: torch.Tensor, name: str = "", group_size: int = 1,
                 device: torch.device | str | None = None, hessian: HessianAccumulator | None = None):
        self.W, self.name = weight.detach(), name
        cols = self.W.shape[1]
        if group_size < 1 or cols % group_size:
            raise ValueError(f"{name or 'layer'}: group_size {group_size} does not divide its {cols} input columns")
        self.group_size, self.groups = group_size, cols // group_size
        self.hessian = (hessian or HessianAccumulator(cols, device or self.W.device)) if self.needs_data else None

    def add_batch(self, inp: torch.Tensor) -> None:
        if self.hessian is not None:
            self.hessian.add_batch(inp)

    def level(self, kept: torch.Tensor, weight: torch.Tensor) -> StructuredLevel:
        return StructuredLevel(kept.cpu(), weight.to(self.W.dtype), self.group_size, self.groups - len(kept))


class ZipLM(StructuredSolver):
    """ZipLM structured OBS: one greedy path removes groups by least OBS cost and compensates the kept columns
    (levels nested). Dead inputs are zeroed and free to remove; H is damped and retried as in `prepare`."""

    def __init__(self, weight, name="", damp=0.01, group_size=1, device=None, hessian=None):
        super().__init__(weight, name, group_size, device, hessian)
        self.damp, self.damp_used = damp, None

    @staticmethod
    def check_config(cfg) -> None:
        check_min(cfg.damp, "solver.damp", 0)

    def compress(self, counts: list[int]) -> list[StructuredLevel]:
        want = check_counts(counts, self.groups, self.name)
        U, dead, self.damp_used = prepare(self.hessian.H, self.W, self.damp, name=self.name)
        Hinv = U.T @ U  # prepare returns the upper Cholesky factor of H⁻¹
        W = self.W.to(U.device, torch.float32).clone()
        W[:, dead] = 0  # a never-activated input: its weights never matter, so removing it costs nothing
        path = {lv.removed: lv for lv in ziplm_path(W, Hinv, want, self.group_size)}
        if 0 in path:  # nothing removed: the layer exactly as it was (dead columns included)
            path[0] = StructuredLevel(path[0].kept, self.W.to(U.device).clone(), self.group_size, 0)
        return [self.level(path[c].kept, path[c].weight) for c in counts]


class StructuredPrior(StructuredSolver, ABC):
    """A score per group, ranked once: count k removes the k lowest-scored groups and keeps the others'
    original weights (no update), so levels are nested. Ties break by group index (stable sort)."""

    @abstractmethod
    def scores(self) -> torch.Tensor:
        """One score per group; the lowest go first."""

    def compress(self, counts: list[int]) -> list[StructuredLevel]:
        check_counts(counts, self.groups, self.name)
        order = torch.sort(self.scores().cpu().float(), stable=True).indices
        levels = []
        for c in counts:
            kept = torch.sort(order[c:]).values
            levels.append(self.level(kept, self.W[:, group_columns(kept, self.group_size).to(self.W.device)]))
        return levels


class WandaSP(StructuredPrior):
    """Wanda-sp / Bonsai's `wanda` prior: per input column, mean_rows |W_rc| · RMS_tokens(x_c), averaged over a
    group's columns. A dead input (RMS 0) scores 0 and goes first."""

    def scores(self) -> torch.Tensor:
        acc = self.hessian
        rms = (acc.sq_norm / max(acc.tokens, 1)).sqrt()
        per_col = self.W.float().abs().mean(0) * rms.to(self.W.device)
        return per_col.view(self.groups, self.group_size).mean(1)


class StructMagnitude(StructuredPrior):
    """Data-free magnitude prior: the Frobenius norm ‖W[:, G]‖_F of a group's columns. Removing G without
    compensation changes the output by W_G x_G, whose mean square is exactly ‖W_G‖_F² for white inputs
    (H ∝ I): the L2 norm is the layer error this prior assumes, the L1 norm has no such reading."""

    needs_data = False

    def scores(self) -> torch.Tensor:
        return self.W.float().square().sum(0).view(self.groups, self.group_size).sum(1).sqrt()


class StructRandom(StructuredPrior):
    """Random prior: a seeded permutation of the groups. The layer name is mixed into the seed so that layers
    of the same shape do not all lose the same indices."""

    needs_data = False

    def __init__(self, weight, name="", seed=0, group_size=1, device=None, hessian=None):
        super().__init__(weight, name, group_size, device, hessian)
        self.seed = seed

    @staticmethod
    def check_config(cfg) -> None:
        check_min(cfg.seed, "solver.seed", 0)

    def scores(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.name.encode()))
        return torch.randperm(self.groups, generator=gen).float()
