from evoexp.eval.ppl import evaluate_ppl, parameters_as, windows_nll

__all__ = ["evaluate_ppl", "parameters_as", "windows_nll"]
