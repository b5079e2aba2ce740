"""No compression: the model as loaded, evaluated on the run's protocol (the reference every method is compared
with; `experiment=dense_reference` is the full-protocol one)."""
from __future__ import annotations

from evoexp.config import RunCfg
from evoexp.errors import UserError
from evoexp.eval import evaluate_ppl, evaluate_zeroshot
from evoexp.recipes.contract import ModelEval, RecipeContext, RecipeResult


class DenseRecipe:
    kinds = ("dense",)

    @classmethod
    def validate(cls, rc: RunCfg) -> None:
        """The search is not used; the model is not written (it is the checkpoint it was loaded from)."""
        if rc.export.kind != "none":
            raise UserError(f"export: method=dense writes no model (it is the checkpoint it was loaded from); use "
                            f"export=none, not {rc.export.kind}")

    def __init__(self, ctx: RecipeContext):
        self.ctx = ctx

    def run(self) -> RecipeResult:
        ctx, rc = self.ctx, self.ctx.rc
        model = ModelEval()
        if rc.eval.ppl and rc.eval.datasets:
            with ctx.timed("eval_ppl"):
                model.ppl = evaluate_ppl(ctx.loaded, rc.eval, rc.dtype.value, dense=True, run_dir=ctx.out_dir,
                                         state_id="dense")
        if rc.eval.zeroshot.tasks:
            with ctx.timed("eval_zeroshot"):
                model.zeroshot = evaluate_zeroshot(ctx.loaded, rc.eval.zeroshot, rc.dtype.value, dense=True,
                                                   run_dir=ctx.out_dir)
        return RecipeResult("dense", {"dense": model})
