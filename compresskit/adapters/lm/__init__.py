"""The causal-LM family: any transformers ``AutoModelForCausalLM``, in one folder.

``adapter`` (:class:`CausalLMAdapter`, registered as ``"lm"``), ``resolve`` (model spec -> files,
offline), ``data`` (calibration and evaluation text, disjoint) and ``metrics`` (perplexity and the
losses). transformers is imported only when a model is loaded, so importing this package is cheap.
"""
from compresskit.adapters.lm.adapter import CausalLMAdapter
from compresskit.adapters.lm.data import DEFAULT_SOURCE, EVAL_HEAD_TOKENS, calib_windows, eval_windows, load_text, token_stream
from compresskit.adapters.lm.metrics import distill_loss, lm_logits, lm_loss, next_token_nll, perplexity, teacher_topk
from compresskit.adapters.lm.resolve import ALIASES, DEFAULT_SPEC

__all__ = [
    "ALIASES",
    "CausalLMAdapter",
    "DEFAULT_SOURCE",
    "DEFAULT_SPEC",
    "EVAL_HEAD_TOKENS",
    "calib_windows",
    "distill_loss",
    "eval_windows",
    "lm_logits",
    "lm_loss",
    "load_text",
    "next_token_nll",
    "perplexity",
    "teacher_topk",
    "token_stream",
]
