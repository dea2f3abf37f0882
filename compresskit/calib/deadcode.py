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

What "a centroid" is: for a pooled PQ one entry of ``pool_`` (usage ``[P]``; an entry serves every
codebook slot that the projection maps to it, so its candidates are subvectors of any book); for
an unpooled PQ or a VQ one codebook entry (usage ``[n_books, k]``; candidates come from that book's
subspaces, or for VQ that row group's rows). The float16 state is written in place; codes are not
changed (the subvectors that still point at a re-seeded centroid are moved by the next E-step).
"""
from __future__ import annotations

import torch

from compresskit.calib.estep import centroid_layout, centroid_target
from compresskit.errors import CompressKitError


def usage_counts(quantizer) -> torch.Tensor:
    """How many subvectors use each centroid under the current ``codes_``.

    Returns int64 counts: ``[P]`` per pool entry for a pooled PQ (through ``projection_``), else
    ``[n_books, k]`` per codebook entry (PQ ``codebooks_`` or VQ ``codebooks_ [row_groups, k, d]``).
    """
    table, book = centroid_layout(quantizer)  # [B, k, d], [m, n_sub]
    n_books, k, _ = table.shape
    slot = (book * k + quantizer.codes_.long()).reshape(-1)  # [m * n_sub]
    if _pooled(quantizer):
        entry = quantizer.projection_.long().reshape(-1)[slot]
        return torch.bincount(entry, minlength=quantizer.pool_.shape[0])
    return torch.bincount(slot, minlength=n_books * k).reshape(n_books, k)


def reinit_dead(quantizer, W: torch.Tensor, usage: torch.Tensor, tau_dead: float = 256, seed: int = 0, noise: float = 0.01) -> int:
    """Re-seed every centroid with ``usage < tau_dead`` from the worst-reconstructed subvectors of ``W``.

    ``usage``: accumulated counts shaped as :func:`usage_counts` returns. Dead centroids take the
    distinct candidate subvectors with the largest squared reconstruction error, hardest first (a
    book with more dead entries than candidates reuses them in turn), plus Gaussian noise of
    ``noise`` times the weight's RMS (seeded by ``seed``). Writes ``pool_`` or ``codebooks_`` in
    place (float16) and returns the number of centroids re-initialised.
    """
    table, book = centroid_layout(quantizer)  # [B, k, d], [m, n_sub]
    n_books, k, d = table.shape
    pooled = _pooled(quantizer)
    state = quantizer.pool_ if pooled else quantizer.codebooks_  # [P, d] or [B, k, d]
    expected = tuple(state.shape[:1]) if pooled else (n_books, k)
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

    with torch.no_grad():
        if pooled:
            idx = dead.nonzero(as_tuple=True)[0]
            state[idx] = hardest(None, idx.numel()).to(state.dtype)
        else:
            for b in dead.any(1).nonzero(as_tuple=True)[0].tolist():
                idx = dead[b].nonzero(as_tuple=True)[0]
                state[b, idx] = hardest(book == b, idx.numel()).to(state.dtype)
    return n_dead


def _pooled(quantizer) -> bool:
    return bool(getattr(quantizer, "pooled_", False))
