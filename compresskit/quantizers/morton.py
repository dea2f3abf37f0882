"""A uniform grid per row whose columns are points, stored as Rice-coded gaps between Morton keys.

For a point set (3DGS positions: ``[3, N]``, a row per coordinate) the order of the points carries
no information, so a scene can be put in the order of a Morton (Z-order) curve first
(:func:`morton_order`) and each point then costs only the gap to the previous one's key. With
N points on a ``2^(3b)`` grid the gaps average about ``2^(3b) / N``, so a point costs about
``3b - log2 N + 2`` bits instead of ``3b`` (at 12 bits and 8k Gaussians: ~25 instead of 36).

Grid: ``lo`` is each row's minimum, ``step = (max - lo) / 2^b`` (float32 both), a code is
``floor((w - lo) / step)`` clamped to ``[0, 2^b - 1]``, and it decodes to the cell's centre. Because
``step`` at b bits is the 16-bit step times a power of two, a b-bit code is exactly the 16-bit code
shifted right: points in 16-bit Morton order are in Morton order at every b <= 16, bit for bit.

Storage of ``codes_`` (one uint8 stream, its length the size the report counts): a mode byte and a
Rice parameter byte, then

* mode 1 (rows x bits <= 62): the keys' gaps, Rice-coded: the number of escaped gaps (uint32), the
  low ``k`` bits of every gap packed, the escaped gaps raw (int64), then each gap's high part in
  unary (that many ones and a zero; ``ESCAPE`` ones for an escaped gap). A gap is escaped when it is
  negative (columns out of Morton order) or its unary part would be ``ESCAPE`` ones or more (a far
  jump, across a coarse Morton boundary);
* mode 0: the codes bit-packed as :class:`~compresskit.quantizers.rtn.RTN` packs them, when that is
  no larger (random order, or too many rows for one 64-bit key).

The estimate before any data is mode 0's size, an upper bound on what the fit stores.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compresskit.errors import CompressKitError
from compresskit.quantizers.base import Quantizer, check_int
from compresskit.quantizers.packing import code_dtype, pack_codes, unpack_codes
from compresskit.registry import register_quantizer

MAX_BITS = 16
ORDER_BITS = 16  # the grid morton_order sorts on: finer than, and aligned with, every b <= 16
KEY_BITS = 62  # rows x bits that fit one int64 key
ESCAPE = 64  # a gap whose Rice code would have this many ones or more is stored raw (RAW_BITS)
RAW_BITS = 64
COUNT_BYTES = 4  # the number of escaped gaps, uint32
HEADER_BITS = 16  # the mode byte and the Rice parameter byte
GRID_FLOAT_BITS = 32  # lo and step per row, float32 (positions need more than float16)
PLAIN, RICE = 0, 1


def grid(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, step)`` ``[rows, 1]`` float32 for ``W`` ``[rows, cols]`` at ``bits`` bits."""
    lo = W.amin(1, keepdim=True).float()
    step = (W.amax(1, keepdim=True).float() - lo) / 2**bits
    return lo, torch.where(step > 0, step, torch.ones_like(step))  # a constant row: any step


