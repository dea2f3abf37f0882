"""Causal-LM calibration and evaluation text, tokenized once, split so the two never overlap.

The default text needs no download: the help topics that ship with Python (``pydoc_data.topics``),
joined in sorted key order so every run sees the same characters. Any UTF-8 text file works too.

Disjointness rule, for every text: the first :data:`EVAL_HEAD_TOKENS` tokens are the evaluation
region (evaluation reads its first ``n_tokens`` tokens and never more than the region); calibration
windows are sampled only from the tokens after it. Calibration and evaluation on the same text, or
on different texts, therefore never share a token position.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from compresskit.errors import CompressKitError

DEFAULT_SOURCE = "pydoc"
EVAL_HEAD_TOKENS = 32768  # tokens reserved for evaluation at the head of every text


@lru_cache(maxsize=1)
def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str | None = None) -> str:
    """The text named by ``source``: ``None`` or ``"pydoc"`` for Python's help topics, else a file path."""
    if source is None or source == DEFAULT_SOURCE:
        return _pydoc_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise CompressKitError(
            f"text source {source!r} is not a file; pass a UTF-8 text file or {DEFAULT_SOURCE!r} for the built-in text"
        )
    return path.read_text(encoding="utf-8")


def token_stream(tokenizer, source: str | None = None) -> torch.Tensor:
    """The whole text of ``source`` as one token sequence, without special tokens.

    Returns a LongTensor ``[n_tokens]``.
    """
    # verbose=False: the stream is longer than the model's context on purpose; windows cut it later.
    ids = tokenizer(load_text(source), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)  # [n_tokens]


def eval_windows(tokens: torch.Tensor, n_tokens: int = 8192, window: int = 512) -> torch.Tensor:
    """The first ``n_tokens`` tokens cut into non-overlapping windows: LongTensor ``[n_tokens // window, window]``.

    ``n_tokens`` must be a multiple of ``window`` and at most :data:`EVAL_HEAD_TOKENS`.
    """
    if window < 2 or n_tokens < window or n_tokens % window:
        raise CompressKitError(
            f"evaluation needs n_tokens ({n_tokens}) to be a positive multiple of window ({window} >= 2)"
        )
    if n_tokens > EVAL_HEAD_TOKENS:
        raise CompressKitError(
            f"evaluation reads at most the first {EVAL_HEAD_TOKENS} tokens of a text (calibration samples only "
            f"after them, so the two never overlap); pass n_tokens <= {EVAL_HEAD_TOKENS}"
        )
    if tokens.numel() < n_tokens:
        raise CompressKitError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than n_tokens={n_tokens}; "
            "pass a smaller n_tokens or a longer text"
        )
    return tokens[:n_tokens].reshape(-1, window)  # [n_windows, window]


def calib_windows(
    tokens: torch.Tensor,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    exclude: tuple[int, int] = (0, EVAL_HEAD_TOKENS),
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at random starts (seeded), none touching the token
    range ``exclude`` (half-open; by default the evaluation region). LongTensor ``[n_samples, seq_len]``.

    Windows may overlap each other, as in GPTQ-style calibration; they never overlap ``exclude``.
    """
    if n_samples < 1 or seq_len < 2:
        raise CompressKitError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    lo, hi = exclude
    n = tokens.numel()
    # valid starts: the window ends before the excluded range, or starts after it
    starts = torch.cat([torch.arange(0, max(lo - seq_len + 1, 0)), torch.arange(hi, max(n - seq_len + 1, hi))])
    if starts.numel() == 0:
        raise CompressKitError(
            f"the calibration text has {n} tokens, too few for {seq_len}-token windows outside tokens "
            f"[{lo}, {hi}) (kept for evaluation); give a text of at least {hi + seq_len} tokens or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    picks = starts[torch.randint(starts.numel(), (n_samples,), generator=gen)]  # [n_samples]
    offsets = torch.arange(seq_len)  # [seq_len]
    return tokens[picks[:, None] + offsets[None, :]]  # [n_samples, seq_len]
