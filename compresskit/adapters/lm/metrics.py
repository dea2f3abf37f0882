"""Causal-LM quality and losses: perplexity, next-token loss, distillation to a teacher's top-k.

Perplexity is ``exp(total NLL / number of predicted tokens)`` over non-overlapping windows; inside a
window every token but the first is predicted from the ones before it, so a run over ``n`` windows of
``w`` tokens scores ``n * (w - 1)`` tokens. Windows are batched a few at a time, under
``torch.no_grad()``.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def lm_logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Next-token logits of a causal LM: float ``[batch, seq, vocab]`` for LongTensor ``input_ids``
    ``[batch, seq]``; ``kwargs`` are further model-call arguments. No KV cache is built."""
    kwargs.setdefault("use_cache", False)  # calibration batches carry it already
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out  # [batch, seq, vocab]


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]`` (nats).

    ``logits`` is ``[batch, seq, vocab]``, ``input_ids`` LongTensor ``[batch, seq]``.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1), reduction=reduction
    )


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of a causal LM on one batch of model kwargs (must hold ``input_ids``)."""
    kwargs = dict(batch)
    input_ids = kwargs.pop("input_ids")
    return next_token_nll(lm_logits(model, input_ids, **kwargs), input_ids)


@torch.no_grad()
def teacher_topk(model: nn.Module, batch: dict[str, torch.Tensor], k: int = 64) -> dict[str, torch.Tensor]:
    """The model's next-token distribution on one batch, kept as its ``k`` likeliest tokens.

    Returns ``{"logp": float32 [batch, seq, k] log-probabilities, "index": int32 [batch, seq, k]}``:
    ``8 k`` bytes per token instead of ``4 vocab`` (64 x 512-token sequences at k = 64: 16.8 MB).
    """
    kwargs = dict(batch)
    input_ids = kwargs.pop("input_ids")
    logp = F.log_softmax(lm_logits(model, input_ids, **kwargs).float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return {"logp": top.values, "index": top.indices.int()}


def distill_loss(model: nn.Module, batch: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean KL(teacher || model) per token over the teacher's top-k tokens plus one bucket for the rest.

    ``teacher`` comes from :func:`teacher_topk` on the uncompressed model. Coarsening both
    distributions to the same k + 1 outcomes keeps the KL exact for them (and zero only when the
    model gives every top-k token the teacher's probability), at a fraction of the memory of full logits.
    """
    kwargs = dict(batch)
    input_ids = kwargs.pop("input_ids")
    logq_all = F.log_softmax(lm_logits(model, input_ids, **kwargs).float(), dim=-1)  # [batch, seq, vocab]
    logq = logq_all.gather(-1, teacher["index"].long())  # [batch, seq, k]
    logp = teacher["logp"]
    p = logp.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(1e-8)
    rest_q = (1 - logq.exp().sum(-1)).clamp_min(1e-8)
    kl = (p * (logp - logq)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())  # [batch, seq]
    return kl.mean()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Perplexity of a causal LM over ``windows`` (LongTensor ``[n_windows, window]``).

    Returns ``{"perplexity", "nll_mean" (nats/token), "n_tokens" (tokens predicted), "seconds"}``.
    ``progress(done, total)`` is called after each batch of windows.
    """
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum, n_predicted = 0.0, 0
    try:
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size]  # [b, window]
            nll_sum += next_token_nll(lm_logits(model, batch), batch, reduction="sum").item()
            n_predicted += batch.shape[0] * (batch.shape[1] - 1)
            if progress is not None:
                progress(min(first + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        model.train(was_training)
    nll_mean = nll_sum / n_predicted
    return {
        "perplexity": math.exp(nll_mean),
        "nll_mean": nll_mean,
        "n_tokens": float(n_predicted),
        "seconds": time.perf_counter() - start,
    }
