"""Post-compression training (evoexp.train.posttrain, issue 34) on the tiny model: masks hold, a killed training
resumes to the uninterrupted result, distillation starts at zero KL from the dense model."""
import pytest
import torch

from evoexp.blockrun import BlockRunner
from evoexp.recipes.posttrain import student_hidden
from evoexp.train.posttrain import PostTrainer, PostTrainSettings, teacher_states


@pytest.fixture()
def model(tiny):
    saved = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    yield tiny
    tiny.model.load_state_dict(saved)


def block_params(tiny):
    return [p for b in (*tiny.adapter.blocks, tiny.adapter.final_norm) for p in b.parameters()]


def windows(n=8, length=32):
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(2))


def pruned(tiny):
    """Half of every down_proj's input columns removed (zeroed), as a structured model's would be."""
    masks = {}
    for b in tiny.adapter.blocks:
        w = b.mlp.down_proj.weight
        keep = torch.ones(1, w.shape[1], dtype=torch.bool)
        keep[:, ::2] = False
        with torch.no_grad():
            w.mul_(keep)
        masks[w] = keep
    return masks


class Killed(Exception):
    pass


def kill_at(step: int):
    """A log_fn that kills the training after `step` (as kill -9 would, between two checkpoints or at one)."""
    def kill(record):
        if record["step"] == step:
            raise Killed
    return kill


def zero_where_pruned(masks) -> bool:
    return all(float(w.detach()[:, ~k[0]].abs().sum()) == 0 for w, k in masks.items())


def trainer(tiny, out_dir, masks, kind="finetune", log_fn=None, teacher=None, **kw):
    s = PostTrainSettings(kind=kind, tokens=12 * 2 * 32, batch=2, lr=1e-3, checkpoint_every=5, **kw)
    return PostTrainer(tiny.model, block_params(tiny), windows(), s, masks, out_dir,
                       hidden_of=student_hidden(tiny.adapter), head=tiny.adapter.lm_head, teacher_hidden=teacher,
                       log_fn=log_fn)


def dense_teacher(tiny):
    runner = BlockRunner(tiny.adapter)  # as the recipe computes it: block by block, in inference mode
    return teacher_states(lambda ids: runner.final(runner.run(runner.embed(ids), 0)), windows())


def test_finetuning_keeps_pruned_columns_zero_and_lowers_the_loss(model, tmp_path):
    masks = pruned(model)
    out = trainer(model, tmp_path, masks).run()
    assert out["steps"] == 12 and len(out["history"]) == 12
    assert all(float(w.detach()[:, ~k[0]].abs().sum()) == 0 for w, k in masks.items())
    losses = [h["loss"] for h in out["history"]]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_a_killed_training_resumes_to_the_uninterrupted_result(model, tmp_path):
    masks = pruned(model)
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    full = trainer(model, tmp_path / "full", masks).run()
    trained = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.model.load_state_dict(start)


    with pytest.raises(Killed):
        trainer(model, tmp_path / "killed", masks, log_fn=kill_at(7)).run()
    model.model.load_state_dict(start)  # a new process: the model as the recipe puts it, the checkpoint on disk
    resumed = trainer(model, tmp_path / "killed", masks).run()
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert all(torch.equal(v, trained[k]) for k, v in model.model.state_dict().items())
    with pytest.raises(Exception, match="other settings"):
        trainer(model, tmp_path / "killed", masks, seed=1).run()


def test_distillation_from_the_dense_model_starts_at_zero_kl(model, tmp_path):
    out = trainer(model, tmp_path, {}, kind="distill", teacher=dense_teacher(model), ce_weight=0.5).run()
    first = out["history"][0]
    assert first["kl"] < 1e-3 and first["ce"] > 1 and first["loss"] == pytest.approx(first["kl"] + 0.5 * first["ce"])


def test_distillation_trains_every_block_and_keeps_pruned_columns_zero(model, tmp_path):
    """The student's states come with gradients: every decoder block's weights move, not only the final norm (a
    student computed block by block in inference mode trained the final norm alone). The random tiny model's
    pruned logits are already near the teacher's, so the KL is not asserted to fall here (the embedded model's
    table shows it does)."""
    teacher = dense_teacher(model)
    masks = pruned(model)
    start = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    out = trainer(model, tmp_path, masks, kind="distill", teacher=teacher).run()
    assert out["history"][0]["kl"] > 0
    moved = {n for n, p in model.model.named_parameters() if not torch.equal(p.detach(), start[n])}
    for i, block in enumerate(model.adapter.blocks):
        names = [n for n, p in model.model.named_parameters() if any(p is q for q in block.parameters())]
        assert set(names) <= moved, f"block {i}: {sorted(set(names) - moved)} did not train"
    assert not any(n.startswith(("model.embed_tokens", "lm_head")) for n in moved)
    assert zero_where_pruned(masks)


