"""Per-row (output-channel) scales for the codebook quantizers (``row_scale=True`` on PQ and VQ).

Rows of a weight differ in magnitude, so centroids shared by many rows are spent on the spread of
magnitudes rather than on the directions within a subvector. With a row scale, each row ``i`` is
divided by its RMS ``s_i`` before k-means and rebuilt as ``s_i * centroid``; the scales cost 16 bits
per row (float16, trainable like the centroids). AQLM and GPTVQ keep such scales for the same reason.
"""
from __future__ import annotations

import torch

from compresskit.quantizers.codebook import CodebookQuantizer

SCALE_BITS = 16  # float16 per row


def fit_row_scale(W: torch.Tensor) -> torch.Tensor:
    """Per-row RMS of ``W [m, n]`` as float16 ``[m]``; a zero row gets scale 0, so it is rebuilt as
    exactly zero whatever its codes."""
    return W.pow(2).mean(1).sqrt().to(torch.float16)


def normalise_rows(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W [m, n] / scale [m]`` per row; rows with scale 0 are left as they are."""
    s = scale.float()
    return W / torch.where(s != 0, s, torch.ones_like(s))[:, None]


def row_scale_of(quantizer, m: int) -> torch.Tensor:
    """The fitted quantizer's row scales ``[m]`` in float32, ones when it keeps none (a codebook
    quantizer without ``row_scale``, or any other quantizer)."""
    scale = quantizer.codebook_layout().row_scales if isinstance(quantizer, CodebookQuantizer) else None
    return torch.ones(m) if scale is None else scale.detach().float()
