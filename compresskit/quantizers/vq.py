"""Vector quantization: one k-means codebook for the whole tensor (or one per group of rows).

The weight ``[m, n]`` is cut into subvectors of d consecutive input columns (zero-padded when d does
not divide n); all of them share one codebook of k centroids (``row_groups`` > 1: one codebook per
block of ``m / row_groups`` rows). Defaults by target bits: d as for PQ, ``k = 2 ** (bits * d)``.
``row_scale=True`` keeps a float16 scale per row, as for PQ (see ``rowscale.py``); ``table_bits=8``
stores the codebooks as 8-bit levels, as for PQ (``tablecode.py``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from compresskit.errors import CompressKitError
from compresskit.quantizers.base import check_int
from compresskit.quantizers.codebook import (
    CodebookLayout,
    CodebookQuantizer,
    adaptation_note,
    identity_slots,
    power_of_two_at_most,
    too_few_subvectors,
)
from compresskit.quantizers.kmeans import assign, kmeans
from compresskit.quantizers.packing import code_dtype
from compresskit.quantizers.pq import subvector_dim, to_subvectors
from compresskit.quantizers.rowscale import SCALE_BITS, fit_row_scale, normalise_rows
from compresskit.quantizers.tablecode import check_bits, table_bits
from compresskit.registry import register_quantizer


@register_quantizer("vq")
class VQ(CodebookQuantizer):
    """k-means vector quantizer. State: ``codes_ [m, n_sub]``, ``codebooks_ [row_groups, k, d]`` float16,
    and with ``row_scale`` ``scale_ [m]`` float16."""

    def __init__(
        self,
        bits: int = 2,
        d: int | None = None,
        k: int | None = None,
        row_groups: int = 1,
        n_iter: int = 20,
        init: str = "kmeans++",
        noise: float = 0.0,
        row_scale: bool = False,
        table_bits: int = 16,
        seed: int = 0,
    ):
        self.bits = bits
        self.d = d
        self.k = k
        self.row_groups = row_groups
        self.n_iter = n_iter
        self.init = init
        self.noise = noise
        self.row_scale = row_scale
        self.table_bits = table_bits
        self.seed = seed

    def _validate_params(self) -> None:
        self.d_ = subvector_dim(self.bits, self.d, self.name)
        if self.k is None:
            self.k_ = 2 ** round(self.bits * self.d_)
            if self.k_ > 65536:
                raise CompressKitError(f"{self.name}: bits={self.bits} with d={self.d_} needs k={self.k_} > 65536; lower d")
        else:
            check_int("k", self.name, self.k, 2, 65536)
            self.k_ = self.k
        check_int("row_groups", self.name, self.row_groups, 1, 1 << 20)
        check_int("n_iter", self.name, self.n_iter, 0, 10000)
        if self.init not in ("kmeans++", "random"):
            raise CompressKitError(f"{self.name}: init must be 'kmeans++' or 'random', got {self.init!r}")
        if not isinstance(self.row_scale, bool):
            raise CompressKitError(f"{self.name}: row_scale must be True or False, got {self.row_scale!r}")
        check_bits(self.name, self.table_bits)

    @property
    def _state_tensors(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._table_state_names("codebooks_") + (("scale_",) if self.row_scale else ())

    @property
    def code_bits_(self) -> int:
        return max(1, math.ceil(math.log2(self.k_)))

    def _size(self, shape: tuple[int, int]) -> dict[str, int]:
        rows, cols = shape
        n_sub = math.ceil(cols / self.d_)
        return {
            "codes": rows * n_sub * self.code_bits_,
            "codebooks": table_bits(self.row_groups * self.k_, self.d_, self.row_groups, self.table_bits),
            **({"scales": rows * SCALE_BITS} if self.row_scale else {}),
        }

    def adapt_to_shape(self, shape: tuple[int, ...]) -> tuple["VQ | None", str | None]:
        """See :meth:`Quantizer.adapt_to_shape`. ``row_groups`` that do not divide the rows fall to
        the largest divisor below them; a codebook with fewer than k subvectors first has d lowered
        to the column count when it exceeds it (padded coordinates carry nothing, and with the
        default ``k = 2 ** (bits * d)`` that keeps the asked bits per weight), then k lowered to the
        largest power of two not above its subvectors (at least 2)."""
        q, reason = super().adapt_to_shape(shape)
        if q is None:
            return None, reason
        self._validate_params()
        shape = tuple(shape)
        rows, cols = shape[0], math.prod(shape[1:])
        changes: dict[str, tuple[int, int]] = {}
        reasons = []
        groups = self.row_groups
        if rows % groups:
            groups = max(g for g in range(1, min(groups, rows) + 1) if rows % g == 0)
            changes["row_groups"] = (self.row_groups, groups)
            reasons.append(f"{rows} rows, which {self.row_groups} row groups do not divide")
        d, k = self.d_, self.k_
        per_group = rows // groups * math.ceil(cols / d)
        if k > per_group and d > cols:
            d = cols
            k = 2 ** round(self.bits * d) if self.k is None else k  # the default k follows d
            changes["d"] = (self.d_, d)
            reasons.append(f"only {cols} input column{'s' if cols > 1 else ''}")
        if k > per_group:
            if per_group < 2:
                return None, too_few_subvectors(shape, per_group)
            k = power_of_two_at_most(per_group)
            reasons.append(f"only {per_group} subvectors per codebook")
        if k != self.k_:
            changes["k"] = (self.k_, k)
        if not changes:
            return self, None
        return self._adapted(adaptation_note(shape, changes, reasons), **{p: new for p, (_, new) in changes.items()})

    def codebook_layout(self) -> CodebookLayout:
        """``codebooks_ [row_groups, k, d]``; row i uses book ``i // (m / row_groups)``; ``scale_`` with ``row_scale``."""
        self._check_fitted()
        m, n_sub = self.codes_.shape
        device = self.codes_.device
        book = (torch.arange(m, device=device) // (m // self.row_groups))[:, None].expand(m, n_sub).contiguous()
        slots = identity_slots(self.row_groups, self.k_, device)
        scale = self.scale_ if self.row_scale else None
        return CodebookLayout(self.codebooks_, "codebooks_", slots, book, self.k_, self.codebooks_.shape[-1], scale)

    def _groups(self, W: torch.Tensor) -> torch.Tensor:
        """[m, n] -> [row_groups, (m / row_groups) * n_sub, d] (row-major within a group)."""
        m = W.shape[0]
        if m % self.row_groups:
            raise CompressKitError(f"{self.name}: row_groups={self.row_groups} does not divide the {m} rows")
        sub, pad = to_subvectors(W, self.d_)  # [n_sub, m, d]
        self.pad_ = pad
        return sub.transpose(0, 1).reshape(self.row_groups, -1, self.d_).contiguous()

    def _fit(self, W: torch.Tensor) -> None:
        if self.row_scale:
            self.scale_ = fit_row_scale(W)  # [m] float16
        X = self._groups(self._normalise(W))
        if self.k_ > X.shape[1]:
            raise CompressKitError(
                f"{self.name}: k={self.k_} centroids need at least {self.k_} subvectors per codebook, "
                f"but this weight gives {X.shape[1]}; lower k or bits, or use fewer row_groups"
            )
        C, _, _ = kmeans(X, self.k_, self.n_iter, self.init, float(self.noise), self.seed)
        self._hold_table("codebooks_", C)  # [row_groups, k, d] float16 (on its grid with 8-bit tables)

    def _normalise(self, W: torch.Tensor) -> torch.Tensor:
        return normalise_rows(W, self.scale_) if self.row_scale else W

    def _transform(self, W: torch.Tensor) -> torch.Tensor:
        X = self._groups(self._normalise(W))
        codes = assign(X, self.codebooks_.float())  # [row_groups, rows_per_group * n_sub]
        return codes.reshape(W.shape[0], -1).to(code_dtype(self.code_bits_))  # [m, n_sub]

    def _inverse(self, codes: torch.Tensor) -> torch.Tensor:
        m, n_sub = codes.shape
        group = (torch.arange(m) // (m // self.row_groups))[:, None]  # [m, 1]
        flat = self.codebooks_.float().reshape(-1, self.d_)
        W = flat[group * self.k_ + codes.long()].reshape(m, n_sub * self.d_)
        if self.row_scale:
            W = W * self.scale_.float()[:, None]
        return W[:, : W.shape[1] - self.pad_]

    def _extra_meta(self) -> dict[str, Any]:
        return {"pad_": self.pad_}

    def _load_extra_meta(self, meta: dict[str, Any]) -> None:
        self.pad_ = meta["pad_"]
