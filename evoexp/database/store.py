"""The per-level database on disk: every level of every layer, compactly encoded, one safetensors file per layer.

    <root>/<name>-<key>/
      manifest.json                 the spec the key hashes (model, calibration, solver, propagation, grid, dtype)
      layers/<layer>.safetensors    all levels of one layer, written atomically once the layer is done

Encodings (tensor names prefixed with the level index, `L3.`):
- sparse: `mask` (the non-zero pattern as packed bits, row-major) and `values` (the non-zeros, storage dtype);
- quant: `codes` (uint8, one per weight), `scales` and `zeros` ([rows, groups]), `g_idx` ([cols], the group of
  each input column; with a group size that does not divide the width, the last group is partial);
- structured: `kept` (int32, the kept groups of input columns, ascending) and `values` (the kept columns only,
  [rows, kept · group size]); the layer's group size is in the file's metadata.
Per layer, for the baselines: `errors` (the relative reconstruction error ⟨ΔW H ΔWᵀ⟩ / ⟨W H Wᵀ⟩ of every level,
with H the layer's calibration Hessian, or the identity for data-free solvers) and `act_norm` (‖x_j‖ per input
column, when the solver saw data).
A layer file exists only when all its levels are done, which is what makes a killed build resumable per layer.
Each layer file carries a sha256 of its bytes (`evoexp.tensorfiles.save_safetensors`), checked once per process before
the layer is used: a damaged layer is removed with a warning and built again like a missing one, and a damaged
manifest is written anew (the directory's name is the spec's hash); layer files written before digests are used
as they are.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from evoexp.errors import UserError
from evoexp.solvers.quant import QuantizedWeight
from evoexp.solvers.structured import StructuredLevel, group_columns
from evoexp.tensorfiles import check_safetensors, save_safetensors
from evoexp.utils import DamagedFile, read_cached_json, stable_hash, write_json

log = logging.getLogger(__name__)
FORMAT = 2


@dataclass
class DatabaseSpec:
    """Everything that decides the stored tensors; its hash names the database directory."""

    kind: str  # sparse | quant | structured
    model: dict  # name + fingerprint
    calibration: dict  # the window protocol (source, token hash, seed, windows, seq_len, bos)
    solver: dict  # solver kind and all its parameters
    propagation: str  # dense | compressed | reference
    reference: dict  # layer -> level index propagated (compressed / reference), empty for dense
    grid: dict  # layer -> list of level values (sparsities, bit-widths or counts of removed groups)
    dtype: str  # storage dtype of values and scales
    compute_dtype: str  # dtype of the forwards that produced the calibration activations
    true_sequential: bool = False
    format: int = FORMAT
    extra: dict = field(default_factory=dict)  # structured: {"group_size": {layer: input columns per group}}

    @property
    def key(self) -> str:
        return stable_hash(asdict(self))


def encode_sparse(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    keep = (w != 0).reshape(-1).cpu()
    return {"mask": torch.from_numpy(np.packbits(keep.numpy())), "values": w.reshape(-1).cpu()[keep].to(dtype)}


def decode_sparse(mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    numel = shape[0] * shape[1]
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel).astype(bool))
    w = torch.zeros(numel, dtype=values.dtype)
    w[keep] = values
    return w.view(shape)


def encode_quant(q: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"codes": q.codes.to(torch.uint8).contiguous(), "scales": q.scales.to(dtype).contiguous(),
            "zeros": q.zeros.to(torch.int16).contiguous(), "g_idx": q.g_idx.to(torch.int32).contiguous()}


def encode_structured(level: StructuredLevel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"kept": level.kept.to(torch.int32).cpu().contiguous(), "values": level.weight.cpu().to(dtype).contiguous()}


def decode_structured(kept: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                      group_size: int) -> torch.Tensor:
    """The full-width weight: the kept columns in place, the removed ones zero."""
    w = torch.zeros(shape, dtype=values.dtype)
    w[:, group_columns(kept.long(), group_size)] = values
    return w


class Database:
    """Open (or create) the database for a spec under `root`; a different spec never reuses its files."""

    def __init__(self, root: str | Path, spec: DatabaseSpec, label: str = "db"):
        self.spec = spec
        self.key = spec.key
        self.path = Path(root) / f"{label}-{self.key}"
        self.dtype = getattr(torch, spec.dtype)
        self.manifest = self.path / "manifest.json"
        self._handles: dict[str, object] = {}
        self._verified: set[str] = set()  # layers whose file was checked against its digest by this process
        stored = read_cached_json(self.manifest)  # damaged: removed (with a warning) and written anew below
        if stored is not None:
            if not isinstance(stored, dict) or stored.get("spec") != json.loads(json.dumps(asdict(spec))):
                raise UserError(f"database: {self.path} holds a database for a different spec (same hash); "
                                "remove it or set database.dir elsewhere")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.manifest, {"key": self.key, "spec": asdict(spec), "complete": False})

    # --- building ----------------------------------------------------------------------------------------------
    def layer_file(self, name: str) -> Path:
        return self.path / "layers" / f"{name}.safetensors"

    def has(self, name: str) -> bool:
        """Whether the layer is built, its file checked (once per process); a damaged file is removed, with a
        warning, so the build makes it again."""
        path = self.layer_file(name)
        if name in self._verified or not path.exists():
            return path.exists()
        try:
            check_safetensors(path)
        except DamagedFile as ex:
            log.warning("database layer %s: %s: damaged (%s); removed, it is built again", name, path, ex.why)
            self._handles.pop(name, None)
            path.unlink(missing_ok=True)
            return False
        self._verified.add(name)
        return True

    def save_layer(self, name: str, shape: tuple[int, int], results: list,
                   extra: dict[str, torch.Tensor] | None = None) -> None:
        """Store every level of one layer (pruned tensors or QuantizedWeights, in grid order), atomically."""
        levels = self.spec.grid[name]
        if len(results) != len(levels):
            raise ValueError(f"{name}: {len(results)} results for {len(levels)} levels")
        tensors = {k: v.contiguous().cpu() for k, v in (extra or {}).items()}
        encode = {"quant": encode_quant, "structured": encode_structured}.get(self.spec.kind, encode_sparse)
        for i, r in enumerate(results):
            tensors.update({f"L{i}.{k}": v for k, v in encode(r, self.dtype).items()})
        meta = {"layer": name, "shape": json.dumps(list(shape)), "levels": json.dumps(levels), "key": self.key}
        if self.spec.kind == "quant":
            meta["sym"] = json.dumps(bool(results[0].sym))
        if self.spec.kind == "structured":
            meta["group_size"] = json.dumps(int(results[0].group_size))
        target = self.layer_file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, target, metadata=meta)  # atomic, with the digest of its bytes
        self._handles.pop(name, None)
        self._verified.add(name)

    def mark_complete(self, info: dict) -> None:
        missing = [n for n in self.spec.grid if not self.has(n)]
        if missing:
            raise RuntimeError(f"database incomplete: {len(missing)} layers missing, e.g. {missing[0]}")
        write_json(self.manifest, {"key": self.key, "spec": asdict(self.spec), "complete": True, **info})

    @property
    def complete(self) -> bool:
        """The manifest says the build finished and every layer file checks out (a damaged one is removed and the
        database counts as incomplete again, so it is rebuilt)."""
        stored = read_cached_json(self.manifest)
        if not isinstance(stored, dict) or not stored.get("complete", False):
            return False
        missing = [name for name in self.spec.grid if not self.has(name)]
        if missing:
            log.warning("database %s: %d layer(s) missing or damaged (e.g. %s): building them again", self.path,
                        len(missing), missing[0])
            write_json(self.manifest, {"key": self.key, "spec": asdict(self.spec), "complete": False})
            return False
        return True

    def info(self) -> dict:
        stored = read_cached_json(self.manifest)
        return {k: v for k, v in (stored if isinstance(stored, dict) else {}).items() if k != "spec"}

    # --- reading -----------------------------------------------------------------------------------------------
    def _open(self, name: str):
        if name not in self._handles:
            path = self.layer_file(name)
            if not path.exists():
                raise KeyError(f"database {self.path}: layer {name} not built")
            fix = "remove it and run the same command again: the layer is built anew"
            if name not in self._verified:
                check_safetensors(path, what_to_do=fix)
                self._verified.add(name)
            try:
                self._handles[name] = safe_open(str(path), framework="pt")  # memory-mapped
            except Exception as ex:  # noqa: BLE001 - safetensors' own check of a file without a digest
                raise DamagedFile(path, f"unreadable: {str(ex).strip()[:200]}", fix) from None
        return self._handles[name]

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(json.loads(self._open(name).metadata()["shape"]))

    def quantized(self, name: str, level: int) -> QuantizedWeight:
        f = self._open(name)
        bits = self.spec.grid[name][level]
        return QuantizedWeight(f.get_tensor(f"L{level}.codes"), f.get_tensor(f"L{level}.scales").float(),
                               f.get_tensor(f"L{level}.zeros").float(), f.get_tensor(f"L{level}.g_idx"), int(bits),
                               json.loads(f.metadata()["sym"]))

    def structured(self, name: str, level: int) -> StructuredLevel:
        """One level of a structured layer as stored: its kept groups and their columns' weights."""
        f = self._open(name)
        kept = f.get_tensor(f"L{level}.kept").long()
        size = json.loads(f.metadata()["group_size"])
        return StructuredLevel(kept, f.get_tensor(f"L{level}.values"), size, self.shape(name)[1] // size - len(kept))

    def weight(self, name: str, level: int) -> torch.Tensor:
        """The dense weight of one layer at one level (index into its grid), in the storage dtype."""
        if self.spec.kind == "quant":
            return self.quantized(name, level).dequantize().to(self.dtype)
        f = self._open(name)
        if self.spec.kind == "structured":
            return decode_structured(f.get_tensor(f"L{level}.kept"), f.get_tensor(f"L{level}.values"),
                                     self.shape(name), json.loads(f.metadata()["group_size"]))
        return decode_sparse(f.get_tensor(f"L{level}.mask"), f.get_tensor(f"L{level}.values"), self.shape(name))

    def errors(self, name: str) -> torch.Tensor:
        """Relative reconstruction error of every level of a layer (float64, grid order)."""
        return self._open(name).get_tensor("errors")

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path / "layers").glob("*.safetensors"))
