"""search=darwinlm (issue 34): training-aware selection over the structured database, on the tiny model."""
import numpy as np
import pytest
import torch

from evoexp.blockrun import BlockRunner
from evoexp.config import StructuredMethodCfg, ZipLMCfg
from evoexp.database import LevelApplier
from evoexp.fitness import Minibatch, Teacher, minibatch, sample_minibatch
from evoexp.recipes.darwinlm import PrunedMasks, trained_parameters
from evoexp.search.training import (CandidateTrainer, DarwinLM, DarwinLMSettings, TrainingAwareEvaluator,
                                    TrainSettings, TrainStage)
from evoexp.utils import read_json
from tests.conftest import run_cli
from tests.test_structured_method import SMALL, database, windows  # noqa: F401  (windows: a fixture)

STAGES = [TrainStage(2, 128, 256), TrainStage(1, 256, 512)]


@pytest.fixture(scope="module")
def rig(tiny, windows, tmp_path_factory):  # noqa: F811
    db, lv, _ = database(tiny, tmp_path_factory.mktemp("db"), StructuredMethodCfg(target=0.3), ZipLMCfg(), *windows)
    applier = LevelApplier(tiny.adapter, db)
    runner = BlockRunner(tiny.adapter)
    teacher = Teacher(tiny.adapter, windows[0], "kl").build(runner)
    train = torch.randint(3, 259, (16, 64), generator=torch.Generator().manual_seed(1))
    yield tiny, db, lv, applier, runner, teacher, train
    applier.restore()


def evaluator(rig, protect=True, lr=1e-3):
    tiny, db, lv, applier, runner, teacher, train = rig
    trainer = CandidateTrainer(tiny.model, trained_parameters(tiny.adapter), train,
                               TrainSettings(lr=lr, protect_pruned=protect),
                               frozen_by=lambda: set(applier.owned.originals))
    return TrainingAwareEvaluator(runner, teacher, lambda st: applier.apply(lv.layers_of(st)),
                                  PrunedMasks(tiny.adapter, db, lv), trainer)


def engine(rig, run_dir, ev=None, generations=3, continue_training=False, on_generation=None):
    tiny, db, lv, applier, runner, teacher, train = rig
    ev = ev or evaluator(rig)
    settings = DarwinLMSettings(generations=generations, offspring=4, stages=STAGES, init="uniform", init_tokens=128,
                                train=ev.trainer.s, continue_training=continue_training)
    return DarwinLM(settings, lv.space, ev, lambda n, rng: minibatch(teacher, n, rng),
                    lambda n, rng: sample_minibatch(train.shape[0], train.shape[1], n, rng), 0, run_dir,
                    on_generation=on_generation)


def model_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pruned_columns(rig, state):
    """{weight name: its removed input columns} at `state`."""
    _, db, lv, *_ = rig
    out = {}
    for name, level in lv.layers_of(state).items():
        kept = set(db.structured(name, level).columns().tolist())
        out[name] = [c for c in range(db.shape(name)[1]) if c not in kept]
    return out


def test_pruned_columns_stay_exactly_zero_while_a_candidate_trains(rig):
    tiny, db, lv, applier, *_ = rig
    state = lv.space.uniform_state()
    batch = Minibatch([(0, 64), (1, 64), (2, 64)])
    for protect in (True, False):
        ev = evaluator(rig, protect=protect)
        ev.prepare(state, [batch], seed=3)
        removed = pruned_columns(rig, state)
        assert sum(len(c) for c in removed.values()) > 0
        moved = [name for name, cols in removed.items() if tiny.adapter.module(name).weight[:, cols].abs().sum() > 0]
        if protect:
            assert moved == []
        else:  # the released code's behaviour: pruned columns regrow
            assert len(moved) == len(removed)
        # the kept weights did train
        name = next(iter(removed))
        assert not torch.equal(tiny.adapter.module(name).weight, db.weight(name, lv.layers_of(state)[name]))
        ev.trainer.reset()
        applier.restore()


def test_the_protect_flag_changes_what_trains_and_nothing_else(rig):
    """With nothing removed (every layer at level 0) protected and unprotected training are the same computation."""
    tiny, db, lv, applier, *_ = rig
    state = lv.offset.copy()  # grid index 0 everywhere: nothing removed
    batch = Minibatch([(4, 64), (5, 32)])
    trained = []
    for protect in (True, False):
        ev = evaluator(rig, protect=protect)
        ev.prepare(state, [batch], seed=5)
        trained.append(model_tensors(tiny.model))
        ev.trainer.reset()
        applier.restore()
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert any(not torch.equal(trained[0][k], v) for k, v in model_tensors(tiny.model).items())


