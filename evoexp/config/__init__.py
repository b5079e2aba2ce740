"""Typed config schemas.

The YAML files in `conf/` only set values; these dataclasses give every key its type, so a typo or a wrong
type on the command line fails at composition with an error naming the key. Library code receives these
dataclasses (via `OmegaConf.to_object`), never a `DictConfig`.

`run` holds the run's own schema (`RunCfg` and the groups every run has), `methods` one schema per compression
method (a `MethodCfg` subclass each, registered by its `kind`), `solvers` and `searches` the options of those
groups.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from evoexp.config.methods import (DenseMethodCfg, DropMethodCfg, MethodCfg, QuantMethodCfg, SparseMethodCfg,
                                   StructuredMethodCfg)
from evoexp.config.run import (DatabaseCfg, DataCfg, Device, DType, EvalCfg, ExportCfg, FitnessCfg, LoggerCfg,
                               LoraCfg, ModelCfg, RunCfg, TinyModelCfg, TrainCfg, ZeroShotCfg)
from evoexp.config.searches import (BonsaiCfg, BruteSearchCfg, DarwinLMCfg, DPSearchCfg, EvoPressCfg, NoSearchCfg,
                                    OwlSearchCfg, RandomSearchCfg, ScoreSearchCfg, StageCfg, TrainStageCfg,
                                    UniformSearchCfg)
from evoexp.config.solvers import (FistaCfg, GPTQCfg, MagnitudeCfg, RandomCfg, RTNCfg, SparseGPTCfg, WandaCfg,
                                   WandaSPCfg, ZipLMCfg)

__all__ = ["BonsaiCfg", "BruteSearchCfg", "DarwinLMCfg", "DPSearchCfg", "DatabaseCfg", "DataCfg", "DenseMethodCfg",
           "Device", "DType", "DropMethodCfg", "EvalCfg", "EvoPressCfg", "ExportCfg", "FistaCfg",
           "FitnessCfg", "GPTQCfg", "LoggerCfg", "LoraCfg", "MagnitudeCfg", "MethodCfg", "ModelCfg", "NoSearchCfg",
           "OPTION_SCHEMAS", "OwlSearchCfg", "QuantMethodCfg", "RTNCfg", "RandomCfg", "RandomSearchCfg",
           "RunCfg", "ScoreSearchCfg", "SparseGPTCfg", "SparseMethodCfg", "StageCfg",
           "StructuredMethodCfg", "TinyModelCfg", "TrainCfg", "TrainStageCfg", "UniformSearchCfg",
           "WandaCfg", "WandaSPCfg", "ZeroShotCfg", "ZipLMCfg", "method_schemas", "register_configs"]

# Group options with their own fields get their own schema; the rest share RunCfg's types. Methods are not
# listed: every MethodCfg subclass is its own `method/<kind>` schema (see method_schemas).
OPTION_SCHEMAS = {
    "solver/sparsegpt": SparseGPTCfg,
    "solver/gptq": GPTQCfg,
    "solver/rtn": RTNCfg,
    "solver/wanda": WandaCfg,
    "solver/fista": FistaCfg,
    "solver/magnitude": MagnitudeCfg,
    "solver/ziplm": ZipLMCfg,
    "solver/wanda_sp": WandaSPCfg,
    "solver/random": RandomCfg,
    "search/uniform": UniformSearchCfg,
    "search/none": NoSearchCfg,
    "search/evopress": EvoPressCfg,
    "search/darwinlm": DarwinLMCfg,
    "search/bonsai": BonsaiCfg,
    "search/random": RandomSearchCfg,
    "search/brute": BruteSearchCfg,
    "search/owl": OwlSearchCfg,
    "search/dp": DPSearchCfg,
    "search/score": ScoreSearchCfg,
}


def method_schemas() -> dict[str, type]:
    """kind -> schema of every method, i.e. of every (direct or indirect) MethodCfg subclass."""
    found, todo = {}, list(MethodCfg.__subclasses__())
    while todo:
        cls = todo.pop()
        found[cls.kind] = cls  # the dataclass default of `kind`
        todo += cls.__subclasses__()
    return found


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunCfg)
    for kind, node in method_schemas().items():
        cs.store(group="schema/method", name=kind, node=node)
    for key, node in OPTION_SCHEMAS.items():
        group, name = key.split("/")
        cs.store(group=f"schema/{group}", name=name, node=node)
