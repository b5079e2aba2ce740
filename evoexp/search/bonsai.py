"""Bonsai (Dery, Kolawole, Kagy, Smith, Neubig, Talwalkar 2024): structured pruning with forward passes only.

Rounds, each removing `prune_frac` of the original attention heads and of the original MLP neurons (attention and
MLP each at the target, as `method.budget=group`; the last round is clipped so the totals are exact):

1. a prior per unit of the current model (one forward pass: Wanda-sp, or magnitude, or random); in each module
   (a block's attention or MLP) the units with the lowest prior are this round's candidates, at least 2p of the
   module and one more than a sub-model drops; the others are fixed;
2. `sub_models` / 2 antithetic pairs of sub-models: each module drops int(p·n) + 1 of its candidates on
   average, each candidate independently with a chance ∝ (the module's highest prior − prior), kept within
   [0.05, 0.95]; the pair's other half drops the complement inside the candidate set. Each sub-model is scored
   by its perplexity on the calibration windows. (The authors drop exactly int(p·n) + 1 per module, which makes
   every module's count of kept candidates the same in every sub-model, so a constant added to one module's
   coefficients and taken from another's fits as well: only the L1 penalty then ranks units across modules.
   Varying the count makes those comparisons identifiable; the planted-coefficient test shows the difference.);
3. a global L1-regularised linear model of −PPL on the candidates' kept indicators (scikit-learn's Lasso), its
   strength chosen by k-fold mean Kendall τ (scipy) of held-out predictions, refit on every sub-model;
4. the candidates with the lowest coefficients (ties: lowest prior) go, up to the round's heads and neurons,
   and the model is rebuilt physically smaller for the next round.

`perturb=False` skips 2-3: each round removes the units with the lowest prior over the whole model (the
prior-only baseline; with the random prior, random pruning).

The engine sees the model only through `BonsaiModel`, so it runs on synthetic models in tests. It keeps what
each round removed in `<out_dir>/bonsai/rounds.json` and every scored sub-model in a `KeyedLog`: a killed run
resumes at the round, and inside it at the sub-model, where it stopped, with the same result.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from evoexp.utils import KeyedLog, progress, read_json, stable_hash, write_json

log = logging.getLogger(__name__)
HEAD, NEURON = 0, 1
PARTS = ("heads", "neurons")
ROUNDS_FILE = "rounds.json"


@dataclass
class BonsaiSettings:
    prune_frac: float = 0.05  # p: each round removes p of the original heads and of the original neurons
    sub_models: int = 200  # scored per round (sub_models / 2 antithetic pairs)
    folds: int = 5  # k of the k-fold choice of the L1 strength
    perturb: bool = True  # false: prior-only
    alphas: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01, 0.003)  # L1 strengths tried, as fractions of the smallest
    # strength that zeroes every coefficient
    ppl_cap: float = 1e8  # a sub-model's perplexity is capped (a broken one would dominate the fit)
    rounds_cap: int | None = None  # stop after this many rounds (short runs, tests); None: until the target
    seed: int = 0


@dataclass
class Units:
    """The prunable units of the current model: per unit its part (HEAD / NEURON), its module (a block's
    attention or MLP, numbered by the caller) and a stable id (block, part, original index) across rounds."""

    part: np.ndarray  # int, [n]
    module: np.ndarray  # int, [n]
    ids: list[tuple[int, int, int]]
    keep_one: frozenset[int] = frozenset()  # modules that must keep a unit (an output bias only removal leaves)

    def __len__(self) -> int:
        return len(self.ids)


class BonsaiModel(Protocol):
    def units(self) -> Units: ...

    def prior(self, round_index: int) -> np.ndarray:
        """One score per unit of `units()`; the lowest go first."""

    def perplexity(self, dropped: np.ndarray) -> float:
        """Perplexity of the current model without the units where `dropped` (bool, per unit) is True."""

    def remove(self, ids: list[tuple[int, int, int]]) -> None:
        """Remove these units for good (the model gets smaller)."""


def schedule(totals: tuple[int, int], removed: tuple[int, int], p: float) -> list[tuple[int, int]]:
    """Heads and neurons each round removes: p of the original count per round, cumulatively rounded, the last
    round clipped at the totals to remove (`removed`), so the sums are exact."""
    rounds = max(math.ceil(r / (p * t) - 1e-9) for r, t in zip(removed, totals) if t) if any(removed) else 0
    done = np.zeros((rounds + 1, 2), dtype=np.int64)
    for r in range(1, rounds + 1):
        done[r] = [min(want, round(r * p * t)) for want, t in zip(removed, totals)]
    done[-1] = removed
    return [tuple(int(v) for v in row) for row in np.diff(done, axis=0)]


def candidates(units: Units, prior: np.ndarray, p: float) -> tuple[np.ndarray, dict[int, int]]:
    """(candidate mask, drops per module): per module its lowest-prior units, at least ceil(2p·n) and one more
    than the int(p·n) + 1 a sub-model drops on average (all of them in a module that small)."""
    cand = np.zeros(len(units), dtype=bool)
    drops = {}
    for m in np.unique(units.module):
        idx = np.flatnonzero(units.module == m)
        n = len(idx)
        k = int(p * n) + 1
        size = min(n, max(math.ceil(2 * p * n), k + 1))
        cand[idx[np.argsort(prior[idx], kind="stable")[:size]]] = True
        drops[int(m)] = min(k, size)
    return cand, drops


def antithetic_pairs(units: Units, prior: np.ndarray, cand: np.ndarray, drops: dict[int, int], pairs: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[2 * pairs, n] bool, True = dropped: rows 2i and 2i + 1 drop complementary parts of the candidates."""
    out = np.zeros((2 * pairs, len(units)), dtype=bool)
    mods = [(m, np.flatnonzero(cand & (units.module == m))) for m in sorted(drops)]
    chance = {}
    for m, idx in mods:
        w = prior[units.module == m].max() - prior[idx] + 1e-12  # the lower the prior, the likelier the drop
        chance[m] = np.clip(drops[m] * w / w.sum(), 0.05, 0.95)
    for i in range(pairs):
        for m, idx in mods:
            out[2 * i, idx] = rng.random(len(idx)) < chance[m]
        out[2 * i + 1] = cand & ~out[2 * i]
    return out


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return -1.0 if tau is None or np.isnan(tau) else float(tau)


