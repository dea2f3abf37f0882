"""Product quantization with DPQ's compressed codebook pool.

A weight ``[m, n]`` is cut along its input dimension into ``n_sub = n / d`` subspaces (column groups
of width d); row i of subspace g is one subvector. Each codebook of ``k`` centroids (k = 256 gives
uint8 codes) serves ``share`` consecutive subspaces (``share = 1``: one codebook per subspace, as in
the paper). After pooling, ``pool_iters`` alternating refinement steps (pool entries, projection
table, codes; each step can only lower the error) recover much of what the merge lost; with
``pool_iters=0`` the codes stay exactly those of k-means, as in the paper. ``share=None`` (default) picks the smallest share that keeps codebooks (or pool and
projection table) within a quarter of the codes' size, the budget the paper's supplementary
states, and gives each codebook at least k subvectors: 1 for DiT-size layers (6912 x 1152), more
for the small layers of small language models, where 256-entry tables per subspace would cost more
than the codes themselves. With the pool on (default), the codebooks are then replaced by one shared pool of
``N' = m n / (16 d^2)`` entries and a ``projection [n_books, k]`` int16 table (see ``pool.py``).

``row_scale=True`` divides each row by its RMS before k-means and keeps that float16 scale per row
(see ``rowscale.py``); off by default, as in the paper. ``table_bits=8`` stores the codebooks (or
the pool) as 8-bit levels on a grid per book and coordinate instead of float16 (``tablecode.py``):
half the table's bytes, for tensors small enough that the table is a large share of them.

Defaults by target bits follow the DPQ README: d = 2 (4-bit), 3 (3-bit), 4 (2-bit), 8 (1-bit).
A width that d does not divide is zero-padded; the padding is recorded in ``pad_`` and cropped.
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
from compresskit.quantizers.pool import build_pool, pool_size_for, refine_pool
from compresskit.quantizers.rowscale import SCALE_BITS, fit_row_scale, normalise_rows
from compresskit.quantizers.tablecode import check_bits, table_bits
from compresskit.registry import register_quantizer

D_BY_BITS = {4: 2, 3: 3, 2: 4, 1: 8}


def subvector_dim(bits: int, d: int | None, qname: str) -> int:
    """The subvector dimension: ``d`` if given, else the DPQ default for ``bits``."""
    if d is not None:
        check_int("d", qname, d, 1, 64)
        return d
    if bits not in D_BY_BITS:
        raise CompressKitError(f"{qname}: bits must be one of 1, 2, 3, 4 (or pass d explicitly), got {bits!r}")
    return D_BY_BITS[bits]


def to_subvectors(W: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """[m, n] -> ([n_sub, m, d] subvectors per subspace, number of padded columns)."""
    m, n = W.shape
    pad = (-n) % d
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(m, -1, d).transpose(0, 1).contiguous(), pad


@register_quantizer("pq")
class PQ(CodebookQuantizer):
    """Product quantizer: per-subspace k-means codebooks, compressed into a shared pool.

    Learned state: ``codes_ [m, n_sub]`` uint8; ``codebooks_ [n_books, k, d]`` float16 when the pool
    is off, or ``pool_ [P, d]`` float16 and ``projection_ [n_books, k]`` int16 when it is on; with
    ``row_scale``, ``scale_ [m]`` float16 (the weight is ``scale_[:, None] *`` the centroids).
    """

    def __init__(
        self,
        bits: int = 2,
        d: int | None = None,
        k: int = 256,
        share: int | None = None,
        n_iter: int = 20,
        init: str = "kmeans++",
        noise: float = 0.0,
        pool: bool = True,
        pool_size: int | None = None,
        tau_c: float = 0.05,
        pool_iters: int = 5,
        row_scale: bool = False,
        table_bits: int = 16,
        seed: int = 0,
    ):
        self.bits = bits
        self.d = d
        self.k = k
        self.share = share
        self.n_iter = n_iter
        self.init = init
        self.noise = noise
        self.pool = pool
        self.pool_size = pool_size
        self.tau_c = tau_c
        self.pool_iters = pool_iters
        self.row_scale = row_scale
        self.table_bits = table_bits
        self.seed = seed

    # ---- parameters -------------------------------------------------------------------------
    def _validate_params(self) -> None:
        self.d_ = subvector_dim(self.bits, self.d, self.name)
        check_int("k", self.name, self.k, 2, 65536)
        if self.share is not None:
            check_int("share", self.name, self.share, 1, 1 << 20)
        check_int("n_iter", self.name, self.n_iter, 0, 10000)
        if self.init not in ("kmeans++", "random"):
            raise CompressKitError(f"{self.name}: init must be 'kmeans++' or 'random', got {self.init!r}")
        if not (isinstance(self.noise, (int, float)) and self.noise >= 0):
            raise CompressKitError(f"{self.name}: noise must be a number >= 0, got {self.noise!r}")
        if self.pool_size is not None:
            check_int("pool_size", self.name, self.pool_size, 1, 1 << 31)
        check_int("pool_iters", self.name, self.pool_iters, 0, 1000)
        if not isinstance(self.row_scale, bool):
            raise CompressKitError(f"{self.name}: row_scale must be True or False, got {self.row_scale!r}")
        check_bits(self.name, self.table_bits)

    @property
    def code_bits_(self) -> int:
        return max(1, math.ceil(math.log2(self.k)))

    def _layout(self, rows: int, cols: int) -> tuple[int, int, int, int]:
        """(share, n_sub, n_books, pool entries or 0 when no pool) for a rows x cols weight."""
        n_sub = math.ceil(cols / self.d_)
        if self.share is not None:
            return (self.share, n_sub, *self._books_and_pool(rows, cols, n_sub, self.share))
        codes_bits = rows * n_sub * self.code_bits_
        share = min(n_sub, max(1, math.ceil(self.k / rows)))  # each book needs >= k subvectors
        while share < n_sub:
            n_books, pool_entries = self._books_and_pool(rows, cols, n_sub, share)
            if sum(self._table_bits(n_books, pool_entries).values()) <= codes_bits / 4:
                break
            share += 1
        return (share, n_sub, *self._books_and_pool(rows, cols, n_sub, share))

    def _books_and_pool(self, rows: int, cols: int, n_sub: int, share: int) -> tuple[int, int]:
        n_books = math.ceil(n_sub / share)
        target = self.pool_size if self.pool_size is not None else pool_size_for(rows, cols, self.d_)
        return n_books, (target if self.pool and target < n_books * self.k else 0)

    def _table_bits(self, n_books: int, pool_entries: int) -> dict[str, int]:
        """Bits of everything but the codes: codebooks, or pool + projection table."""
        if pool_entries:
            return {"pool": table_bits(pool_entries, self.d_, 1, self.table_bits), "projection": n_books * self.k * _index_bits(pool_entries)}
        return {"codebooks": table_bits(n_books * self.k, self.d_, n_books, self.table_bits)}

    def adapt_to_shape(self, shape: tuple[int, ...]) -> tuple["PQ | None", str | None]:
        """See :meth:`Quantizer.adapt_to_shape`. The automatic ``share`` already grows until a book
        has k subvectors, so what can still fail is a weight with fewer than k subvectors per book
        (a 1 x 128 gate; a 128 x 1 head, whose single column is padded to d and so gives only 128
        subvectors): then d is lowered to the column count when it exceeds it (padded coordinates
        are stored but carry nothing), and k to the largest power of two not above the subvectors a
        book gets (at least 2)."""
        q, reason = super().adapt_to_shape(shape)
        if q is None:
            return None, reason
        self._validate_params()
        shape = tuple(shape)
        rows, cols = shape[0], math.prod(shape[1:])
        share, n_sub, _, _ = self._layout(rows, cols)
        per_book = rows * min(share, n_sub)  # what fit checks
        if self.k <= per_book:
            return self, None
        changes: dict[str, tuple[int, int]] = {}
        reasons = []
        if self.d_ > cols:
            changes["d"] = (self.d_, cols)
            reasons.append(f"only {cols} input column{'s' if cols > 1 else ''}")
            per_book = rows  # one subspace, whatever share
        if per_book < 2:
            return None, too_few_subvectors(shape, per_book)
        changes["k"] = (self.k, power_of_two_at_most(per_book))
        reasons.append(f"only {per_book} subvectors per codebook")
        return self._adapted(adaptation_note(shape, changes, reasons), **{p: new for p, (_, new) in changes.items()})

    def planned_params(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """:meth:`get_params` with the automatic ``d`` (by bits) and ``share`` resolved to what a fit on ``shape`` uses."""
        self._validate_params()
        return {**self.get_params(), "d": self.d_, "share": self._layout(shape[0], math.prod(shape[1:]))[0]}

    # ---- size accounting --------------------------------------------------------------------
    def _size(self, shape: tuple[int, int]) -> dict[str, int]:
        rows, cols = shape
        _, n_sub, n_books, pool_entries = self._layout(rows, cols)
        return {"codes": rows * n_sub * self.code_bits_, **self._table_bits(n_books, pool_entries), **self._scale_bits(rows)}

    def _scale_bits(self, rows: int) -> dict[str, int]:
        return {"scales": rows * SCALE_BITS} if self.row_scale else {}

    def _fitted_size(self) -> dict[str, int]:
        parts = {"codes": self.codes_.numel() * self.code_bits_}
        if self.pooled_:
            parts["pool"] = table_bits(self.pool_.shape[0], self.d_, 1, self.table_bits)
            parts["projection"] = self.projection_.numel() * _index_bits(self.pool_.shape[0])
        else:
            parts["codebooks"] = table_bits(self.codebooks_.shape[0] * self.k, self.d_, self.codebooks_.shape[0], self.table_bits)
        parts.update(self._scale_bits(self.codes_.shape[0]))
        return parts

    # ---- fit / transform / inverse ----------------------------------------------------------
    def _fit(self, W: torch.Tensor) -> None:
        m, n = W.shape
        d = self.d_
        self.share_, n_sub, n_books, pool_entries = self._layout(m, n)
        if self.row_scale:
            self.scale_ = fit_row_scale(W)  # [m] float16
            W = normalise_rows(W, self.scale_)
        sub, self.pad_ = to_subvectors(W, d)  # [n_sub, m, d]
        per_book = m * min(self.share_, n_sub)
        if self.k > per_book:
            raise CompressKitError(
                f"{self.name}: k={self.k} centroids need at least {self.k} subvectors per codebook, but this "
                f"{m}x{n} weight gives {per_book}; raise share (subspaces per codebook) or lower k"
            )
        X, weights = _group_books(sub, self.share_, n_books)  # [n_books, share*m, d]
        C, _, _ = kmeans(X, self.k, self.n_iter, self.init, float(self.noise), self.seed, weights)
        self._hold_table("codebooks_", C)  # [n_books, k, d] float16 (on its grid with 8-bit tables)
        self.pooled_ = False
        codes = self._assign(sub, self.codebooks_.float())  # [n_sub, m]
        self.codes_ = codes.t().contiguous().to(code_dtype(self.code_bits_))  # [m, n_sub]
        if not pool_entries:
            return
        before = _rel_error(self._rebuild(codes, self.codebooks_.float().reshape(-1, d)), sub)
        counts = torch.zeros(n_books * self.k).index_add_(
            0, (self._book_of(n_sub)[:, None] * self.k + codes).reshape(-1), torch.ones(codes.numel())
        )
        pool, projection = build_pool(
            self.codebooks_.float(), counts.reshape(n_books, self.k), pool_entries, self.tau_c, float(W.pow(2).mean().sqrt())
        )
        self.error_pooled_codes_unchanged_ = _rel_error(self._rebuild(codes, pool[projection.reshape(-1)]), sub)
        if self.pool_iters:
            book_idx = self._book_of(n_sub)[:, None] * self.k  # [n_sub, 1]
            pool, projection, codes = refine_pool(sub, book_idx, codes, pool, projection, self.pool_iters, self.k)
            self.codes_ = codes.t().contiguous().to(code_dtype(self.code_bits_))
        self._hold_table("pool_", pool)  # [P, d] float16
        self.projection_ = projection.to(torch.int16 if self.pool_.shape[0] <= 32767 else torch.int32)  # [n_books, k]
        self.pooled_ = True
        del self.codebooks_
        if self.table_bits == 8:  # the pool moved onto its grid: nearest entries again
            del self.codebooks_grid_
            self.codes_ = self._assign(sub, self.effective_codebooks()).t().contiguous().to(code_dtype(self.code_bits_))
        self.error_before_pool_ = before
        self.error_after_pool_ = _rel_error(self._rebuild(codes, self.effective_codebooks().reshape(-1, d)), sub)

    def codebook_layout(self) -> CodebookLayout:
        """The pool ``pool_ [P, d]`` read through ``projection_`` when pooled, else ``codebooks_
        [n_books, k, d]``; subspace g uses book ``g // share_``; ``scale_`` with ``row_scale``."""
        self._check_fitted()
        m, n_sub = self.codes_.shape
        device = self.codes_.device
        book = (torch.arange(n_sub, device=device) // self.share_).expand(m, n_sub).contiguous()
        if self.pooled_:
            table, table_name, slots = self.pool_, "pool_", self.projection_.long()
        else:
            table, table_name = self.codebooks_, "codebooks_"
            slots = identity_slots(table.shape[0], self.k, device)
        scale = self.scale_ if self.row_scale else None
        return CodebookLayout(table, table_name, slots, book, self.k, table.shape[-1], scale)

    def effective_codebooks(self) -> torch.Tensor:
        """Centroids as reconstruction sees them: [n_books, k, d] float32 (pool looked up if on)."""
        if self.pooled_:
            return self.pool_.float()[self.projection_.long()]
        return self.codebooks_.float()

    def _book_of(self, n_sub: int) -> torch.Tensor:
        return torch.arange(n_sub) // self.share_  # [n_sub]

    def _assign(self, sub: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
        """Nearest centroid per subvector: sub [n_sub, m, d], books [n_books, k, d] -> [n_sub, m]."""
        return assign(sub, books[self._book_of(sub.shape[0])].contiguous())

    def _rebuild(self, codes: torch.Tensor, flat_books: torch.Tensor) -> torch.Tensor:
        """codes [n_sub, m] + flat centroids [n_books*k, d] -> subvectors [n_sub, m, d]."""
        idx = self._book_of(codes.shape[0])[:, None] * self.k + codes.long()
        return flat_books[idx]

    def _transform(self, W: torch.Tensor) -> torch.Tensor:
        if self.row_scale:
            W = normalise_rows(W, self.scale_)
        sub, _ = to_subvectors(W, self.d_)
        codes = self._assign(sub, self.effective_codebooks())  # [n_sub, m]
        return codes.t().contiguous().to(code_dtype(self.code_bits_))  # [m, n_sub]

    def _inverse(self, codes: torch.Tensor) -> torch.Tensor:
        m, n_sub = codes.shape
        book = self._book_of(n_sub)[None, :]  # [1, n_sub]
        idx = book * self.k + codes.long()  # [m, n_sub]
        if self.pooled_:
            sub = self.pool_.float()[self.projection_.long().reshape(-1)[idx]]  # [m, n_sub, d]
        else:
            sub = self.codebooks_.float().reshape(-1, self.d_)[idx]
        W = sub.reshape(m, n_sub * self.d_)
        if self.row_scale:
            W = W * self.scale_.float()[:, None]
        return W[:, : W.shape[1] - self.pad_]

    # ---- persistence ------------------------------------------------------------------------
    @property
    def _state_tensors(self) -> tuple[str, ...]:  # type: ignore[override]
        tables = (*self._table_state_names("pool_"), "projection_") if self.pooled_ else self._table_state_names("codebooks_")
        return tables + (("scale_",) if self.row_scale else ())

    def diagnostics(self) -> dict[str, Any]:
        """Subspaces per codebook, and with the pool the weight error before and after pooling."""
        self._check_fitted()
        out = {"share_": self.share_}
        if self.pooled_:
            out.update(error_before_pool_=self.error_before_pool_, error_after_pool_=self.error_after_pool_)
        return out

    def _extra_meta(self) -> dict[str, Any]:
        meta = {"pad_": self.pad_, "pooled_": self.pooled_, "share_": self.share_}
        if self.pooled_:
            meta.update(
                error_before_pool_=self.error_before_pool_,
                error_pooled_codes_unchanged_=self.error_pooled_codes_unchanged_,
                error_after_pool_=self.error_after_pool_,
            )
        return meta

    def _load_extra_meta(self, meta: dict[str, Any]) -> None:
        self.pad_ = meta["pad_"]
        self.share_ = meta["share_"]
        self.pooled_ = meta["pooled_"]
        if self.pooled_:
            self.error_before_pool_ = meta["error_before_pool_"]
            self.error_pooled_codes_unchanged_ = meta["error_pooled_codes_unchanged_"]
            self.error_after_pool_ = meta["error_after_pool_"]


def _index_bits(n_entries: int) -> int:
    """Bits per projection-table entry: int16 while the pool has at most 32767 entries."""
    return 16 if n_entries <= 32767 else 32


def _group_books(sub: torch.Tensor, share: int, n_books: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n_sub, m, d] -> ([n_books, share*m, d], weights or None); a short last book is zero-weighted."""
    n_sub, m, d = sub.shape
    if share == 1:
        return sub, None
    missing = n_books * share - n_sub
    weights = torch.ones(n_books * share, m)
    if missing:
        sub = torch.cat([sub, sub[-1:].expand(missing, -1, -1)])
        weights[n_sub:] = 0
    return sub.reshape(n_books, share * m, d), weights.reshape(n_books, share * m)


def _rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative squared Frobenius error ||approx - ref||^2 / ||ref||^2."""
    return float((approx - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
