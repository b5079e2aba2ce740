"""search=bonsai (method=structured): Bonsai's rounds (evoexp/search/bonsai.py) on the loaded model, then the
found model evaluated, optionally post-trained, and exported shrunk like every structured run.

Each round works on a physically smaller copy of the model (`shrink_model` of the dense model at the current
state): its prior comes from one forward pass (input norms of every o_proj / down_proj), its sub-models are
the copy with some o_proj / down_proj input columns multiplied by zero (forward pre-hooks, nothing is written),
scored by perplexity on the calibration windows. Nothing has a gradient. The found model is then the dense
model with the removed columns zeroed (`StateApplier`), which computes what the shrunk one does.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from evoexp.config import BonsaiCfg, RunCfg
from evoexp.errors import UserError, check_above, check_choice, check_positive, fail
from evoexp.methods.export import CardFacts, model_card
from evoexp.methods.structured import measure_structured, structured_budget, structured_summary, structured_units
from evoexp.methods.structured_export import LOADING
from evoexp.models.adapter import DecoderAdapter
from evoexp.models.heads import BlockGeometry, BlockState, StructuredState, geometry, masked_weights
from evoexp.models.shrink import head_order, save_shrunk, shrink_model
from evoexp.recipes.common import calibration, evaluate_models
from evoexp.recipes.contract import RecipeResult
from evoexp.recipes.posttrain import FoundModel, post_train
from evoexp.search.bonsai import HEAD, NEURON, Bonsai, BonsaiSettings, Units
from evoexp.solvers.hessian import InputNorms
from evoexp.solvers.structured import StructMagnitude, StructRandom, WandaSP, group_columns
from evoexp.utils import stable_hash, write_json

log = logging.getLogger(__name__)
PRIORS = {"wanda_sp": WandaSP, "magnitude": StructMagnitude, "random": StructRandom}


def check_bonsai(rc: RunCfg) -> None:
    """search=bonsai's settings, before the model loads."""
    s, m = rc.search, rc.method  # method=structured: other methods refuse search=bonsai in their own checks
    if not 0 < s.prune_frac < 0.5:
        fail("search.prune_frac", "a fraction in (0, 0.5) (each round's candidates are 2 x prune_frac)",
             s.prune_frac)
    check_choice(s.prior, "search.prior", tuple(PRIORS))
    check_above(s.folds, "search.folds", 1)
    if s.sub_models < max(2, s.folds):
        fail("search.sub_models", f">= search.folds = {s.folds} (each fold needs a held-out sub-model)",
             s.sub_models)
    if not s.alphas or any(a <= 0 for a in s.alphas):
        fail("search.alphas", "a non-empty list of positive fractions", list(s.alphas))
    check_above(s.ppl_cap, "search.ppl_cap", 1)
    check_positive(s.rounds_cap, "search.rounds_cap", null=True)
    check_positive(s.batch, "search.batch")
    check_positive(s.samples, "search.samples")
    if s.seq_len is not None:
        check_above(s.seq_len, "search.seq_len", 1)
    if m.budget != "group":
        raise UserError("method.budget: search=bonsai removes p of the heads and p of the neurons each round, "
                        "attention and MLP each at the target; set method.budget=group")
    if m.kv_groups:
        raise UserError("method.kv_groups: search=bonsai removes query heads; set method.kv_groups=false")
    if s.references:
        raise UserError("search.references: search=bonsai compares no baselines in its run; run search=uniform "
                        "or search.perturb=false as their own jobs")


def settings_of(s: BonsaiCfg, seed: int) -> BonsaiSettings:
    return BonsaiSettings(prune_frac=s.prune_frac, sub_models=s.sub_models, folds=s.folds, perturb=s.perturb,
                          alphas=tuple(s.alphas), ppl_cap=s.ppl_cap, rounds_cap=s.rounds_cap, seed=seed)


