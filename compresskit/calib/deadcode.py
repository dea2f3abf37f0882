"""Dead centroids: find the ones calibration hardly uses and re-seed them where the error is largest.

A centroid that (almost) no subvector picks wastes its slot. Between E-steps, the calibrator counts
how often each centroid is used and re-initialises those used fewer than ``tau_dead`` times from the
subvectors of the weight that are reconstructed worst (hardest first), with a little seeded noise,
so the next E-step can move those subvectors onto them.

``usage`` is a count accumulated by the caller over the passes of calibration: add
:func:`usage_counts` after every E-step (or every forward pass that reassigns codes), and call
:func:`reinit_dead` with the running total. The paper's default ``tau_dead = 256`` is meant for such a
sum over many passes, not for one assignment of one layer (a 576 x 576 PQ layer at 2 bits uses each
of its 256-entry codebooks only 576 * share times per pass).

What "a centroid" is: one row of the quantizer's centroid table (its
:class:`~compresskit.quantizers.codebook.CodebookLayout`). For a pool ``[P, d]`` (a pooled PQ) usage is
``[P]``; an entry serves every codebook slot that maps to it, so its candidates are subvectors of any
book. For a table ``[n_books, k, d]`` (an unpooled PQ, a VQ) usage is ``[n_books, k]`` and candidates
come from that book's subvectors (PQ: its subspaces; VQ: its row group's rows). The table is written
in place through ``set_centroids``, in its stored dtype; codes are not changed (the subvectors that
still point at a re-seeded centroid are moved by the next E-step).
"""
from __future__ import annotations

import torch

from compresskit.calib.estep import centroid_target, codebook_layout_of
from compresskit.errors import CompressKitError


def usage_counts(quantizer) -> torch.Tensor:
    """How many subvectors use each centroid under the current ``codes_``.

    Returns int64 counts shaped as the table without its last axis: ``[P]`` per pool entry for a
    pool ``[P, d]`` (through the slots), else ``[n_books, k]`` per codebook entry.
    """
    layout = codebook_layout_of(quantizer, "usage_counts")
    entry = layout.entries(quantizer.codes_).reshape(-1)  # [m * n_sub] table rows
    shape = layout.table.shape[:-1]
    return torch.bincount(entry, minlength=shape.numel()).reshape(shape)


def reinit_dead(quantizer, W: torch.Tensor, usage: torch.Tensor, tau_dead: float = 256, seed: int = 0, noise: float = 0.01) -> int:
    """Re-seed every centroid with ``usage < tau_dead`` from the worst-reconstructed subvectors of ``W``.

    ``usage``: accumulated counts shaped as :func:`usage_counts` returns. Dead centroids take the
    distinct candidate subvectors with the largest squared reconstruction error, hardest first (a
    book with more dead entries than candidates reuses them in turn), plus Gaussian noise of
    ``noise`` times the weight's RMS (seeded by ``seed``). Writes the centroid table in place
    (``set_centroids``, stored dtype) and returns the number of centroids re-initialised.
    """
    layout = codebook_layout_of(quantizer, "reinit_dead")
    k, d = layout.k, layout.d
    table, book = layout.centroids(), layout.book  # [B, k, d] float32, [m, n_sub]
    expected = tuple(layout.table.shape[:-1])  # [P] or [n_books, k]
    if tuple(usage.shape) != expected:
        raise CompressKitError(f"reinit_dead: usage must have shape {list(expected)} for this quantizer (see usage_counts), got {list(usage.shape)}")
    dead = usage < tau_dead
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0

    m, n_sub = quantizer.codes_.shape
    if W.shape[0] != m:
        raise CompressKitError(f"reinit_dead: the weight {tuple(W.shape)} does not match the quantizer's codes {(m, n_sub)}")
    W2, _ = centroid_target(quantizer, W)  # centroids live in the space of W / row scale
    if n_sub * d - W2.shape[1] not in range(d):
        raise CompressKitError(f"reinit_dead: the weight {tuple(W.shape)} does not match the quantizer's codes {(m, n_sub)} (d={d})")
    sub = torch.nn.functional.pad(W2, (0, n_sub * d - W2.shape[1])).reshape(m, n_sub, d)  # [m, n_sub, d]
    recon = table.reshape(-1, d)[book * k + quantizer.codes_.long()]  # [m, n_sub, d]
    err = (sub - recon).pow(2).sum(-1)  # [m, n_sub]
    gen = torch.Generator().manual_seed(seed)
    scale = noise * float(W2.pow(2).mean().sqrt())

    def hardest(mask: torch.Tensor | None, count: int) -> torch.Tensor:
        """``count`` subvectors [count, d] with the largest error among cells in ``mask`` (all if None)."""
        e = err.reshape(-1) if mask is None else err[mask]
        s = sub.reshape(-1, d) if mask is None else sub[mask]
        order = torch.sort(e, descending=True, stable=True).indices
        picks = order[torch.arange(count) % order.numel()]
        return s[picks] + scale * torch.randn(count, d, generator=gen)

    new = layout.table.detach().clone()  # [P, d] or [B, k, d], stored dtype
    if layout.pooled:  # a pool entry may serve any book: candidates from the whole weight
        idx = dead.nonzero(as_tuple=True)[0]
        new[idx] = hardest(None, idx.numel()).to(new.dtype)
    else:  # book b owns table[b]: candidates from the subvectors that read book b
        for b in dead.any(1).nonzero(as_tuple=True)[0].tolist():
            idx = dead[b].nonzero(as_tuple=True)[0]
            new[b, idx] = hardest(book == b, idx.numel()).to(new.dtype)
    quantizer.set_centroids(new)
    return n_dead
