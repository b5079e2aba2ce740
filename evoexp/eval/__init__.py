from evoexp.eval.ppl import evaluate_ppl, heldout_tracker, parameters_as, windows_nll
from evoexp.eval.zeroshot import check_zeroshot, evaluate_zeroshot, zeroshot_scalars

__all__ = ["evaluate_ppl", "heldout_tracker", "parameters_as", "windows_nll", "check_zeroshot", "evaluate_zeroshot", "zeroshot_scalars"]
