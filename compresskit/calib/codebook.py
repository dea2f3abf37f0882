"""The layer-wise M-step of the EM calibrator: centroids (and row scales) that minimise a layer's
*output* error for fixed codes.

With codes fixed, the rebuilt weight is linear in the centroid table, so the output error
``f(P) = tr(R H R^T)``, ``R = W - diag(s) P[e]``, is a quadratic in the table ``P`` (a pooled PQ's
pool, otherwise the codebooks): ``e[i, g]`` is the table row that subvector ``(i, g)`` reads and ``s``
the row scales (ones without ``row_scale``). Its minimiser solves the normal equations
``A^T (A P) H = A^T W H`` (``A`` gathers table rows into the weight, ``A^T`` scatter-adds them back),
which :func:`update_codebooks` solves by conjugate gradients preconditioned with the diagonal, starting
from the current table: one iteration costs one ``[m, n] x [n, n]`` product, and no ``E x E`` matrix
is ever formed. Unused centroids have all-zero rows in the system and stay where they are (the
dead-centroid re-initialisation is what moves them).

For fixed codes and table, each row scale also has a closed form, ``s_i = (w_i H c_i^T) / (c_i H c_i^T)``
with ``c_i = P[e_i]`` (:func:`update_row_scales`). Alternating the E-step (codes), this step (table)
and the scales is block-coordinate descent on one objective: :func:`refine_layer`.

Both steps solve the damped objective (``damp``, as the E-step) and are kept only if the undamped
error, after rounding to the stored float16, does not rise.
"""
from __future__ import annotations

import torch

from compresskit.calib.estep import _e_step, banded_error, centroid_target, codebook_layout_of, padded_hessians
from compresskit.errors import CompressKitError


def _system(quantizer, W: torch.Tensor, H: torch.Tensor, damp: float, caller: str):
    """(layout, entry [m, n_sub], target W/s padded [m, n_pad], s [m], damped H, true H).

    ``entry[i, g]`` is the row of ``layout.table.reshape(-1, d)`` that subvector ``(i, g)`` reads.
    """
    layout = codebook_layout_of(quantizer, caller)
    d = layout.d
    m, n_sub = quantizer.codes_.shape
    if W.shape[0] != m:
        raise CompressKitError(f"{caller}: the weight {tuple(W.shape)} does not match the quantizer's codes {(m, n_sub)}")
    target, s = centroid_target(quantizer, W)
    n = target.shape[1]
    n_pad = n_sub * d
    if n_pad - n not in range(d) or H.shape != (n, n):
        raise CompressKitError(f"{caller}: weight {tuple(W.shape)} / H {tuple(H.shape)} do not match the codes {(m, n_sub)} (d={d})")
    entry = layout.entries(quantizer.codes_)  # [m, n_sub]
    H_damp, H_true = padded_hessians(H, n_pad, damp)
    return layout, entry, torch.nn.functional.pad(target, (0, n_pad - n)), s, H_damp, H_true


def _error(target, rebuilt, s, H) -> float:
    return banded_error(lambda rows: (target[rows] - rebuilt[rows]) * s[rows, None], target.shape[0], H)


@torch.no_grad()
def update_codebooks(quantizer, W: torch.Tensor, H: torch.Tensor, iters: int = 25, damp: float = 0.01) -> tuple[float, float]:
    """Move a fitted codebook quantizer's centroids (its layout's table: a PQ pool or codebooks, in
    place through ``set_centroids``) to the least output error ``tr(R H R^T)`` for its current
    codes; returns the undamped error ``(before, after)``."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise CompressKitError(f"update_codebooks: iters must be an integer >= 0, got {iters!r}")
    layout, entry, target, s, Hd, Ht = _system(quantizer, W, H, damp, "update_codebooks")
    state = layout.table
    m, n_sub = entry.shape
    d = target.shape[1] // n_sub
    P0 = state.detach().float().reshape(-1, d)  # [E, d]
    E = P0.shape[0]
    flat_entry = entry.reshape(-1)
    w2 = (s * s)[:, None]  # row weights s_i^2

    def gather(V):  # [E, d] -> [m, n_pad]
        return V[entry].reshape(m, -1)

    def scatter(Y):  # [m, n_pad] -> [E, d]
        return torch.zeros(E, d).index_add_(0, flat_entry, Y.reshape(m * n_sub, d))

    def normal(V):
        return scatter(w2 * (gather(V) @ Hd))

    before = _error(target, gather(P0), s, Ht)
    precond = scatter(w2 * Hd.diagonal()[None, :].expand(m, -1))
    precond = torch.where(precond > 0, 1.0 / precond, torch.zeros_like(precond))
    P = P0.clone()
    r = scatter(w2 * (target @ Hd)) - normal(P)
    z = precond * r
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(iters):
        if rz <= 0:
            break
        Ap = normal(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rz / pAp
        P += alpha * p
        r -= alpha * Ap
        z = precond * r
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    P16 = P.to(state.dtype).float()
    after = _error(target, gather(P16), s, Ht)
    if not after < before:
        return before, before
    quantizer.set_centroids(P16.reshape(state.shape))
    return before, after


@torch.no_grad()
def update_row_scales(quantizer, W: torch.Tensor, H: torch.Tensor, damp: float = 0.01) -> tuple[float, float]:
    """Closed-form output-error-optimal row scales (in place) for fixed codes and centroids; returns
    the undamped error ``(before, after)``. A codebook quantizer without row scales is left alone
    (``(nan, nan)``)."""
    if codebook_layout_of(quantizer, "update_row_scales").row_scales is None:
        return (float("nan"), float("nan"))
    layout, entry, target, s, Hd, Ht = _system(quantizer, W, H, damp, "update_row_scales")
    m, n_sub = entry.shape
    d = target.shape[1] // n_sub
    C = layout.table.detach().float().reshape(-1, d)[entry].reshape(m, -1)  # [m, n_pad] centroids per row
    Wp = target * s[:, None]  # the weight itself, padded
    before = _error(Wp, C * s[:, None], torch.ones(m), Ht)
    CH = C @ Hd
    num, den = (Wp * CH).sum(1), (C * CH).sum(1)
    new = torch.where(den > 0, num / den.clamp(min=1e-30), s)
    new16 = new.to(torch.float16).float()
    new16 = torch.where(torch.isfinite(new16) & (new16 != 0), new16, s)
    after = _error(Wp, C * new16[:, None], torch.ones(m), Ht)
    if not after < before:
        return before, before
    quantizer.set_row_scales(new16)
    return before, after


def refine_layer(quantizer, W: torch.Tensor, H: torch.Tensor, rounds: int = 2, e_sweeps: int = 1, iters: int = 25, damp: float = 0.01) -> list[float]:
    """``rounds`` of (centroids, row scales, codes) block-coordinate descent on the output error.

    Writes the quantizer's table, scales and codes through its setters (in place); returns the
    undamped error at the start and after every round (never rising).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise CompressKitError(f"refine_layer: rounds must be an integer >= 0, got {rounds!r}")
    codebook_layout_of(quantizer, "refine_layer")  # one clear error before any work
    errors: list[float] = []
    for _ in range(rounds):
        before, _ = update_codebooks(quantizer, W, H, iters=iters, damp=damp)
        if not errors:
            errors.append(before)
        update_row_scales(quantizer, W, H, damp=damp)
        codes, errs = _e_step(quantizer, W, H, max(1, e_sweeps), damp)
        quantizer.set_codes(codes)  # in place: a compressed module's buffer is the same tensor
        errors.append(min(errs))
    return errors
