"""Search schemas (`search=`): how levels are allocated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class UniformSearchCfg:
    """Every layer at the target level: the standard one-shot pipelines."""

    kind: str = "uniform"
    references: List[str] = field(default_factory=list)


@dataclass
class NoSearchCfg:
    kind: str = "none"


@dataclass
class StageCfg:
    survivors: int = 1
    tokens: int = 2048


@dataclass
class EvoPressCfg:
    kind: str = "evopress"
    # null: the method's default (depth pruning: k(n-k)/1.5; sparsity 400; quantization 150)
    generations: Optional[int] = None
    offspring: int = 32
    stages: List[StageCfg] = field(default_factory=lambda: [StageCfg(2, 2048), StageCfg(1, 32768)])
    max_switches: int = 3  # a child gets min(U{1..m}, U{1..m}) level switches
    # random (best of init_candidates) | uniform | fractional (best of init_candidates EvoPress starts for a
    # fractional bit target) | null: the method's default (depth: random; sparsity and quantization: uniform,
    # fractional for a fractional bit target)
    init: Optional[str] = None
    init_candidates: int = 64
    init_tokens: int = 2048
    max_tries: int = 100
    # baselines evaluated alongside; null: the method's default (depth: shortgpt; sparse and quant: uniform)
    references: Optional[List[str]] = None
    # settings of a reference baseline (sparse and quant), e.g. {random: {candidates: 32}}: the paper's best of 32
    reference_settings: Any = None
    incremental: bool = True  # reuse the parent's block inputs (false: full forward per candidate)
    max_batch: int = 8  # calibration windows per forward
    # held-out PPL of the parent every k generations (0: off), on the first track_windows windows of every
    # eval dataset: the convergence figure's second curve (costs one short eval per tracked generation)
    track_every: int = 0
    track_windows: int = 4


@dataclass
class TrainStageCfg:
    """A DarwinLM selection stage: survivors kept, fitness tokens, and the tokens each candidate is fine-tuned on
    before it is scored."""

    survivors: int = 1
    tokens: int = 2048
    train_tokens: int = 10_000


@dataclass
class DarwinLMCfg(EvoPressCfg):
    """EvoPress with training-aware selection (DarwinLM): each candidate of a stage is fine-tuned on the stage's
    training minibatch (shared by the stage's candidates, fresh each generation) before it is scored."""

    kind: str = "darwinlm"
    stages: List[TrainStageCfg] = field(default_factory=lambda: [
        TrainStageCfg(8, 1024, 10_000), TrainStageCfg(4, 2048, 50_000), TrainStageCfg(2, 4096, 100_000),
        TrainStageCfg(1, 8192, 200_000)])
    lr: float = 1e-5  # AdamW, torch's defaults otherwise (weight decay 0.01, betas 0.9 / 0.999), as the authors
    weight_decay: float = 0.01
    train_batch: int = 1  # sequences per optimizer step (the authors: 1)
    train_windows: int = 256  # the training text: windows of data.seq_len drawn from data.calib (seed data.seed+1)
    # true: removed heads / neurons stay exactly zero while a candidate trains (their gradients masked, the mask
    # re-applied after each step) and the trained weights are fp32 masters; false: the released code's behaviour
    # (every weight trains, pruned columns regrow, weights train in the model's dtype)
    protect_pruned: bool = True
    # false: every stage fine-tunes a survivor from its database weights, as the authors do; true: a survivor
    # continues from where its previous stage left it (replayed, so no per-candidate copy is kept)
    continue_training: bool = False


@dataclass
class BonsaiCfg:
    """Bonsai: forward-only structured pruning by perturbative regression (method=structured), in rounds that
    each remove `prune_frac` of the original heads and neurons; see evoexp/search/bonsai.py."""

    kind: str = "bonsai"
    prune_frac: float = 0.05  # p, in (0, 0.5)
    sub_models: int = 200  # scored per round, in antithetic pairs (the authors' masks_per_iter)
    folds: int = 5  # k-fold choice of the L1 strength by Kendall tau
    prior: str = "wanda_sp"  # wanda_sp | magnitude | random
    perturb: bool = True  # false: prior-only (each round removes the lowest-prior units)
    alphas: List[float] = field(default_factory=lambda: [0.3, 0.1, 0.03, 0.01, 0.003])  # L1 strengths, as
    # fractions of the strength that zeroes every coefficient
    ppl_cap: float = 1.0e8
    rounds_cap: Optional[int] = None  # stop after this many rounds (null: until the target)
    samples: int = 32  # calibration sequences every sub-model is scored on (windows of data.calib, seed data.seed)
    seq_len: Optional[int] = None  # their length; null: data.seq_len
    batch: int = 4  # calibration windows per forward
    references: List[str] = field(default_factory=list)


@dataclass
class RandomSearchCfg:
    kind: str = "random"
    candidates: int = 64
    tokens: int = 8192
    references: List[str] = field(default_factory=list)


@dataclass
class OwlSearchCfg:
    """OWL: per-block sparsity from the outlier ratio of Wanda scores, the best (lambda, M) on calibration KL."""

    kind: str = "owl"
    lambdas: List[float] = field(default_factory=lambda: [0.02, 0.05, 0.08, 0.1, 0.2])
    ms: List[float] = field(default_factory=lambda: [3.0, 5.0, 7.0, 10.0])
    tokens: int = 8192  # calibration tokens the (lambda, M) candidates are compared on
    references: Optional[List[str]] = None  # null: uniform


@dataclass
class DPSearchCfg:
    """Error additivity (SPDY-style): per-layer reconstruction errors, a knapsack under the exact budget."""

    kind: str = "dp"
    resolution: int = 200_000  # most budget steps the knapsack table may have (costs are coarsened above)
    # bit-widths: pooled = one budget over all layers, bit costs weighted by layer size; groups = each switch group
    # of the search (method.group_rule) at the target mean, as the authors' DP with --group_by_numel
    budget: str = "pooled"
    references: Optional[List[str]] = None  # null: uniform


@dataclass
class BruteSearchCfg:
    kind: str = "brute"
    tokens: int = 8192
    max_states: int = 100_000
    references: List[str] = field(default_factory=list)


@dataclass
class ScoreSearchCfg:
    """One-shot depth baselines that rank blocks by a score (ShortGPT and friends)."""

    kind: str = "shortgpt"  # shortgpt | window_cosine | subcloning | shortened_llama
    tokens: int = 8192  # calibration tokens the scores are computed on
    references: List[str] = field(default_factory=list)