class StateApplier:
    """Puts a structured state into the dense model by zeroing the removed heads' o_proj and the removed
    neurons' down_proj input columns (and a removed sub-block's output bias), and puts the dense weights back.
    It owns the weights it writes: `restore` copies back what it saved before its first write."""

    def __init__(self, adapter: DecoderAdapter):
        self.adapter, self.geoms = adapter, geometry(adapter)
        self.saved: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, nn.Parameter]:
        lins = [(n, self.adapter.module(n)) for g in self.geoms for n in (g.attn_out, g.mlp_out)]
        return {f"{n}.{k}": p for n, lin in lins for k, p in (("weight", lin.weight), ("bias", lin.bias))
                if p is not None}

    @torch.no_grad()
    def apply(self, state: StructuredState | None) -> None:
        if state is None:
            return self.restore()
        params = self.params()
        if not self.saved:
            self.saved = {k: p.detach().clone() for k, p in params.items()}
        self.restore()
        for name, value in masked_weights(self.adapter, state, geoms=self.geoms).items():
            params[name].copy_(value)

    @torch.no_grad()
    def restore(self) -> None:
        params = self.params()
        for name, value in self.saved.items():
            params[name].copy_(value)

    def masks(self, state: StructuredState) -> dict[nn.Parameter, torch.Tensor]:
        """{o_proj / down_proj weight: [1, in] bool, True where a column stays}: what post-training keeps."""
        out = {}
        for g, b in zip(self.geoms, state.blocks):
            for name, kept in ((g.attn_out, group_columns(torch.tensor(b.heads, dtype=torch.long), g.head_dim)),
                               (g.mlp_out, torch.tensor(b.neurons, dtype=torch.long))):
                w = self.adapter.module(name).weight
                keep = torch.zeros(1, w.shape[1], dtype=torch.bool, device=w.device)
                keep[0, kept] = True
                out[w] = keep
        return out


