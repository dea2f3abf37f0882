"""Scalar round-to-nearest quantization, per output channel or per group of input columns.

Asymmetric (default): ``w = scale * q + zero`` with ``q`` in ``[0, 2^b - 1]`` spanning [min, max].
Symmetric: ``w = scale * (q - (2^b - 1) / 2)`` spanning [-max|w|, max|w|] with no zero point (so
1 bit gives +-max|w|). Scales and zero points are stored in float16 (float32 above 8 bits, where a
float16 scale's rounding would exceed a step over 2^b levels) and the codes are computed against
those rounded values, so reconstruction matches what is stored. Up to 16 bits: above 8 the codes are
16-bit integers in memory and bit-packed on disk (3DGS positions use 16).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from compresskit.quantizers.base import Quantizer, check_int
from compresskit.quantizers.packing import code_dtype
from compresskit.registry import register_quantizer

SCALE_BITS = 16  # float16 scales and zero points
MAX_BITS = 16


@register_quantizer("rtn")
class RTN(Quantizer):
    """Round-to-nearest. State: ``codes_ [m, n_padded]`` uint8 (a wider integer above 8 bits), ``scales_``/``zeros_ [m, n_groups]`` float16 (float32 above 8 bits)."""

    _state_tensors = ("scales_", "zeros_")

    def __init__(self, bits: int = 4, group_size: int | None = None, symmetric: bool = False):
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric

    def _validate_params(self) -> None:
        check_int("bits", self.name, self.bits, 1, MAX_BITS)
        if self.group_size is not None:
            check_int("group_size", self.name, self.group_size, 1, 1 << 30)

    @property
    def code_bits_(self) -> int:
        return self.bits

    @property
    def _scale_bits(self) -> int:
        return torch.finfo(self.stored_float_dtype()).bits

    def stored_float_dtype(self) -> torch.dtype:
        return torch.float16 if self.bits <= 8 else torch.float32

    def _group(self, cols: int) -> int:
        return cols if self.group_size is None else min(self.group_size, cols)

    def _size(self, shape: tuple[int, int]) -> dict[str, int]:
        rows, cols = shape
        g = self._group(cols)
        n_groups = math.ceil(cols / g)
        parts = {"codes": rows * n_groups * g * self.bits, "scales": rows * n_groups * self._scale_bits}
        if not self.symmetric:
            parts["zeros"] = rows * n_groups * self._scale_bits
        return parts

    def _fitted_size(self) -> dict[str, int]:
        parts = {"codes": self.codes_.numel() * self.bits, "scales": self.scales_.numel() * self._scale_bits}
        if not self.symmetric:
            parts["zeros"] = self.zeros_.numel() * self._scale_bits
        return parts

    def _grouped(self, W: torch.Tensor) -> torch.Tensor:
        """[m, n] -> [m, n_groups, g], zero-padding the last group."""
        m, n = W.shape
        g = self._group(n)
        self.pad_ = (-n) % g
        return torch.nn.functional.pad(W, (0, self.pad_)).reshape(m, -1, g)

    def _fit(self, W: torch.Tensor) -> None:
        Wg = self._grouped(W)
        dtype = self.stored_float_dtype()
        levels = 2**self.bits - 1
        if self.symmetric:
            scale = 2 * Wg.abs().amax(-1) / levels
            zero = torch.empty(0)
        else:
            lo, hi = Wg.amin(-1), Wg.amax(-1)
            scale = (hi - lo) / levels
            zero = lo.to(dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale works
        self.scales_ = scale.to(dtype)  # [m, n_groups]
        self.zeros_ = zero  # [m, n_groups] (asymmetric) or empty

    def _offset(self) -> torch.Tensor:
        """Value of code 0 per group: [m, n_groups, 1]."""
        if self.symmetric:
            return (-(2**self.bits - 1) / 2 * self.scales_.float()).unsqueeze(-1)
        return self.zeros_.float().unsqueeze(-1)

    def _transform(self, W: torch.Tensor) -> torch.Tensor:
        Wg = self._grouped(W)
        q = torch.round((Wg - self._offset()) / self.scales_.float().unsqueeze(-1))
        return q.clamp(0, 2**self.bits - 1).to(code_dtype(self.bits)).reshape(W.shape[0], -1)  # [m, n_padded]

    def _inverse(self, codes: torch.Tensor) -> torch.Tensor:
        m = codes.shape[0]
        n_groups = self.scales_.shape[1]
        q = codes.float().reshape(m, n_groups, -1)
        W = (q * self.scales_.float().unsqueeze(-1) + self._offset()).reshape(m, -1)
        return W[:, : W.shape[1] - self.pad_]

    def _extra_meta(self) -> dict[str, Any]:
        return {"pad_": self.pad_}

    def _load_extra_meta(self, meta: dict[str, Any]) -> None:
        self.pad_ = meta["pad_"]