def test_a_checkpoint_of_another_training_version_is_trained_again(model, tmp_path, caplog):
    from evoexp.train.posttrain import CHECKPOINT

    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    full = trainer(model, tmp_path / "full", {}).run()
    model.model.load_state_dict(start)
    trainer(model, tmp_path / "old", {}).run()
    state = torch.load(tmp_path / "old" / CHECKPOINT, weights_only=False)
    del state["version"]  # as version 1 wrote it
    torch.save(state, tmp_path / "old" / CHECKPOINT)
    model.model.load_state_dict(start)
    again = trainer(model, tmp_path / "old", {}).run()
    assert "training from the start" in caplog.text
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in full["history"]]


def test_teacher_states_are_cached_checked_and_recomputed_when_damaged(model, tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from evoexp.recipes.posttrain import cached_teacher_states

    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path))
    runner, calls = BlockRunner(model.adapter), []

    def hidden(ids):
        calls.append(ids.shape[0])
        return runner.final(runner.run(runner.embed(ids), 0))

    ctx = SimpleNamespace(loaded=SimpleNamespace(fingerprint="tiny:test"),
                          rc=SimpleNamespace(dtype=SimpleNamespace(value="float32")))
    first = cached_teacher_states(ctx, hidden, windows())
    assert sum(calls) == 8 and first.dtype == torch.float16 and first.shape[:2] == (8, 32)
    again = cached_teacher_states(ctx, hidden, windows())
    assert sum(calls) == 8 and torch.equal(again, first)  # read back, not computed
    other = cached_teacher_states(ctx, hidden, windows()[:, :16])
    assert sum(calls) == 16 and other.shape[:2] == (8, 16)  # other windows: another entry
    path = next(p for p in (tmp_path / "teacher_states").iterdir() if p.stat().st_size == max(
        q.stat().st_size for q in (tmp_path / "teacher_states").iterdir()))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    redone = cached_teacher_states(ctx, hidden, windows())
    assert sum(calls) == 24 and torch.equal(redone, first) and "damaged" in caplog.text


def test_a_sparse_run_trains_its_found_model_and_keeps_its_zeros(tmp_path):
    from evoexp.utils import read_json
    from tests.conftest import run_cli

    out = run_cli("model=tiny", "logger=none", "method=sparse", "method.target=0.5", "search=uniform",
                  "database.windows=8", "eval.windows=2", "train=finetune", "train.tokens=2048", "train.lr=1e-3",
                  f"hydra.run.dir={tmp_path}", env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    models = read_json(tmp_path / "result.json")["models"]
    assert models["uniform_trained"]["achieved"] == models["uniform"]["achieved"]  # counted from the weights
    assert models["uniform_trained"]["train"]["steps"] == 2  # 2,048 tokens in steps of 4 x 256
    ppl = [models[m]["ppl"]["wikitext2:test"]["float32"]["ppl"] for m in ("uniform", "uniform_trained")]
    assert ppl[0] != ppl[1]
    assert (tmp_path / "train" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("method", [
    ["method=structured", "method.target=0.3", "search=uniform", "database.windows=8"],
    ["method=drop", "method.target=0.25", "search=shortgpt"],
], ids=["structured", "drop"])
def test_the_trained_model_is_what_gets_exported(method, tmp_path):
    """With train= and export=auto the checkpoint holds the trained model: loaded back (shrunk / without the dropped
    blocks) it gives the trained model's held-out PPL, not the one-shot one's."""
    from evoexp.utils import read_json
    from tests.conftest import run_cli

    env = {"EVOEXP_CACHE": str(tmp_path / "cache"), "EVOEXP_OUT": str(tmp_path / "runs")}
    run = tmp_path / "run"
    out = run_cli("model=tiny", "logger=none", *method, "eval.windows=2", "train=finetune", "train.tokens=2048",
                  "train.lr=1e-3", "export=auto", f"hydra.run.dir={run}", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = read_json(run / "result.json")
    kind = result["found"]
    ppl = {m: result["models"][m]["ppl"]["wikitext2:test"]["float32"]["ppl"] for m in (kind, f"{kind}_trained")}
    assert ppl[kind] != pytest.approx(ppl[f"{kind}_trained"], rel=1e-3)
    back = run_cli(f"model={run / 'model'}", "model.seq_len=256", "method=dense", "search=none", "eval.windows=2",
                   "logger=none", env=env)
    assert back.returncode == 0, back.stderr[-3000:]
    exported = read_json(next((tmp_path / "runs").rglob("result.json")))["metrics"]["ppl"]["wikitext2:test"]
    assert exported["float32"]["ppl"] == pytest.approx(ppl[f"{kind}_trained"], rel=1e-4)
    if "structured" in method[0]:
        assert "post-training | `finetune`, 2,048 tokens" in (run / "model" / "README.md").read_text()