class ShrunkPruning:
    """Bonsai's view of the model (`BonsaiModel`): the dense model shrunk to the current state, its units in
    original indices, masks through forward pre-hooks."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, prior: str, batch: int, seed: int):
        self.dense, self.windows, self.prior_kind, self.batch, self.seed = model, windows, prior, batch, seed
        self.geoms = geometry(DecoderAdapter(model))
        self.state = StructuredState.full(self.geoms)
        self.current: nn.Module | None = None
        self.columns: dict[tuple[int, int], torch.Tensor | None] = {}  # (block, part) -> input multiplier
        self._build()

    # --- the current (shrunk) model --------------------------------------------------------------------------
    def _build(self) -> None:
        self.current = None  # the previous copy goes before the next is made
        self.current = shrink_model(self.dense, self.state)
        self.current.requires_grad_(False)
        self.layers: list[tuple[BlockGeometry, BlockState, nn.Module]] = []
        kept = [i for i, b in enumerate(self.state.blocks) if b.heads or b.neurons]
        for layer, i in zip(self.current.model.layers, kept):
            self.layers.append((self.geoms[i], self.state.blocks[i], layer))
            for part, lin in ((HEAD, getattr(layer.self_attn, "o_proj", None)),
                              (NEURON, getattr(layer.mlp, "down_proj", None))):
                if lin is not None:
                    lin.register_forward_pre_hook(self._hook(i, part))
        self._units = self._list_units()

    def _hook(self, block: int, part: int):
        def pre(_module, args):
            mult = self.columns.get((block, part))
            return None if mult is None else (args[0] * mult,)
        return pre

    def units(self) -> Units:
        return self._units  # they change only when the model is rebuilt

    def _list_units(self) -> Units:
        part, module, ids, keep_one = [], [], [], set()
        for g, b, _ in self.layers:
            for p, members, bias in ((HEAD, head_order(g, b), g.o_bias), (NEURON, b.neurons, g.mlp_out_bias)):
                part += [p] * len(members)
                module += [2 * g.block + p] * len(members)
                ids += [(g.block, p, int(u)) for u in members]
                if bias:
                    keep_one.add(2 * g.block + p)
        return Units(np.array(part, dtype=np.int64), np.array(module, dtype=np.int64), ids, frozenset(keep_one))

    # --- what the engine asks -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prior(self, round_index: int) -> np.ndarray:
        """Per unit, in `units()` order: the prior solver's score of its group of input columns."""
        solvers = []
        for g, b, layer in self.layers:
            for lin, size, name in ((getattr(layer.self_attn, "o_proj", None), g.head_dim, g.attn_out),
                                    (getattr(layer.mlp, "down_proj", None), 1, g.mlp_out)):
                if lin is None:
                    continue
                cls = PRIORS[self.prior_kind]
                extra = {"seed": self.seed * 7919 + round_index} if cls is StructRandom else {}
                solvers.append((lin, cls(lin.weight, name, group_size=size, **extra,
                                         hessian=InputNorms(lin.weight.shape[1], lin.weight.device)
                                         if cls.needs_data else None)))
        if any(s.needs_data for _, s in solvers):
            hooks = [lin.register_forward_pre_hook(lambda _m, args, s=s: s.add_batch(args[0]))
                     for lin, s in solvers if s.needs_data]
            try:
                self._forward_nll()
            finally:
                for h in hooks:
                    h.remove()
        return np.concatenate([s.scores().cpu().double().numpy() for _, s in solvers])

    def perplexity(self, dropped: np.ndarray) -> float:
        units = self.units()
        device, dtype = self.current.model.embed_tokens.weight.device, self.current.dtype
        for m in np.unique(units.module[dropped]):  # units of a module are contiguous, in its columns' order
            idx = np.flatnonzero(units.module == m)
            block, part = divmod(int(m), 2)
            width = self.geoms[block].head_dim if part == HEAD else 1
            mult = torch.ones(len(idx), width, device=device, dtype=dtype)
            mult[torch.from_numpy(dropped[idx])] = 0
            self.columns[(block, part)] = mult.reshape(-1)
        try:
            return float(np.exp(self._forward_nll()))
        finally:
            self.columns.clear()

    def remove(self, ids: list[tuple[int, int, int]]) -> None:
        gone = {(int(b), int(p), int(u)) for b, p, u in ids}
        blocks = [BlockState(tuple(h for h in b.heads if (i, HEAD, h) not in gone),
                             tuple(n for n in b.neurons if (i, NEURON, n) not in gone))
                  for i, b in enumerate(self.state.blocks)]
        self.state = StructuredState(tuple(blocks))
        self._build()

    @torch.inference_mode()
    def _forward_nll(self) -> float:
        """Mean next-token NLL of the current model (with the hooks' masks) over the calibration windows."""
        device = self.current.model.embed_tokens.weight.device
        total, count = 0.0, 0
        for i in range(0, self.windows.shape[0], self.batch):
            ids = self.windows[i: i + self.batch].to(device)
            logits = self.current(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
        return total / count


def found_name(s: BonsaiCfg) -> str:
    """The found model's name: bonsai, bonsai_<other prior>, prior_<prior> (prior-only): rows of their own."""
    if not s.perturb:
        return f"prior_{s.prior}"
    return "bonsai" if s.prior == "wanda_sp" else f"bonsai_{s.prior}"


class BonsaiRun:
    """The workflow of method=structured search=bonsai (called by StructuredRecipe.run)."""

    def __init__(self, recipe):
        self.recipe, self.ctx, self.rc = recipe, recipe.ctx, recipe.rc
        self.adapter = recipe.adapter
        self.applier = StateApplier(self.adapter)
        self.name = found_name(self.rc.search)

    def run(self) -> RecipeResult:
        ctx, rc, s = self.ctx, self.rc, self.rc.search
        geoms = geometry(self.adapter)
        units = structured_units(geoms, rc.method)
        budget = structured_budget(units, rc.method)
        steps = {u.part: u.step for u in units}
        removed = (budget.steps[0] * steps["attn"], budget.steps[1] * steps["mlp"])
        totals = (sum(g.num_q_heads for g in geoms), sum(g.mlp_width for g in geoms))
        with ctx.timed("calibration"):
            windows, proto = calibration(ctx, s.seq_len or rc.data.seq_len, s.samples)
        pruning = ShrunkPruning(ctx.loaded.model, windows, s.prior, s.batch, rc.seed)
        context = {"model": ctx.loaded.fingerprint, "calibration": proto.as_dict(), "dtype": str(pruning.current.dtype)}
        engine = Bonsai(settings_of(s, rc.seed), pruning, totals, removed, ctx.out_dir, context,
                        on_round=lambda r: ctx.tracker.log({"search": {k: r[k] for k in ("round", "seconds")}}))
        with ctx.timed("search"):
            t0 = time.time()
            rounds = engine.run()
            seconds = round(time.time() - t0, 2)
        state = pruning.state
        pruning.current = None
        info = {"kind": "bonsai", "rounds": len(rounds), "planned_rounds": len(engine.plan), "seconds": seconds,
                "prior": s.prior, "perturb": s.perturb, "sub_models": s.sub_models * s.perturb * len(rounds)}
        name = self.name
        models = evaluate_models(ctx, {"dense": None, name: state}, self.applier.apply, self.details,
                                 lambda st: None if st is None else ["bonsai", stable_hash(st.to_dict())], found=name)
        self.applier.restore()
        allocation = self.describe(state, models[name].details["achieved"], rounds, budget.params)
        write_json(ctx.out_dir / "allocation.json", allocation)
        export = self.recipe.export_format() != "none"
        if rc.train.kind != "none":
            models[f"{name}_trained"] = post_train(
                ctx, self.recipe.runner, f"{name}_trained", self.found_model(state),
                while_trained=(lambda e: self.export(state, allocation, e.to_json())) if export else None)
        elif export:
            self.applier.apply(state)
            try:
                self.export(state, allocation, models[name].to_json())
            finally:
                self.applier.restore()
        return RecipeResult(name, models, allocation, info, {"calibration": proto.as_dict()})

    def details(self, state: StructuredState | None) -> dict:
        if state is None:
            return {}
        a = measure_structured(self.adapter)
        return {"achieved": a, "summary": structured_summary(a)}

    def describe(self, state: StructuredState, achieved: dict, rounds: list[dict], budget: int) -> dict:
        rc = self.rc
        return {"method": "structured", "target": rc.method.target, "search": "bonsai", "found": self.name,
                "solver": "none",
                "database": "none (Bonsai prunes the model itself)", "prior": rc.search.prior,
                "achieved": {**achieved, "budget_params": budget}, "state": state.to_dict(),
                "rounds": [{k: v for k, v in r.items() if k != "removed"} for r in rounds],
                "summary": structured_summary(achieved)}

    def found_model(self, state: StructuredState) -> FoundModel:
        return FoundModel(lambda: self.applier.apply(state), self.applier.restore, lambda: self.applier.masks(state),
                          ["bonsai", stable_hash(state.to_dict())], lambda: self.details(state))

    def export(self, state: StructuredState, allocation: dict, entry: dict) -> None:
        """The shrunk checkpoint, from the weights the model holds (the state applied: one-shot or trained)."""
        rc, loaded = self.rc, self.ctx.loaded
        facts = CardFacts(loaded.name, loaded.source, loaded.fingerprint, "structured", rc.method.target, "bonsai",
                          f"none (prior {rc.search.prior})", f"`{rc.data.calib}`, {rc.data.calib_windows} x "
                          f"{rc.data.seq_len} tokens, seed {rc.data.seed}", rc.seed)
        with self.ctx.timed("export"):
            out = save_shrunk(loaded.model, state, self.ctx.out_dir / "model", loaded.tokenizer)
            write_json(out / "allocation.json", allocation, digest=False)
            (out / "README.md").write_text(model_card(facts, allocation, entry, "hf") + LOADING)
