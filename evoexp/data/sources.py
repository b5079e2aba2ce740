"""Text sources. A source spec is `name[:split]` for a built-in or Hugging Face corpus, or a path to a file.

- `wikitext2:test`, `wikitext2:validation`  shipped inside the package (offline)
- `/path/to/file.txt` (read whole), `/path/to/file.jsonl` (one document per line, field `jsonl_field`)
- `c4_sample`, `wiki_sample`, `tinystories` with `:train` (3 of every 4 documents), `:eval` (every 4th) or `:all`
  (the default): the calibration text of the `exllamav3` wheel (offline; C4 web pages, Wikipedia articles,
  TinyStories), deduplicated, documents joined by blank lines
- `c4:train`, `c4:validation`, `fineweb_edu:train`, `fineweb_edu:eval`  Hugging Face datasets (online)
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from evoexp.errors import UserError
from evoexp.models.loading import hub_reachable
from evoexp.utils import file_hash

FILES = Path(__file__).resolve().parent / "files"
BUILTIN = {
    "wikitext2": {"test": FILES / "wikitext2" / "wiki.test.raw",
                  "validation": FILES / "wikitext2" / "wiki.valid.tokens"},
}
# Offline samples shipped by the exllamav3 wheel (its calibration data; located without importing it):
# name -> file in exllamav3/conversion/standard_cal_data/
EXLLAMA_PIP = "exllamav3==1.6.5"
SAMPLES = {"c4_sample": "c4.utf8", "wiki_sample": "wiki.utf8", "tinystories": "tiny.utf8"}
SAMPLE_SPLITS = ("all", "train", "eval")
HELD_OUT_EVERY = 4  # :eval holds every 4th document, :train the others
SAMPLE_VERSION = 1  # bump when the parsing or splitting changes
# How many documents the online corpora contribute (EvoPress / SparseGPT protocols).
C4_EVAL_DOCS = 1100
HF_CALIB_DOCS = 20_000


@dataclass
class Text:
    spec: str
    text: str
    fingerprint: str  # content identity, part of every token-cache key
    join: str  # how documents were joined ("whole file" for single texts)


HF_SPLITS = {"c4": ("train", "validation"), "fineweb_edu": ("train", "eval")}


def check_source(spec: str, key: str) -> None:
    """Fail fast, before any model work, on a source that cannot exist (`key` names the config entry)."""
    name, _, split = spec.partition(":")
    known = {**{n: tuple(s) for n, s in BUILTIN.items()}, **HF_SPLITS, **{n: SAMPLE_SPLITS for n in SAMPLES}}
    if name in known:
        if split and split not in known[name]:
            raise UserError(f"{key}: {spec!r} has no split {split!r} (one of {', '.join(known[name])})")
        if name in SAMPLES:
            _samples_dir(spec)
        if name in HF_SPLITS:
            _require_hub(spec)
    elif not Path(os.path.expanduser(spec)).is_file():
        raise UserError(f"{key}: {spec!r} is neither an existing file nor one of {', '.join(known)} "
                        "(name[:split])")


def read_text(spec: str, jsonl_field: str = "text") -> Text:
    name, _, split = spec.partition(":")
    if name in BUILTIN:
        splits = BUILTIN[name]
        split = split or "test"
        if split not in splits:
            raise UserError(f"data source {spec!r}: split must be one of {sorted(splits)}")
        return _read_file(splits[split], spec, jsonl_field)
    if name in SAMPLES:
        return _read_sample(name, split or "all", spec)
    if name in ("c4", "fineweb_edu"):
        return _read_hf(name, split or ("validation" if name == "c4" else "eval"), spec)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return _read_file(path, spec, jsonl_field)
    raise UserError(f"data source {spec!r}: not a file and not one of "
                    f"{sorted(BUILTIN) + sorted(SAMPLES) + ['c4', 'fineweb_edu']} (name[:split])")


def _samples_dir(spec: str) -> Path:
    found = importlib.util.find_spec("exllamav3")
    if found is None or not found.submodule_search_locations:
        raise UserError(f"data source {spec!r} needs the exllamav3 package (pip install --no-deps {EXLLAMA_PIP})")
    return Path(list(found.submodule_search_locations)[0]) / "conversion" / "standard_cal_data"


def sample_docs(name: str, spec: str | None = None) -> tuple[list[str], str]:
    """The documents of an exllamav3 sample (duplicates dropped, first kept) and the file's hash."""
    path = _samples_dir(spec or name) / SAMPLES[name]
    if not path.is_file():
        raise UserError(f"data source {spec or name!r}: {path} is missing (pip install --no-deps {EXLLAMA_PIP})")
    raw = path.read_text(encoding="utf-8")
    if name == "c4_sample":  # one web page per line
        docs = [line.strip() for line in raw.split("\n")]
    elif name == "wiki_sample":  # WikiExtractor: <doc id=.. url=.. title=..>\nTitle\n\ntext</doc>; keep title + text
        docs = [a.split("\n", 1)[1].strip() for a in raw.split("</doc>") if a.strip().startswith("<doc")]
    else:  # stories separated by <|endoftext|>
        docs = [story.strip() for story in raw.split("<|endoftext|>")]
    return list(dict.fromkeys(d for d in docs if d)), file_hash(path)


