"""Data for calibration and evaluation."""
from compresskit.data.text import (
    DEFAULT_SOURCE,
    EVAL_HEAD_TOKENS,
    calib_windows,
    eval_windows,
    load_text,
    token_stream,
)

__all__ = ["DEFAULT_SOURCE", "EVAL_HEAD_TOKENS", "calib_windows", "eval_windows", "load_text", "token_stream"]