def fit_coefficients(kept: np.ndarray, y: np.ndarray, alphas: tuple[float, ...], folds: int, seed: int
                     ) -> tuple[np.ndarray, dict]:
    """An L1-regularised linear model y ≈ kept @ beta + b (Lasso), its strength the one of `alphas` (fractions
    of the strength that zeroes every coefficient) with the best mean Kendall τ over `folds` shuffled folds,
    refit on all rows. Returns beta and {alpha, tau per alpha}."""
    from sklearn.linear_model import Lasso
    from sklearn.model_selection import KFold

    X = kept.astype(np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    scale = y.std() or 1.0  # the fit on standardised targets: the same strengths for any perplexity scale
    z = (y - y.mean()) / scale
    alpha_max = float(np.abs((X - X.mean(0)).T @ z).max()) / n or 1.0
    taus = {}
    for frac in alphas:
        per_fold = []
        for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
            model = Lasso(alpha=frac * alpha_max, max_iter=5000).fit(X[train], z[train])
            per_fold.append(kendall_tau(model.predict(X[test]), z[test]))
        taus[frac] = float(np.mean(per_fold))
    best = max(alphas, key=lambda a: (taus[a], -a))  # ties: the weaker penalty
    beta = Lasso(alpha=best * alpha_max, max_iter=5000).fit(X, z).coef_ * scale
    return beta, {"alpha": best, "alpha_max": alpha_max, "tau": {str(a): t for a, t in taus.items()}}


def cut(units: Units, order: np.ndarray, counts: tuple[int, int]) -> list[int]:
    """The first `counts[part]` units of each part in `order`, never a module's last unit where it must keep one."""
    left = {m: int((units.module == m).sum()) for m in np.unique(units.module)}
    want, out = list(counts), []
    for i in order:
        part, m = int(units.part[i]), int(units.module[i])
        if want[part] and not (m in units.keep_one and left[m] == 1):
            out.append(int(i))
            want[part] -= 1
            left[m] -= 1
    if any(want):
        raise ValueError(f"bonsai: {want[HEAD]} heads and {want[NEURON]} neurons could not be removed this round")
    return out


class Bonsai:
    def __init__(self, settings: BonsaiSettings, model: BonsaiModel, totals: tuple[int, int],
                 removed: tuple[int, int], out_dir: Path, context: dict, on_round=None):
        """`totals`: the original heads and neurons; `removed`: how many of each the run removes. `context`: what
        the scores depend on besides the sub-model (model, calibration), so a rerun with others recomputes."""
        self.s, self.model, self.out_dir = settings, model, Path(out_dir) / "bonsai"
        self.plan = schedule(totals, removed, settings.prune_frac)
        what = {k: v for k, v in asdict(settings).items() if k != "rounds_cap"}  # a cap changes no round
        self.context = {"context": context, "settings": what, "plan": self.plan}
        self.on_round = on_round or (lambda _r: None)

    def run(self) -> list[dict]:
        rounds = self._resume()
        last = len(self.plan) if self.s.rounds_cap is None else min(len(self.plan), self.s.rounds_cap)
        for r in range(len(rounds), last):
            t0 = time.time()
            units = self.model.units()
            prior = self.model.prior(r)
            order, info = self._rank(r, units, prior) if self.s.perturb else (self._by_prior(units, prior), {})
            gone = [units.ids[i] for i in cut(units, order, self.plan[r])]
            self.model.remove(gone)
            record = {"round": r, "removed": [list(u) for u in gone], "heads": self.plan[r][HEAD],
                      "neurons": self.plan[r][NEURON], "seconds": round(time.time() - t0, 2), **info}
            rounds.append(record)
            write_json(self.out_dir / ROUNDS_FILE, {"context": stable_hash(self.context), "rounds": rounds})
            log.info("bonsai round %d/%d: %d heads and %d neurons removed (%.0f s%s)", r + 1, len(self.plan),
                     *self.plan[r], record["seconds"],
                     f", Kendall tau {max(info['tau'].values()):.3f}" if info else "")
            self.on_round(record)
        return rounds

    def _resume(self) -> list[dict]:
        path = self.out_dir / ROUNDS_FILE
        if not path.exists():
            return []
        saved = read_json(path, "delete it to prune from the start")
        if saved.get("context") != stable_hash(self.context):
            log.warning("%s: rounds of another setting; pruning from the start", path)
            return []
        for record in saved["rounds"]:
            self.model.remove([tuple(u) for u in record["removed"]])
        log.info("bonsai: resuming after round %d", len(saved["rounds"]))
        return saved["rounds"]

    @staticmethod
    def _by_prior(units: Units, prior: np.ndarray) -> np.ndarray:
        return np.argsort(prior, kind="stable")

    def _rank(self, r: int, units: Units, prior: np.ndarray) -> tuple[np.ndarray, dict]:
        """Candidates ordered by their coefficient (then prior), the fixed units after them by prior."""
        s = self.s
        cand, drops = candidates(units, prior, s.prune_frac)
        rng = np.random.Generator(np.random.PCG64([s.seed, r]))
        masks = antithetic_pairs(units, prior, cand, drops, s.sub_models // 2, rng)
        ppl = self._scores(r, units, masks)
        y = -np.minimum(ppl, s.ppl_cap)
        cols = np.flatnonzero(cand)
        beta, info = fit_coefficients(~masks[:, cols], y, s.alphas, s.folds, s.seed + r)
        key = np.full(len(units), np.inf)
        key[cols] = beta
        order = np.lexsort((prior, key))  # by coefficient, ties (and the fixed units) by prior
        return order, {**info, "candidates": int(cand.sum()), "ppl_median": float(np.median(ppl))}

    def _scores(self, r: int, units: Units, masks: np.ndarray) -> np.ndarray:
        """Each sub-model's perplexity, kept as it is computed (a rerun scores only what is missing)."""
        kept = KeyedLog(self.out_dir / f"round_{r}_scores.jsonl",
                        {**self.context, "round": r, "units": stable_hash(units.ids)}, field="ppl")
        out = np.empty(len(masks))
        bar = progress(total=len(masks), desc=f"bonsai round {r + 1}/{len(self.plan)}", unit="sub-model")
        try:
            for i, dropped in enumerate(masks):
                key = stable_hash(np.flatnonzero(dropped).tolist())
                if key not in kept.done:
                    kept.add(key, float(self.model.perplexity(dropped)))
                out[i] = kept.done[key]
                bar.update()
        finally:
            bar.close()
        return out