def _read_sample(name: str, split: str, spec: str) -> Text:
    if split not in SAMPLE_SPLITS:
        raise UserError(f"data source {spec!r}: split must be one of {', '.join(SAMPLE_SPLITS)}")
    docs, digest = sample_docs(name, spec)
    if split != "all":
        held_out = split == "eval"
        docs = [d for i, d in enumerate(docs) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]
    return Text(spec, "\n\n".join(docs), f"{digest}:{name}:{split}:v{SAMPLE_VERSION}",
                f"{len(docs)} docs joined by blank lines")


def _read_file(path: Path, spec: str, jsonl_field: str) -> Text:
    digest = file_hash(path)
    if path.suffix in (".jsonl", ".json"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as ex:
                    raise UserError(f"{path}:{n}: not valid JSON ({ex.msg})") from ex
                if not isinstance(row, dict) or jsonl_field not in row:
                    raise UserError(f"{path}:{n}: no field {jsonl_field!r} (set data.jsonl_field)")
                docs.append(str(row[jsonl_field]))
        if not docs:
            raise UserError(f"{path}: no documents")
        return Text(spec, "\n\n".join(docs), f"{digest}:{jsonl_field}", f"{len(docs)} docs joined by blank lines")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return Text(spec, text, digest, "whole file")


def _require_hub(spec: str) -> None:
    """Online corpora: fail at once when the Hub is unreachable (HF_*_OFFLINE=1 means: use the local HF cache)."""
    if os.environ.get("HF_DATASETS_OFFLINE") != "1" and os.environ.get("HF_HUB_OFFLINE") != "1" \
            and not hub_reachable():
        raise UserError(f"data source {spec!r} needs the Hugging Face Hub, which is unreachable (offline); "
                        "use data=wikitext2, data=c4_sample, data=wiki_sample or a local file "
                        "(data=text_file data.calib=... data.eval=...)")


def _read_hf(name: str, split: str, spec: str) -> Text:
    _require_hub(spec)
    import datasets

    try:
        if name == "c4":
            if split not in ("train", "validation"):
                raise UserError(f"data source {spec!r}: split must be train or validation")
            shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                     else "en/c4-validation.00000-of-00008.json.gz")
            ds = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
            docs = ds["text"][:C4_EVAL_DOCS] if split == "validation" else ds["text"][:HF_CALIB_DOCS]
            sep = " " if split == "validation" else "\n\n"
        else:
            if split not in ("train", "eval"):
                raise UserError(f"data source {spec!r}: split must be train or eval")
            ds = datasets.load_dataset("HuggingFaceFW/fineweb-edu", "sample-10BT", split="train", streaming=True)
            ds = ds.shuffle(seed=0, buffer_size=10_000)
            # EvoPress: first half of the rows calibrates, the second half is held out; streaming cannot see
            # the halves, so alternate rows stand in for them (disjoint by construction).
            keep = 0 if split == "train" else 1
            docs = [r["text"] for i, r in zip(range(2 * HF_CALIB_DOCS), ds) if i % 2 == keep]
            sep = "\n\n"
    except UserError:
        raise
    except Exception as ex:  # noqa: BLE001 - network/auth problems surface as many exception types
        raise UserError(f"data source {spec!r}: loading from the Hugging Face Hub failed "
                        f"({type(ex).__name__}: {str(ex).strip()[:200]})") from ex
    return Text(spec, sep.join(docs), f"hf:{name}:{split}:{len(docs)}", f"{len(docs)} docs joined by {sep!r}")
