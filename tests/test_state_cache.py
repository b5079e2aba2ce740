"""A compressed model's figures are shared by every run that holds the same model (eval.cache_states): keyed by a
digest of what the model computes (evoexp/models/digest.py), so uniform levels at every seed are evaluated once,
and any difference in weights, structure or settings is another model."""
import copy
import json

import pytest
import torch
from torch import nn

from evoexp.config import EvalCfg, ZeroShotCfg
from evoexp.eval import evaluate_ppl, evaluate_zeroshot
from evoexp.models.digest import state_digest
from tests.conftest import run_cli


def test_the_digest_sees_weights_structure_and_settings(tiny):
    model = copy.deepcopy(tiny.model)
    base = state_digest(model)
    assert base == state_digest(copy.deepcopy(model)) and len(base) == 64
    down = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight[0, 0] += 1e-7  # one weight, one ulp or so
    assert state_digest(model) != base
    with torch.no_grad():
        down.weight[0, 0] -= 1e-7
        down.weight.copy_(tiny.model.model.layers[1].mlp.down_proj.weight)
    assert state_digest(model) == base
    attn = model.model.layers[0].self_attn
    attn.num_key_value_groups += 1  # a plain setting the forward reads, no tensor changes
    assert state_digest(model) != base
    attn.num_key_value_groups -= 1
    model.model.layers[2].mlp = nn.Identity()  # a module swapped (as dropping does): other parameters, other class
    assert state_digest(model) not in (base, None)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    assert state_digest(model) is None  # a hook may change what it computes: nothing is shared
    handle.remove()
    assert state_digest(model.to(torch.bfloat16)) is not None  # bf16 bytes are hashed as bytes


def test_ppl_and_zeroshot_of_a_digest_are_computed_once(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOEXP_CACHE", str(tmp_path))
    cfg = EvalCfg(datasets=["wikitext2:test"], seq_len=64, windows=2)
    digest = state_digest(tiny.model)
    first = evaluate_ppl(tiny, cfg, "float32", dense=False, digest=digest)["wikitext2:test"]["float32"]
    second = evaluate_ppl(tiny, cfg, "float32", dense=False, digest=digest)["wikitext2:test"]["float32"]
    assert not first["cached"] and second["cached"] and second["ppl"] == first["ppl"]
    assert not evaluate_ppl(tiny, cfg, "float32", dense=False, digest="0" * 64)["wikitext2:test"]["float32"]["cached"]
    assert not evaluate_ppl(tiny, cfg, "float32", dense=False)["wikitext2:test"]["float32"]["cached"]  # no digest
    assert len(list((tmp_path / "state_ppl").glob("*.json"))) == 2 and not (tmp_path / "dense_ppl").exists()

    from lm_eval.models.huggingface import HFLM
    calls = []
    model_call = HFLM._model_call
    monkeypatch.setattr(HFLM, "_model_call", lambda self, *a, **k: calls.append(1) or model_call(self, *a, **k))
    zs = ZeroShotCfg(tasks=["arc_easy"], limit=2, batch_size=2, resume=False)
    one = evaluate_zeroshot(tiny, zs, "float32", dense=False, digest=digest)
    n = len(calls)
    two = evaluate_zeroshot(tiny, zs, "float32", dense=False, digest=digest)
    assert n > 0 and len(calls) == n and two["tasks"]["arc_easy"]["cached"]  # no forward: read back
    assert two["average"] == one["average"] and not one["tasks"]["arc_easy"]["cached"]


TINY_UNIFORM = ["model=tiny", "method=structured", "method.target=0.3", "search=uniform", "solver=ziplm",
                "eval.windows=2", "logger=none"]


@pytest.mark.parametrize("share", [True, False])
def test_the_same_model_in_another_run_is_not_evaluated_again(tmp_path, share):
    """Two runs of one config in two run dirs hold the same model: across processes its digest is the same."""
    ppl = []
    for run in ("a", "b"):
        proc = run_cli(*TINY_UNIFORM, f"hydra.run.dir={tmp_path / run}", f"eval.cache_states={str(share).lower()}",
                       env={"EVOEXP_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((tmp_path / run / "result.json").read_text())
        ppl.append(result["models"]["uniform"]["ppl"]["wikitext2:test"]["float32"])
    assert ppl[1]["ppl"] == ppl[0]["ppl"] and not ppl[0]["cached"] and ppl[1]["cached"] is share
    assert ("a model of the same weights" in proc.stdout + proc.stderr) is share
    kept = (tmp_path / "b" / "scores" / "eval_ppl.jsonl").read_text().splitlines()
    assert len(kept) == 1 and json.loads(kept[0])["ppl"]["ppl"] == ppl[1]["ppl"]  # the run's own record either way


def test_a_tensor_key_sees_shape_and_dtype_not_just_bytes():
    from evoexp.tensorfiles import tensor_sha256

    ids = torch.arange(8, dtype=torch.int64)
    assert tensor_sha256(ids) == tensor_sha256(ids.clone()) and len(tensor_sha256(ids)) == 64
    keys = {tensor_sha256(ids), tensor_sha256(ids.view(2, 4)), tensor_sha256(ids.view(4, 2)),
            tensor_sha256(ids.view(torch.float64)), tensor_sha256(ids[:4])}
    assert len(keys) == 5  # 2 x 4 windows of the same tokens are not 4 x 2 windows
    assert tensor_sha256(ids.view(2, 4).t()) == tensor_sha256(ids.view(2, 4).t().contiguous())
