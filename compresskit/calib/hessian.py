"""Streaming ``X^T X`` of a layer's inputs: the proxy Hessian that GPTQ-style solvers need.

For a linear layer ``y = x W^T`` the squared output error of a replacement weight ``W_hat`` over the
calibration inputs is ``tr((W - W_hat) H (W - W_hat)^T)`` with ``H = X^T X``. The accumulator adds
one batch of inputs at a time and keeps only the ``[n, n]`` sum, never the activations (as
``add_batch`` does in the reference GPTQ code, Frantar et al. 2022, IST-DASLab/gptq).

Conventions (these differ from the reference on purpose):

* ``hessian`` is ``X^T X / N``, the mean outer product over the ``N`` input rows seen (every
  leading dimension counts: a ``[batch, seq, n]`` input adds ``batch * seq`` rows). The reference
  uses ``2 X^T X / N`` with ``N`` counting sequences; GPTQ's result does not depend on the scale
  (its damping is relative to the mean diagonal).
* The sum is kept in float64 by default and divided only when read, so the result does not depend
  on how the rows were split into batches (up to float64 rounding). Memory is ``8 n^2`` bytes
  (~1 GB at n = 11008); pass ``dtype=torch.float32`` to halve it.

Conv2d layers: a conv is a linear layer on unfolded patches. :func:`conv_inputs` unfolds an input
``[B, C, H, W]`` with the conv's kernel, stride, padding and dilation into rows
``[B * L, C * kh * kw]`` whose column order matches ``conv.weight.flatten(1)``;
:meth:`HessianAccumulator.add_conv_batch` feeds those rows to :meth:`~HessianAccumulator.add_batch`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compresskit.errors import CompressKitError


class HessianAccumulator:
    """Running ``X^T X`` over streamed input batches.

    ``xtx_  # [n_features, n_features]`` sum of outer products (``dtype``, on ``device``);
    ``n_samples_`` rows seen so far.
    """

    def __init__(self, n_features: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise CompressKitError(f"HessianAccumulator: n_features must be a positive integer, got {n_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise CompressKitError(f"HessianAccumulator: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.n_features = n_features
        self.xtx_ = torch.zeros(n_features, n_features, dtype=dtype, device=device)
        self.n_samples_ = 0

    def add_batch(self, x: torch.Tensor) -> "HessianAccumulator":
        """Add inputs ``x [..., n_features]`` (any float dtype; leading dims are flattened to rows).

        Added a band of rows of ``X^T X`` at a time, with no ``[n, n]`` temporary, when the inputs
        cannot overflow it; the values are those :meth:`partial` then :meth:`add_partial` give."""
        rows = self._rows(x)
        if rows.shape[0] and self._bounded(rows):
            banded_product(rows, rows, into=self.xtx_)
            self.n_samples_ += rows.shape[0]
            return self
        return self.add_partial(*self._whole_partial(rows))

    def partial(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """``(rows^T rows, number of rows)`` of inputs ``x``, computed as :meth:`add_batch` does but not
        added (``(None, 0)`` for no rows): a distributed walk adds every rank's partials in the
        calibration batches' order with :meth:`add_partial`, which reproduces ``add_batch`` exactly."""
        rows = self._rows(x)
        if rows.shape[0] and self._bounded(rows):
            return banded_product(rows, rows), rows.shape[0]
        return self._whole_partial(rows)

    @staticmethod
    def _whole_partial(rows: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """``rows^T rows`` made whole and checked: for no rows, or values large enough to overflow it."""
        if rows.shape[0] == 0:
            return None, 0
        batch = rows.T @ rows  # [n, n]
        if not torch.isfinite(batch).all():
            raise CompressKitError(
                "HessianAccumulator: this batch of inputs has NaN or infinite values; check the calibration data"
            )
        return batch, rows.shape[0]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise CompressKitError(f"HessianAccumulator: expected a float tensor of inputs, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.n_features:
            raise CompressKitError(
                f"HessianAccumulator: inputs must end in {self.n_features} features, got shape {tuple(x.shape)}"
            )
        return x.detach().reshape(-1, self.n_features).to(device=self.xtx_.device, dtype=self.xtx_.dtype)

    def _bounded(self, rows: torch.Tensor) -> bool:
        """Are ``rows`` finite (else one clear error) and small enough that no entry of ``rows^T rows``
        can overflow (``N * max|x|^2`` far below the dtype's largest value)?"""
        low, high = (float(v) for v in torch.aminmax(rows))
        top = max(-low, high)
        if not math.isfinite(top):
            raise CompressKitError(
                "HessianAccumulator: this batch of inputs has NaN or infinite values; check the calibration data"
            )
        return rows.shape[0] * top * top < torch.finfo(rows.dtype).max / 16


    def add_partial(self, batch: torch.Tensor | None, n_rows: int) -> "HessianAccumulator":
        """Add a :meth:`partial` (``batch [n_features, n_features]`` in this accumulator's dtype)."""
        if batch is not None:
            self.xtx_ += batch
            self.n_samples_ += n_rows
        return self

    def add_conv_batch(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> "HessianAccumulator":
        """Add the input ``x [B, C, H, W]`` (or ``[C, H, W]``) of ``conv``, unfolded into patches."""
        return self.add_batch(conv_inputs(x, conv))

    @property
    def hessian(self) -> torch.Tensor:
        """``X^T X / N``  # [n_features, n_features], in the accumulator's dtype."""
        if self.n_samples_ == 0:
            raise CompressKitError(
                "HessianAccumulator: no inputs were added; call add_batch(x) on calibration inputs first"
            )
        return self.xtx_ / self.n_samples_

    def take_hessian(self) -> torch.Tensor:
        """:attr:`hessian` made in place, without a second ``[n, n]`` copy: the same values, but the
        accumulator is spent (its sum is gone)."""
        H = self.hessian if self.n_samples_ == 0 else self.xtx_.div_(self.n_samples_)
        self.xtx_, self.n_samples_ = None, 0
        return H


def banded_product(a: torch.Tensor, b: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``a^T b`` (``a [N, n]``, ``b [N, p]`` -> ``[n, p]``) made a band of rows at a time: added to
    ``into`` in place (no ``[n, p]`` temporary), or written into a new tensor. Both give the same
    values, band for band, so a sum built either way is the same to the bit."""
    out = torch.empty(a.shape[1], b.shape[1], dtype=a.dtype, device=a.device) if into is None else into
    for band in row_bands(a.shape[1], b.shape[1]):
        part = a[:, band].T @ b
        if into is None:
            out[band] = part
        else:
            out[band] += part
    return out


def conv_inputs(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """Patches of a Conv2d input as rows: ``[B * L, C * kh * kw]``, so ``conv(x)`` is ``rows @ W.flatten(1).T``.

    Supports ``groups=1`` and ``padding_mode='zeros'``; ``padding`` may be ints or ``'valid'`` /
    ``'same'`` (asymmetric 'same' padding is applied with ``F.pad``).
    """
    if not isinstance(conv, torch.nn.Conv2d):
        raise CompressKitError(f"conv_inputs: expected a torch.nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise CompressKitError(
            f"conv_inputs: only groups=1 and padding_mode='zeros' are supported, got groups={conv.groups}, "
            f"padding_mode={conv.padding_mode!r}"
        )
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise CompressKitError(
            f"conv_inputs: expected input [B, {conv.in_channels}, H, W], got shape {tuple(x.shape)}"
        )
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # stride is 1 here (torch enforces it); total pad dilation * (k - 1), extra on the right
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = (0, 0)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)  # [B, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64: the relative damping of GPTQ, the E-step and the
    layer-wise M-step."""
    Hd = H.double()  # a copy even when H is float64: the ridge goes on in place, with no [n, n] identity
    if Hd is H:
        Hd = H.clone()
    Hd.diagonal().add_(ridge(H, damp))
    return Hd


def ridge(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``damp * mean(diag H)`` (float64, never negative): what :func:`damped` adds to the diagonal."""
    return damp * H.diagonal().double().mean().clamp(min=0)


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight a layer should approximate so its outputs match the *uncompressed* model's.

    A layer of the compressed model sees inputs ``X_q`` that earlier compression has moved away from
    the original model's ``X``. Matching the original outputs, ``|X_q W_hat^T - X W^T|^2``, equals
    ``tr((W_hat - T) H (W_hat - T)^T)`` up to a constant, with ``H = X_q^T X_q / N`` and
    ``T = W G^T H^{-1}``, ``G = X_q^T X / N`` (the asymmetric calibration of GPTAQ, Li et al. 2025).
    So every Hessian-driven solver (GPTQ, the E-step, the layer-wise M-step) keeps its objective and
    only swaps ``W`` for ``T``. Written as ``T = W + W (G - H)^T (H + lambda I)^{-1}`` with the
    damping ``lambda = damp * mean(diag H)`` on the correction only, so ``T == W`` exactly when
    ``X_q == X``.

    ``W``: ``[m, ...]`` (flattened to ``[m, n]``); ``H``, ``G``: ``[n, n]``. Returns float32 in ``W``'s shape.
    """
    W2 = W.detach().reshape(W.shape[0], -1)
    m, n = W2.shape
    if H.shape != (n, n) or G.shape != (n, n):
        raise CompressKitError(f"asymmetric_target: H {tuple(H.shape)} and G {tuple(G.shape)} must be [{n}, {n}] for this weight")
    # in float64, with no [n, n] float64 temporary but the factor (a 7B MLP's n = 11008: 970 MB each):
    # (G - H) W^T is made a band of rows at a time, and the solve overwrites its right-hand side
    Wd = W2.double()
    rhs = torch.empty(n, m, dtype=torch.float64)
    for rows in row_bands(n, n):
        torch.matmul(G[rows].double() - H[rows].double(), Wd.T, out=rhs[rows])  # (G - H) W^T, [n, m]
    del Wd, G  # G is not needed again: a caller that let go of it gets its memory back now
    L = damped(H, damp)
    L.diagonal().add_(1e-12)
    # factored in place: the matrix is symmetric, so its transpose is the same values in column-major
    # order, which LAPACK works on without a copy (a row-major matrix is copied first: 970 MB more).
    # The two triangular solves read the factor in place too, where cholesky_solve copies it.
    F = L.mT
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(F, out=(F, info))
    if int(info):
        raise CompressKitError("asymmetric_target: the damped Hessian is not positive definite; raise damp")
    for cols in row_bands(m, n):
        y = torch.linalg.solve_triangular(F, rhs[:, cols], upper=False)
        rhs[:, cols] = torch.linalg.solve_triangular(F.mT, y, upper=True)  # Hd^{-1} (G - H) W^T
    del L, F, y
    out = torch.empty(m, n, dtype=torch.float32)
    for rows in row_bands(m, n):
        out[rows] = (W2[rows].double() + rhs[:, rows].T).float()  # W + W (G - H)^T Hd^{-1}
    return out.reshape(W.shape)


def row_bands(size: int, width: int, budget: int = 2**23) -> list[slice]:
    """``range(size)`` in slices of about ``budget`` elements of a ``[band, width]`` tensor (64 MiB of
    float64): how work on ``[n, n]`` and ``[m, n]`` matrices is cut so its temporaries stay small."""
    step = max(1, budget // max(1, width))
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]