def test_a_generation_leaves_the_dense_weights_and_the_database_unchanged(rig, tmp_path):
    tiny, db, lv, applier, *_ = rig
    applier.restore()
    dense = model_tensors(tiny.model)
    names = list(lv.grid)[:4]
    stored = {(n, i): db.weight(n, i) for n in names for i in range(len(lv.grid[n]))}
    ev = evaluator(rig)
    result = engine(rig, tmp_path, ev, generations=1).run()
    assert result.generations == 1 and ev.counters()["train_tokens"] == 4 * 256 + 3 * 512
    # after the search the trained parameters are back; the applier's layers come back with restore()
    applier.restore()
    assert all(torch.equal(dense[k], v) for k, v in model_tensors(tiny.model).items())
    assert all(torch.equal(w, db.weight(n, i)) for (n, i), w in stored.items())


def test_a_killed_search_resumes_to_the_uninterrupted_result(rig, tmp_path):
    full = engine(rig, tmp_path / "full", generations=2).run()

    class Killed(Exception):
        pass

    def kill_after_one(record):
        if record["generation"] == 1:
            raise Killed

    with pytest.raises(Killed):
        engine(rig, tmp_path / "killed", generations=2, on_generation=kill_after_one).run()
    resumed = engine(rig, tmp_path / "killed", generations=2).run()
    assert np.array_equal(resumed.state, full.state) and resumed.fitness == full.fitness
    assert [h["parent_fitness"] for h in resumed.history] == [h["parent_fitness"] for h in full.history]
    assert [h["stages"] for h in resumed.history] == [h["stages"] for h in full.history]
    assert full.history[0]["stages"][0]["train_tokens"] == 256


def test_continue_training_replays_a_survivors_earlier_stages(rig, tmp_path):
    """Without continue_training each stage trains from the database weights on its own minibatch; with it a
    survivor's last stage trains on its first stage's minibatch and then on the last one."""
    plans = {}

    class Recorder(TrainingAwareEvaluator):
        def score(self, states, batch, parent=None, desc=None, train=None, seeds=None):
            if train is not None:
                plans.setdefault(self.tag, []).append([[b.items for b in p] for p in train])
            return super().score(states, batch, parent, desc, train, seeds)

    for cont in (False, True):
        ev = evaluator(rig)
        ev.__class__, ev.tag = Recorder, cont
        engine(rig, tmp_path / str(cont), ev, generations=1, continue_training=cont).run()
    first, last = plans[False]
    assert all(len(p) == 1 for p in first + last)
    cont_first, cont_last = plans[True]
    assert cont_first == first
    # the last stage's 2 survivors replay stage 1's minibatch, the parent (which joins there) does not
    assert [len(p) for p in cont_last] == [2, 2, 1]
    assert all(p[0] == first[0][0] and p[1] == last[0][0] for p in cont_last[:2])


def test_darwinlm_and_distillation_from_the_command_line(tmp_path):
    out = run_cli(*SMALL, "method=structured", "method.target=0.3", "search=darwinlm_cpu", "search.generations=2",
                  "search.offspring=4", "data.seq_len=64", "search.train_windows=16",
                  "search.stages=[{survivors:2,tokens:256,train_tokens:128},{survivors:1,tokens:512,train_tokens:256}]",
                  "search.init_tokens=256", "train=distill", "train.tokens=4096", f"hydra.run.dir={tmp_path}",
                  "dtype=float32")  # darwinlm_cpu's dtype=auto is bf16 on a CPU with native bf16: another search
    assert out.returncode == 0, out.stderr[-3000:]
    assert "found by darwinlm: 29.93% of the decoder blocks' parameters removed" in out.stdout
    result = read_json(tmp_path / "result.json")
    assert result["search"]["train_tokens"] == 2 * (4 * 128 + 3 * 256)
    assert set(result["models"]) == {"dense", "darwinlm", "uniform", "darwinlm_trained"}
    trained = result["models"]["darwinlm_trained"]
    assert trained["train"]["kind"] == "distill" and trained["train"]["tokens"] >= 4096
    assert trained["achieved"] == result["models"]["darwinlm"]["achieved"]  # pruned stays pruned
    ppl = [result["models"][m]["ppl"]["wikitext2:test"]["float32"]["ppl"] for m in ("darwinlm", "darwinlm_trained")]
    assert ppl[0] != ppl[1]
