from evoexp.data.sources import Text, check_source, read_text
from evoexp.data.tokens import (TokenStream, WindowProtocol, calibration_windows, eval_windows, load_tokens,
                                tokenizer_fingerprint)

__all__ = ["Text", "check_source", "read_text", "TokenStream", "WindowProtocol", "calibration_windows", "eval_windows",
           "load_tokens", "tokenizer_fingerprint"]
