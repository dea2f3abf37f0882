"""Codebook quantizers: the protocol calibration uses to change codes, centroids and row scales.

A codebook quantizer rebuilds every subvector (``d`` consecutive input columns of one row) as a row of
a float centroid *table*, optionally times a per-row scale. PQ, VQ, and any quantizer a user
registers that derives from :class:`CodebookQuantizer`, describe that table with one
:meth:`~CodebookQuantizer.codebook_layout`; the E-step, the layer-wise M-step, dead-centroid
re-initialisation and soft assignments (``compresskit.calib``) read only the layout and write only
through the setters, so they need no knowledge of any one quantizer's attributes.

The setters write in place (``copy_``): a compressed module whose buffers and parameters are the
quantizer's tensors (see :meth:`Quantizer.bind_state`) sees every change, and nothing is reallocated.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from compresskit.errors import CompressKitError
from compresskit.quantizers import tablecode
from compresskit.quantizers.base import Quantizer, _describe


@dataclass(frozen=True)
class CodebookLayout:
    """How a fitted codebook quantizer's codes map to centroids.

    ``table``: the stored float state tensor that holds the centroids itself (not a copy), either
    ``[n_books, k, d]`` (book ``b`` owns ``table[b]``; e.g. PQ's ``codebooks_``, VQ's
    ``codebooks_ [row_groups, k, d]``) or ``[P, d]``, a pool every book reads (PQ's ``pool_``).
    ``table_name``: its name among the quantizer's state tensors (``"pool_"``).
    ``slot_rows  # [n_books, k] int64``: the row of ``table.reshape(-1, d)`` that code ``c`` of book
    ``b`` reads (the identity ``b * k + c`` for a 3-D table, the projection for a pool).
    ``book  # [m, n_sub] int64``: which book code ``codes_[i, g]`` indexes.
    ``row_scales  # [m]`` the stored per-row scale tensor (the weight is ``scale[:, None] *`` the
    centroids), or None when the quantizer keeps none.
    """

    table: torch.Tensor
    table_name: str
    slot_rows: torch.Tensor
    book: torch.Tensor
    k: int
    d: int
    row_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n_books = self.slot_rows.shape[0]
        if self.table.dim() not in (2, 3) or self.table.shape[-1] != self.d:
            raise CompressKitError(f"CodebookLayout: table must be [n_books, k, d] or [P, d] with d={self.d}, got {list(self.table.shape)}")
        if self.table.dim() == 3 and tuple(self.table.shape[:2]) != (n_books, self.k):
            raise CompressKitError(f"CodebookLayout: a 3-D table must be [{n_books}, {self.k}, {self.d}] to match slot_rows, got {list(self.table.shape)}")
        if tuple(self.slot_rows.shape) != (n_books, self.k) or self.book.dim() != 2:
            raise CompressKitError(
                f"CodebookLayout: slot_rows must be [n_books, k={self.k}] and book [m, n_sub], got {list(self.slot_rows.shape)} and {list(self.book.shape)}"
            )

    @property
    def n_books(self) -> int:
        return self.slot_rows.shape[0]

    @property
    def pooled(self) -> bool:
        """True when ``table`` is a pool ``[P, d]`` shared by all books, False when each book owns ``table[b]``."""
        return self.table.dim() == 2

    def centroids(self) -> torch.Tensor:
        """The centroids as reconstruction sees them: ``[n_books, k, d]`` float32 (a pool looked up)."""
        return self.table.detach().float().reshape(-1, self.d)[self.slot_rows]

    def entries(self, codes: torch.Tensor) -> torch.Tensor:
        """Rows of ``table.reshape(-1, d)`` that ``codes [m, n_sub]`` read: ``[m, n_sub]`` int64."""
        return self.slot_rows.reshape(-1)[self.book * self.k + codes.long()]


class CodebookQuantizer(Quantizer, metaclass=abc.ABCMeta):
    """A quantizer whose codes index a float centroid table (see the module docstring).

    Subclasses implement :meth:`codebook_layout`; the setters are shared. Codes are ``codes_
    [m, n_sub]`` with ``n_sub * d`` the padded input width, as for PQ and VQ.
    """

    supports_codebook_update: ClassVar[bool] = True

    @abc.abstractmethod
    def codebook_layout(self) -> CodebookLayout:
        """The fitted quantizer's :class:`CodebookLayout` (its tensors are the stored state, not copies).
        Raises CompressKitError when the quantizer is not fitted."""

    def set_codes(self, codes: torch.Tensor) -> None:
        """Write integer ``codes [m, n_sub]`` (each below k) into ``codes_`` in place, cast to its dtype."""
        self._check_fitted()
        k = self.codebook_layout().k
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.shape != self.codes_.shape:
            raise CompressKitError(f"{self.name}: set_codes needs integer codes of shape {list(self.codes_.shape)}, got {_describe(codes)}")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < k):
            raise CompressKitError(f"{self.name}: codes must lie in [0, {k}), got values from {int(codes.min())} to {int(codes.max())}")
        self.codes_.copy_(codes.to(self.codes_.dtype))

    def set_centroids(self, table: torch.Tensor) -> None:
        """Write ``table`` (the shape of ``codebook_layout().table``) into the stored table in place,
        rounded to its stored dtype (float16 for PQ and VQ) and, with ``table_bits=8``, to its grid."""
        stored = self.codebook_layout().table
        _copy_float(self.name, "set_centroids", stored, table)
        self.settle()

    # ---- 8-bit tables (``table_bits=8``, see tablecode.py) ----------------------------------------
    # In memory the table stays float16 (what decoding, calibration and the kernels read), held on
    # a grid whose ``lo`` and ``step`` are one more state tensor, ``<table>grid_`` [..., 2, d]; on
    # disk the table is its 8-bit levels, ``<table>q_``. Everything that writes the table settles it.
    @property
    def table_bits_(self) -> int:
        return getattr(self, "table_bits", 16)

    def _table_state_names(self, table_name: str) -> tuple[str, ...]:
        """The stored names of the table ``table_name``: itself, and its grid with 8-bit tables."""
        return (table_name, table_name + "grid_") if self.table_bits_ == 8 else (table_name,)

    def _hold_table(self, name: str, table: torch.Tensor) -> None:
        """Set the table attribute ``name`` to ``table`` in float16 (during a fit: replaces the tensor),
        on its grid with 8-bit tables."""
        if self.table_bits_ == 8:
            table, grid = tablecode.snap(table)
            setattr(self, name + "grid_", grid)
        setattr(self, name, table.to(torch.float16))

    def settle(self) -> None:
        """Put the centroid table on its 8-bit grid, in place (the grid follows the table's range)."""
        if self.table_bits_ != 8:
            return
        layout = self.codebook_layout()
        snapped, grid = tablecode.snap(layout.table)
        stored = getattr(self, layout.table_name + "grid_")  # set by the fit or from_state
        with torch.no_grad():  # in place: a module holding these tensors sees the change
            layout.table.copy_(snapped.to(layout.table.dtype))
            stored.copy_(grid.to(stored.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """As :meth:`Quantizer.state_tensors`; an 8-bit table is stored as its levels ``<table>q_``
        (uint8) beside its grid, and must lie on that grid (it does after :meth:`settle`)."""
        out = super().state_tensors()
        if self.table_bits_ != 8:
            return out
        name = self.codebook_layout().table_name
        table, grid = out.pop(name).cpu(), out[name + "grid_"].cpu()
        lo, step = grid.split(1, dim=-2)
        q = tablecode.quantize(table, lo, step)
        if not torch.equal(tablecode.decode(q, lo, step), table.to(torch.float16)):
            raise CompressKitError(f"{self.name}: the centroid table is off its 8-bit grid (written without settle()); call quantizer.settle() before saving")
        out[name + "q_"] = q
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Quantizer":
        """As :meth:`Quantizer.from_state`; an 8-bit table is rebuilt from its levels and grid."""
        tensors = dict(tensors)
        for key in [k for k in tensors if k.endswith("_q_")]:
            table_name = key[: -len("q_")]
            lo, step = tensors[table_name + "grid_"].split(1, dim=-2)
            tensors[table_name] = tablecode.decode(tensors.pop(key), lo, step)
        return super().from_state(tensors, meta)

    def set_row_scales(self, scale: torch.Tensor) -> None:
        """Write per-row scales ``[m]`` into the stored row scales in place, rounded to their dtype."""
        stored = self.codebook_layout().row_scales
        if stored is None:
            raise CompressKitError(f"{self.name}: this quantizer keeps no row scales; fit it with row_scale=True to have them")
        _copy_float(self.name, "set_row_scales", stored, scale)


def _copy_float(qname: str, verb: str, stored: torch.Tensor, new: torch.Tensor) -> None:
    """``stored.copy_(new)`` after checking ``new`` is a finite float tensor of ``stored``'s shape."""
    if not isinstance(new, torch.Tensor) or not new.is_floating_point() or new.shape != stored.shape:
        raise CompressKitError(f"{qname}: {verb} needs a float tensor of shape {list(stored.shape)}, got {_describe(new)}")
    if not torch.isfinite(new).all():
        raise CompressKitError(f"{qname}: {verb} got NaN or infinite values; check the step that produced them")
    with torch.no_grad():  # the stored tensor may be a module's parameter that is training
        stored.copy_(new.detach().to(stored.dtype))


def identity_slots(n_books: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """``slot_rows`` of a table ``[n_books, k, d]``: ``[n_books, k]`` int64, ``b * k + c``."""
    return torch.arange(n_books * k, device=device).reshape(n_books, k)


# ---- helpers for adapt_to_shape ---------------------------------------------------------------
def power_of_two_at_most(n: int) -> int:
    """The largest power of two not above ``n`` (``n >= 1``): the k a too-small codebook falls back to."""
    return 1 << (int(n).bit_length() - 1)


def shape_text(shape: tuple[int, ...]) -> str:
    """``(1, 128)`` -> ``"1x128"``, as notes and reasons name a weight."""
    return "x".join(str(s) for s in shape)


def adaptation_note(shape: tuple[int, ...], changes: dict[str, tuple[int, int]], reasons: list[str]) -> str:
    """One sentence for the report: ``"k lowered from 256 to 64: this 1x128 weight has only 64
    subvectors per codebook"``. ``changes``: parameter -> (asked, used); ``reasons``: what the weight has."""
    parts = [f"{p} from {old} to {new}" for p, (old, new) in changes.items()]
    parts[0] = parts[0].replace(" from ", " lowered from ", 1)
    return f"{' and '.join(parts)}: this {shape_text(shape)} weight has {' and '.join(reasons)}"


def too_few_subvectors(shape: tuple[int, ...], per_book: int) -> str:
    """The reason a weight stays dense: fewer than 2 subvectors per codebook."""
    return f"this {shape_text(shape)} weight has only {per_book} subvector per codebook, too few for k-means, so it stays dense"
