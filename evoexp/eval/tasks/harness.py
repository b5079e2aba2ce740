"""The harness's own task functions, imported (not copied), so preprocessing and prompts are its standard ones."""
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text

__all__ = ["hellaswag_process_docs", "winogrande_doc_to_choice", "winogrande_doc_to_target", "winogrande_doc_to_text"]
