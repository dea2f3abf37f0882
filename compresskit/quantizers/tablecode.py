"""8-bit centroid tables: a codebook's entries on a uniform grid of 256 levels per book and coordinate.

Why: on a small tensor the float16 table is a large share of the bytes. A 3DGS scene of 7 000
Gaussians with one 256-entry codebook over its 45 SH coefficients spends 23 kB on that table
against 7 kB on its codes (``docs/gaussians.md``); at 8 bits the table halves. The issue-14 study
stored its tables so and lost nothing measurable.

The layout: a table ``[..., k, d]`` (a book's ``k`` entries of ``d`` coordinates; a pool ``[P, d]``
is one book) keeps, per book and coordinate, its smallest value ``lo`` and a ``step`` (both
float16), and each entry as ``q`` in ``0..255`` (uint8): the value is ``lo + step * q``, computed
in float32 and rounded to float16, the dtype the table is held in. :func:`snap` puts a table on its
grid; :func:`decode` gives the same float16 values from ``(q, lo, step)`` wherever it runs, so the
file rebuilds exactly the table that was evaluated.
"""
from __future__ import annotations

import torch

from compresskit.errors import CompressKitError

LEVELS = 255  # q in 0..255
TABLE_BITS = (16, 8)  # what ``table_bits`` may be: float16 tables, or these


def encode(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q uint8 [..., k, d], lo float16 [..., 1, d], step float16 [..., 1, d])`` of a float table
    ``[..., k, d]``: the grid spans each book's coordinate from its least to its largest value."""
    t = table.detach().float()
    lo = t.amin(dim=-2, keepdim=True).to(torch.float16)
    span = t.amax(dim=-2, keepdim=True) - lo.float()
    step = (span / LEVELS).to(torch.float16)
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant coordinate: every q is 0
    return quantize(t, lo, step), lo, step


def quantize(table: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``q`` of ``table`` on the grid ``(lo, step)``: nearest level, clamped to ``0..255``; uint8."""
    q = torch.round((table.detach().float() - lo.float()) / step.float())
    return q.clamp(0, LEVELS).to(torch.uint8)


def decode(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The float16 table ``lo + step * q`` (float32 arithmetic, then float16)."""
    return (lo.float() + step.float() * q.float()).to(torch.float16)


def snap(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the table on its grid, float16; the grid [..., 2, d]: lo, then step)``."""
    q, lo, step = encode(table)
    return decode(q, lo, step), torch.cat([lo, step], dim=-2)


def check_bits(qname: str, bits) -> None:
    """``table_bits`` is 16 (float16 centroid tables) or 8 (8-bit levels on a per-book grid)."""
    if bits not in TABLE_BITS or isinstance(bits, bool):
        raise CompressKitError(f"{qname}: table_bits must be 16 (float16 centroids) or 8 (8-bit levels on a per-book grid), got {bits!r}")


def table_bits(entries: int, d: int, books: int, bits: int) -> int:
    """Stored bits of ``books`` tables of ``entries`` rows of ``d`` (``entries`` counts all books'
    rows): float16 values, or 8-bit levels plus a float16 ``lo`` and ``step`` per book and coordinate."""
    if bits == 16:
        return entries * d * 16
    return entries * d * 8 + books * d * 2 * 16
