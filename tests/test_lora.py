"""LoRA post-training (`train.lora.rank`, evoexp/train/lora.py) on the tiny model: only the adapters train, removed
columns and rows stay exactly zero through training and the merge, the merged model computes what the adapted one
did, the model is given back as it was, a killed training resumes to the uninterrupted result."""
import pytest
import torch

from evoexp.errors import UserError
from evoexp.train.lora import LoraAdapters, LoraSettings, adapted_layers, factor_mask
from evoexp.train.posttrain import PostTrainer, PostTrainSettings
from tests.test_posttrain import Killed, kill_at


@pytest.fixture()
def model(tiny):
    saved = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    yield tiny
    tiny.model.load_state_dict(saved)


def windows(n=8, length=32):
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(2))


def pruned(tiny):
    """Half of every down_proj's input columns zeroed ([1, in] masks, as a structured model's), and block 0's
    gate_proj rows of the same neurons ([out, 1]): both kinds of structured mask."""
    masks = {}
    for b in tiny.adapter.blocks:
        w = b.mlp.down_proj.weight
        keep = torch.ones(1, w.shape[1], dtype=torch.bool)
        keep[:, ::2] = False
        masks[w] = keep
    w = tiny.adapter.blocks[0].mlp.gate_proj.weight
    rows = torch.ones(w.shape[0], 1, dtype=torch.bool)
    rows[::2] = False
    masks[w] = rows
    with torch.no_grad():
        for w, keep in masks.items():
            w.mul_(keep)
    return masks


def zero_where_pruned(masks) -> bool:
    return all(float(w.detach()[~k.expand(w.shape)].abs().sum()) == 0 for w, k in masks.items())


def trainer(tiny, params, masks, out_dir, log_fn=None, identity=None, **kw):
    s = PostTrainSettings(kind="finetune", tokens=12 * 2 * 32, batch=2, lr=1e-2, checkpoint_every=5, **kw)
    return PostTrainer(tiny.model, params, windows(), s, masks, out_dir, head=tiny.adapter.lm_head, log_fn=log_fn,
                       identity=identity)


def test_only_the_adapters_train_and_the_merge_keeps_pruned_entries_zero(model, tmp_path):
    masks = pruned(model)
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    modules = dict(model.model.named_modules())
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    names = adapted_layers(model.adapter, [])
    assert len(names) == 7 * len(model.adapter.blocks)
    with LoraAdapters(model.model, names, LoraSettings(rank=4), 0, masks) as lora:
        assert len(lora.params) == 2 * len(names) and len(lora.masks) == 2 * len(masks)
        out = trainer(model, lora.params, lora.masks, tmp_path).run()
        base = {k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if "lora_" not in k}
        assert all(torch.equal(base[k], v) for k, v in start.items())  # the weights wait for the merge
        assert all(float(b.detach().abs().sum()) > 0 for b in lora.params[1::2])  # every B moved off zero
        lora.merge()
    losses = [h["loss"] for h in out["history"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert zero_where_pruned(masks)
    after = model.model.state_dict()
    changed = [k for k, v in start.items() if not torch.equal(after[k], v)]
    assert sorted(changed) == sorted(f"{n}.weight" for n in names)  # every adapted layer, nothing else
    assert dict(model.model.named_modules()) == modules  # the original modules are back, and no others
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == flags
    assert not hasattr(model.model, "peft_config")


def test_the_merged_model_computes_what_the_adapted_one_did(model):
    masks = pruned(model)
    ids = windows(2, 16)
    with LoraAdapters(model.model, adapted_layers(model.adapter, ["o_proj", "down_proj", "gate_proj"]),
                      LoraSettings(rank=4, alpha=16), 0, masks) as lora:
        with torch.no_grad():
            for p in lora.params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
                p.mul_(lora.masks.get(p, torch.ones((), dtype=torch.bool)))
            adapted = model.model(ids).logits
            lora.merge()
            merged = model.model(ids).logits
    assert (adapted - merged).abs().max() < 1e-4 and (adapted - merged).abs().max() < 1e-3 * adapted.abs().max()
    assert zero_where_pruned(masks)


def test_leaving_without_a_merge_gives_the_model_back_unchanged(model):
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="stop"):
        with LoraAdapters(model.model, adapted_layers(model.adapter, []), LoraSettings(rank=2), 0, {}) as lora:
            with torch.no_grad():
                lora.params[1].add_(1.0)
            raise RuntimeError("stop")
    after = model.model.state_dict()
    assert after.keys() == start.keys() and all(torch.equal(after[k], v) for k, v in start.items())


def test_a_killed_lora_training_with_dropout_resumes_to_the_uninterrupted_result(model, tmp_path):
    masks = pruned(model)
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    s = LoraSettings(rank=4, dropout=0.3)
    names = adapted_layers(model.adapter, [])

    def train(out_dir, log_fn=None):
        with LoraAdapters(model.model, names, s, 7, masks) as lora:
            out = trainer(model, lora.params, lora.masks, out_dir, log_fn=log_fn, identity=s.record()).run()
            lora.merge()
        return out

    torch.manual_seed(123)  # the process's seeded generator: the same when the training starts, killed or not
    full = train(tmp_path / "full")
    trained = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.model.load_state_dict(start)


    torch.manual_seed(123)
    with pytest.raises(Killed):
        train(tmp_path / "killed", kill_at(7))
    model.model.load_state_dict(start)
    torch.manual_seed(456)  # the resuming process's generator is elsewhere: the checkpoint's state is restored
    resumed = train(tmp_path / "killed")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert all(torch.equal(v, trained[k]) for k, v in model.model.state_dict().items())
    with pytest.raises(UserError, match="other settings"):  # another alpha: another training
        with LoraAdapters(model.model, names, LoraSettings(rank=4, alpha=3, dropout=0.3), 7, masks) as lora:
            trainer(model, lora.params, lora.masks, tmp_path / "killed",
                    identity=LoraSettings(rank=4, alpha=3, dropout=0.3).record()).run()


def test_masks_that_are_not_rows_and_columns_are_refused():
    cols = torch.tensor([[True, False, True]])
    assert [m.tolist() for m in factor_mask(cols, torch.Size([2, 3]), "x")] == [[True, False, True], [True, True]]
    with pytest.raises(UserError, match="x has pruned entries that are not whole rows or columns"):
        factor_mask(torch.tensor([[True, False], [False, True]]), torch.Size([2, 2]), "x")


def test_a_structured_run_trains_lora_adapters_and_records_them(tmp_path):
    from evoexp.utils import read_json
    from tests.conftest import run_cli

    out = run_cli("model=tiny", "logger=none", "method=structured", "method.target=0.3", "search=uniform",
                  "database.windows=8", "eval.windows=2", "train=distill", "train.tokens=2048", "train.lr=1e-2",
                  "train.lora.rank=4", "train.lora.targets=[o_proj,down_proj]", "export=auto",
                  f"hydra.run.dir={tmp_path}", env={"EVOEXP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    result = read_json(tmp_path / "result.json")
    models = result["models"]
    train = models["uniform_trained"]["train"]
    assert train["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["o_proj", "down_proj"]}
    assert models["uniform_trained"]["achieved"] == models["uniform"]["achieved"]
    ppl = [models[m]["ppl"]["wikitext2:test"]["float32"]["ppl"] for m in ("uniform", "uniform_trained")]
    assert ppl[0] != ppl[1]