def grid_codes(W: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes ``[rows, cols]`` of ``W`` on the grid ``(lo, step)``."""
    return torch.floor((W.float() - lo) / step).clamp(0, 2**bits - 1).long()


def morton_keys(codes: torch.Tensor, bits: int) -> np.ndarray:
    """int64 Morton keys ``[cols]`` of integer ``codes`` ``[rows, cols]``: bit j of row i goes to bit
    ``j * rows + i``. Needs ``rows * bits <= 62``."""
    c = codes.numpy().astype(np.int64)
    rows = c.shape[0]
    keys = np.zeros(c.shape[1], dtype=np.int64)
    for j in range(bits):
        for i in range(rows):
            keys |= ((c[i] >> j) & 1) << (j * rows + i)
    return keys


def morton_order(points: torch.Tensor) -> torch.Tensor:
    """The permutation (long ``[N]``) that puts ``points`` ``[N, dims]`` in Morton order on the
    16-bit grid over their bounding box: the order in which a ``morton`` quantizer of any bits
    stores them most compactly."""
    W = points.detach().float().T
    lo, step = grid(W, ORDER_BITS)
    keys = morton_keys(grid_codes(W, lo, step, ORDER_BITS), ORDER_BITS)
    return torch.from_numpy(np.argsort(keys, kind="stable"))


def _pack_low(values: np.ndarray, k: int) -> np.ndarray:
    """The low ``k`` bits of each uint64 value, little-endian, packed into bytes."""
    if k == 0:
        return np.zeros(0, dtype=np.uint8)
    bits = ((values[:, None] >> np.arange(k, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def _unpack_low(raw: np.ndarray, k: int, n: int) -> np.ndarray:
    if k == 0:
        return np.zeros(n, dtype=np.uint64)
    bits = np.unpackbits(raw, bitorder="little")[: n * k].reshape(n, k).astype(np.uint64)
    return (bits << np.arange(k, dtype=np.uint64)).sum(1, dtype=np.uint64)


def _rice_bits(values: np.ndarray, k: int) -> int:
    high = values >> k
    escaped = (values < 0) | (high >= ESCAPE)
    return 8 * COUNT_BYTES + values.size * (k + 1) + int(np.where(escaped, ESCAPE + RAW_BITS, high).sum())


def rice_encode(values: np.ndarray) -> tuple[int, np.ndarray]:
    """``(k, stream)``: int64 ``values`` Rice-coded with the parameter that makes them smallest.

    A value below 0, or whose high part ``v >> k`` would take ``ESCAPE`` or more ones, is escaped:
    ``ESCAPE`` ones and its 64 bits raw, so a point out of order, or far from the previous one, costs
    about 130 bits, never a unary run of thousands.
    """
    values = values.astype(np.int64)
    typical = float(np.median(np.abs(values)))
    guess = int(math.log2(typical + 1))  # the best k is within a few bits of log2 of a typical gap
    k = min(range(max(0, guess - 4), min(KEY_BITS, guess + 4) + 1), key=lambda k: _rice_bits(values, k))
    high = values >> k
    escaped = (values < 0) | (high >= ESCAPE)
    high = np.where(escaped, ESCAPE, high)
    unary = np.ones(int(high.sum()) + values.size, dtype=np.uint8)
    unary[np.cumsum(high + 1) - 1] = 0  # each value's ones end with a zero
    low = _pack_low(np.where(escaped, 0, values).astype(np.uint64), k)
    count = np.array([int(escaped.sum())], dtype="<u4").view(np.uint8)
    raw = values[escaped].astype("<i8").view(np.uint8)
    return k, np.concatenate([count, low, raw, np.packbits(unary, bitorder="little")])


def rice_decode(stream: np.ndarray, k: int, n: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`: ``n`` int64 values."""
    n_escaped = int(stream[:COUNT_BYTES].copy().view("<u4")[0])
    n_low = math.ceil(n * k / 8)
    low = _unpack_low(stream[COUNT_BYTES : COUNT_BYTES + n_low], k, n).astype(np.int64)
    raw_start = COUNT_BYTES + n_low
    raw = stream[raw_start : raw_start + 8 * n_escaped].copy().view("<i8")
    ends = np.flatnonzero(np.unpackbits(stream[raw_start + 8 * n_escaped :], bitorder="little") == 0)[:n]
    if ends.size != n or raw.size != n_escaped:
        raise CompressKitError("morton: the stored positions are corrupt (the Rice stream ends early)")
    high = np.diff(ends, prepend=-1) - 1
    values = (high << k) | low
    values[high == ESCAPE] = raw
    return values


@register_quantizer("morton")
class Morton(Quantizer):
    """Point sets on a per-row grid. State: ``codes_ [rows, cols]`` (int16 above 8 bits),
    ``lo_``/``step_ [rows, 1]`` float32; the file holds ``codes_`` as the stream described above."""

    _state_tensors = ("lo_", "step_")
    # quantization in the loop moved ref-scene's points by several cells after they were sorted: the
    # stream then paid 3.1-4.9 bits per Gaussian for the points it put out of order (docs/quantizers.md)
    trains_in_loop = False

    def __init__(self, bits: int = 16):
        self.bits = bits

    def _validate_params(self) -> None:
        check_int("bits", self.name, self.bits, 1, MAX_BITS)

    @property
    def code_bits_(self) -> int:
        return self.bits

    def stored_float_dtype(self) -> torch.dtype:
        return torch.float32

    def _size(self, shape: tuple[int, int]) -> dict[str, int]:
        rows, cols = shape
        return {"codes": HEADER_BITS + 8 * math.ceil(rows * cols * self.bits / 8), "grid": 2 * rows * GRID_FLOAT_BITS}

    def _fitted_size(self) -> dict[str, int]:
        return {"codes": 8 * self._stored_codes().numel(), "grid": 2 * self.lo_.numel() * GRID_FLOAT_BITS}

    def _fit(self, W: torch.Tensor) -> None:
        self.lo_, self.step_ = grid(W, self.bits)

    def _transform(self, W: torch.Tensor) -> torch.Tensor:
        return grid_codes(W, self.lo_, self.step_, self.bits).to(code_dtype(self.bits))

    def _inverse(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.float() + 0.5) * self.step_.float() + self.lo_.float()

    def diagnostics(self) -> dict[str, Any]:
        """How ``codes_`` is stored: ``coding_`` ``"rice"`` or ``"plain"``; ``escaped_``, the gaps stored raw
        (points out of Morton order, or far from the previous one); the codes' bits per column (point)."""
        stream = self._stored_codes().numpy()
        out = {"coding_": "plain" if stream[0] == PLAIN else "rice", "code_bits_per_point_": 8 * (stream.size - 2) / self.codes_.shape[1]}
        out["escaped_"] = 0 if stream[0] == PLAIN else int(stream[2 : 2 + COUNT_BYTES].copy().view("<u4")[0])
        return out

    # ---- the stream ----------------------------------------------------------------------------
    def _stored_codes(self) -> torch.Tensor:
        """``codes_`` as stored: uint8 ``[bytes]``, the smaller of the Rice and the plain coding."""
        codes = self.codes_.long()
        plain = pack_codes(self.codes_, self.bits).numpy()
        best = np.concatenate([np.array([PLAIN, 0], dtype=np.uint8), plain])
        if codes.shape[0] * self.bits <= KEY_BITS:
            k, rice = rice_encode(np.diff(morton_keys(codes, self.bits), prepend=0))
            if rice.size < plain.size:
                best = np.concatenate([np.array([RICE, k], dtype=np.uint8), rice])
        return torch.from_numpy(best)

    def _codes_from_stored(self, stream: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        shape = tuple(meta["codes_shape_"])
        raw = stream.numpy()
        if raw[0] == PLAIN:
            return unpack_codes(torch.from_numpy(raw[2:].copy()), self.bits, shape)
        keys = np.cumsum(rice_decode(raw[2:], int(raw[1]), shape[1]))
        rows = shape[0]
        codes = np.zeros(shape, dtype=np.int64)
        for j in range(self.bits):
            for i in range(rows):
                codes[i] |= ((keys >> (j * rows + i)) & 1) << j
        return torch.from_numpy(codes).to(code_dtype(self.bits))
