"""E-step of the EM calibrator: re-assign codes to minimise a layer's *output* error, not its weight error.

For a weight ``W [m, n]`` (a conv kernel flattened to ``[m, prod(rest)]``) and the proxy Hessian
``H = X^T X / N [n, n]`` of its inputs (see :mod:`compresskit.calib.hessian`), the output error of a
replacement ``W_hat`` is ``tr(R H R^T)`` with ``R = W - W_hat``. k-means codes minimise ``||R||^2``;
when the inputs are correlated the two disagree, and the codes can be chosen better with the same
centroids.

Method: block coordinate descent over subspaces, vectorised over rows. Let ``G`` be the columns of
subspace ``g`` (width d), ``c0`` a row's current centroid there and ``u = c0 H_GG + (R H)_G``.
Changing that centroid to ``c`` changes the row's error by ``c H_GG c^T - 2 c.u`` minus the same
at ``c0`` (expand ``tr(R H R^T)`` with ``R_G -> R_G - (c - c0)``), so the best code is the argmin of
``c H_GG c^T - 2 c.u`` over the book's k centroids. With ``H_GG = L L^T`` this is the Euclidean
nearest neighbour of ``t L`` among ``{c L}``, where ``t = c0 + (R H)_G H_GG^{-1}`` is the
unconstrained optimum; the form above is the same search without the inverse, so it also holds
when ``H_GG`` is singular (padded columns, dead inputs). The current code is a candidate, so each
step never raises the objective. ``R H`` is computed once per sweep and updated after each subspace
(``R_G`` changes by ``-dC``, so ``R H`` changes by ``-dC H_{G,:}``): one sweep costs about
``m n^2`` multiply-adds, the same as one product ``R H``.

``damp`` adds ``damp * mean(diag H)`` to the diagonal of H (as GPTQ does): a ridge pulling the
solution toward the plain weight distance, which guards against over-fitting a small calibration
set. The descent is exact on the damped objective; as a guard on the true one, :func:`e_step`
returns the codes of the sweep with the lowest undamped output error, never worse than the start.
With row scales (``row_scale=True``, ``W_hat = diag(s) C[codes]``) the error of row i is ``s_i^2``
times that of ``W_i / s_i`` against the centroids, so the codes are chosen for ``W / s`` and the
reported error weighs rows by ``s_i^2``; see :func:`centroid_target`.
Padded columns (``pad_``) are not part of the weight: their rows and columns of H are zero and not
damped, so the padded coordinates of centroids play no part.
"""
from __future__ import annotations

import contextlib

import torch

from compresskit.calib.hessian import ridge, row_bands
from compresskit.errors import CompressKitError
from compresskit.quantizers.codebook import CodebookLayout, CodebookQuantizer
from compresskit.quantizers.rowscale import normalise_rows, row_scale_of


def codebook_layout_of(quantizer, caller: str) -> CodebookLayout:
    """``quantizer.codebook_layout()``, or one clear error when ``quantizer`` has no codebook to
    change (it is not a :class:`CodebookQuantizer`) or is not fitted. ``caller`` names the step."""
    if not isinstance(quantizer, CodebookQuantizer):
        name = getattr(quantizer, "name", "") or type(quantizer).__name__
        raise CompressKitError(
            f"{caller}: the {name} quantizer does not support codebook updates (it is not a CodebookQuantizer, as pq and vq are); "
            "use a codebook method for this layer or leave this step out"
        )
    return quantizer.codebook_layout()


def centroid_layout(quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroids a fitted codebook quantizer rebuilds from, and which book each code indexes.

    Returns ``(table [n_books, k, d] float32, book [m, n_sub] int64)``: code ``codes_[i, g]``
    stands for ``table[book[i, g], codes_[i, g]]`` (a pool is looked up through the layout's
    ``slot_rows``; see :class:`~compresskit.quantizers.codebook.CodebookLayout`).
    """
    layout = codebook_layout_of(quantizer, "centroid_layout")
    return layout.centroids(), layout.book


def centroid_target(quantizer, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the centroids approximate: ``(W2 / s [m, n] float32, s [m])`` for a weight ``W [m, ...]``.

    ``s`` are the quantizer's row scales (ones without ``row_scale``): the centroids live in the space
    of ``W / s``, so code search, dead-centroid seeding and soft candidates all work on ``W2 / s``.
    """
    W2 = W.detach().reshape(W.shape[0], -1).float()
    s = row_scale_of(quantizer, W2.shape[0])
    return normalise_rows(W2, s), s


def padded_hessians(H: torch.Tensor, n_pad: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(damped H, H)`` as float32 ``[n_pad, n_pad]``, zero on the padded rows and columns. The
    second may be ``H`` itself (not padded, already float32): callers only read it.

    The damping adds ``damp * mean(diag H)`` to the real diagonal only: padded coordinates are not
    part of the weight and stay out of both objectives.
    """
    n = H.shape[0]
    if n_pad == n:  # nothing to pad: H itself is the undamped one (read only), no [n, n] copy
        true = H.float()
    else:
        true = torch.zeros(n_pad, n_pad, dtype=torch.float32)
        true[:n, :n] = H.float()
    padded = true.clone()  # damped(H).float(), without its [n, n] float64 copy: only the diagonal changes
    padded.diagonal()[:n] = (H.diagonal().double() + ridge(H, damp)).float()
    return padded, true


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the squared output error over the inputs behind ``H``.

    ``W``, ``W_hat``: ``[m, ...]`` (flattened to ``[m, n]``); ``H``: ``[n, n]``. Computed in float64.
    """
    R = (W.detach().reshape(W.shape[0], -1).double() - W_hat.detach().reshape(W_hat.shape[0], -1).double())
    if H.shape != (R.shape[1], R.shape[1]):
        raise CompressKitError(f"output_error: H must be [{R.shape[1]}, {R.shape[1]}] for this weight, got {tuple(H.shape)}")
    return float(((R @ H.double()) * R).sum())


def banded_error(residual, m: int, H: torch.Tensor) -> float:
    """``tr(R H R^T)`` for ``R [m, n]`` given a band of rows at a time: ``residual(rows)`` returns
    ``R[rows]`` (float32), so no ``[m, n]`` temporary is made beyond one band. Summed in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for rows in row_bands(m, H.shape[0]):
        Rb = residual(rows)
        total += ((Rb @ H) * Rb).sum(dtype=torch.float64)
    return float(total)


def e_step(quantizer, W: torch.Tensor, H: torch.Tensor, n_sweeps: int = 1, damp: float = 0.01) -> torch.Tensor:
    """Codes of ``W`` that minimise the output error ``tr(R H R^T)`` with the quantizer's centroids.

    ``quantizer``: a fitted :class:`CodebookQuantizer` (centroids and ``codes_`` are read, nothing is
    written). ``W``: the weight ``[m, ...]`` it was fitted on; ``H``: ``[n, n]`` with
    ``n = prod(W.shape[1:])``. Starts from ``quantizer.codes_`` and runs ``n_sweeps``
    block-coordinate sweeps over subspaces. Returns codes ``[m, n_sub]`` in the dtype of ``codes_``;
    store them with ``quantizer.set_codes(codes)``.
    """
    codes, _ = _e_step(quantizer, W, H, n_sweeps, damp)
    return codes


def _e_step(quantizer, W, H, n_sweeps, damp) -> tuple[torch.Tensor, list[float]]:
    """:func:`e_step`, also returning the undamped output error before and after every sweep."""
    if isinstance(n_sweeps, bool) or not isinstance(n_sweeps, int) or n_sweeps < 0:
        raise CompressKitError(f"e_step: n_sweeps must be an integer >= 0, got {n_sweeps!r}")
    if not damp >= 0:
        raise CompressKitError(f"e_step: damp must be a number >= 0, got {damp!r}")
    layout = codebook_layout_of(quantizer, "e_step")
    table, book = layout.centroids(), layout.book  # [B, k, d] float32, [m, n_sub]
    codes0 = quantizer.codes_
    m, n_sub = codes0.shape
    n_books, k, d = table.shape
    if W.shape[0] != m:
        raise CompressKitError(f"e_step: the weight {tuple(W.shape)} does not match the quantizer's codes {tuple(codes0.shape)}")
    W2, row_s = centroid_target(quantizer, W)
    n = W2.shape[1]
    if n_sub * d - n not in range(d):
        raise CompressKitError(
            f"e_step: the weight {tuple(W.shape)} does not match the quantizer's codes {tuple(codes0.shape)} (d={d})"
        )
    if H.shape != (n, n):
        raise CompressKitError(f"e_step: H must be [{n}, {n}] for a weight of {n} input columns, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise CompressKitError("e_step: H has NaN or infinite values; check the calibration inputs")
    n_pad = n_sub * d
    Hp, H_true = padded_hessians(H, n_pad, damp)
    Wp = W2 if n_pad == n else torch.nn.functional.pad(W2, (0, n_pad - n))  # [m, n_pad]

    flat = table.reshape(-1, d)  # [B*k, d]
    codes = codes0.long().t().contiguous()  # [n_sub, m], subspace-major so each step reads contiguous memory
    book_t = book.t().contiguous()  # [n_sub, m]
    W_hat = flat[book_t * k + codes]  # [n_sub, m, d]
    R = Wp.reshape(m, n_sub, d).transpose(0, 1) - W_hat  # [n_sub, m, d]
    del W2, Wp  # R holds what they said
    blocks = Hp.reshape(n_sub, d, n_sub, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()  # [n_sub, d, d]
    quad_cache: dict[tuple[int, int], torch.Tensor] = {}  # (book, subspace) -> c H_GG c^T per centroid [k]

    def true_error() -> float:
        return banded_error(lambda rows: R[:, rows].transpose(0, 1).reshape(-1, n_pad) * row_s[rows, None], m, H_true)

    errors = [true_error()]
    best_err, best_codes = errors[0], codes.clone()
    for _ in range(n_sweeps):
        # (R H)^T = H R^T, kept as [n_pad, m] so the block of subspace g is a contiguous [d, m] slice
        RHt = Hp @ R.transpose(0, 1).reshape(m, n_pad).t()  # [n_pad, m]
        # many small ops per subspace: one thread is as fast, and does not stall at every op's
        # barrier when another process holds a core (measured: 0.4 s vs 3 s median on 2 busy cores)
        with _one_thread():
            for g in range(n_sub):
                cols = slice(g * d, (g + 1) * d)
                Hgg = blocks[g]  # [d, d]
                c0 = W_hat[g]  # [m, d]
                u = torch.addmm(RHt[cols].t(), c0, Hgg)  # [m, d]
                col_books = book_t[g]  # [m]
                new = _best_codes(u, codes[g], col_books, table, Hgg, quad_cache, g)  # [m]
                if bool((new != codes[g]).any()):
                    c_new = flat[col_books * k + new]  # [m, d]
                    delta = c_new - c0  # W_hat changes by delta, R by -delta (zero on unchanged rows)
                    W_hat[g] = c_new
                    R[g] -= delta
                    RHt.addmm_(Hp[cols].t(), delta.t(), alpha=-1.0)  # H is symmetric: H[:, G] = H[G, :]^T
                    codes[g] = new
        err = true_error()
        errors.append(err)
        if err <= best_err:
            best_err, best_codes = err, codes.clone()
    return best_codes.t().contiguous().to(codes0.dtype), errors


def _best_codes(u, cur, col_books, table, Hgg, quad_cache, g) -> torch.Tensor:
    """argmin over each row's book of ``c H_GG c^T - 2 c.u``: u [m, d], cur/col_books [m] -> codes [m].

    Keeps the current code unless another is strictly better, so float rounding never raises the
    objective. Rows are grouped by book (one group for PQ; one per row group for VQ).
    """
    b_first = int(col_books[0])
    books = [b_first] if bool((col_books == b_first).all()) else col_books.unique().tolist()
    new = cur.clone()
    for b in books:
        rows = None if len(books) == 1 else (col_books == b).nonzero(as_tuple=True)[0]
        C = table[b]  # [k, d]
        if (b, g) not in quad_cache:
            quad_cache[(b, g)] = ((C @ Hgg) * C).sum(-1)  # [k]
        ub, cb = (u, cur) if rows is None else (u[rows], cur[rows])
        score = torch.addmm(quad_cache[(b, g)], ub, C.t(), alpha=-2.0)  # [rows, k]
        pick = score.argmin(-1)
        better = score.gather(1, pick[:, None]) < score.gather(1, cb[:, None])
        pick = torch.where(better.squeeze(1), pick, cb)
        if rows is None:
            return pick
        new[rows] = pick
    return new


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread inside the block; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def feedback_codes(quantizer, W: torch.Tensor, H: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Codes of ``W`` chosen subspace by subspace in column order, each against a target that earlier
    subspaces' errors were fed into, as GPTQ does for columns (and GPTVQ for vectors).

    The centroids are the quantizer's and stay fixed. With ``U`` the upper Cholesky factor of
    ``H^{-1}`` (damped as the E-step damps), quantizing subspace ``G`` of a row to ``c`` and letting the
    later columns absorb its error costs ``|(t_G - c) U_GG^{-1}|^2``: the nearest centroid in that
    metric is taken, and the later columns move by ``-(t_G - c) U_GG^{-1} U_{G,later}``. The
    coordinate-descent E-step only ever moves one subspace against all the others fixed; this pass
    lets the whole row bend first. Column blocks of about ``block`` columns defer the updates beyond
    the block to one product, as GPTQ does. Row scales: the search is on ``W / s``, where each row's
    error is its scaled error over ``s_i^2``, so nothing else changes. Padded columns (and inputs
    that are always zero, undamped) are coupled to nothing: they get a unit diagonal for the
    factorisation and no weight in the metric, as in the output error. Returns codes ``[m, n_sub]`` in the dtype of
    ``codes_``; :func:`e_step` can start from them (``quantizer.set_codes``).
    """
    layout = codebook_layout_of(quantizer, "feedback_codes")
    table, book = layout.centroids(), layout.book  # [B, k, d], [m, n_sub]
    codes0 = quantizer.codes_
    m, n_sub = codes0.shape
    _, k, d = table.shape
    W2, _ = centroid_target(quantizer, W)
    n = W2.shape[1]
    if H.shape != (n, n):
        raise CompressKitError(f"feedback_codes: H must be [{n}, {n}] for a weight of {n} input columns, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise CompressKitError("feedback_codes: H has NaN or infinite values; check the calibration inputs")
    n_pad = n_sub * d
    Hp, _ = padded_hessians(H, n_pad, damp)
    Hp = Hp.double()
    dead = Hp.diagonal() <= 0  # padded columns and inputs that were always zero: nothing to feed
    Hp[dead, :] = 0
    Hp[:, dead] = 0
    Hp.diagonal()[dead] = 1.0
    L = torch.linalg.cholesky(Hp)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # H^{-1} = U^T U
    del Hp, L
    T = W2 if n_pad == n else torch.nn.functional.pad(W2, (0, n_pad - n))
    T = T.clone()
    codes = torch.empty(m, n_sub, dtype=torch.long)
    flat = table.reshape(-1, d)
    step = max(1, block // d) * d
    for b0 in range(0, n_pad, step):
        b1 = min(n_pad, b0 + step)
        E_block = torch.empty(m, b1 - b0)
        for c0 in range(b0, b1, d):
            g, cols = c0 // d, slice(c0, c0 + d)
            U_inv = torch.linalg.inv(U[cols, cols])  # [d, d], upper triangular
            U_inv[dead[cols]] = 0  # dead coordinates are decoupled: out of the metric and the feedback
            a = T[:, cols] @ U_inv  # the subspace's target in the feedback metric
            col_books = book[:, g]
            pick = torch.empty(m, dtype=torch.long)
            for bk in col_books.unique().tolist():
                rows = (col_books == bk).nonzero(as_tuple=True)[0] if len(col_books.unique()) > 1 else slice(None)
                Cb = table[bk] @ U_inv  # [k, d]
                score = torch.addmm((Cb * Cb).sum(-1), a[rows], Cb.t(), alpha=-2.0)
                pick[rows] = score.argmin(-1)
            codes[:, g] = pick
            E = (T[:, cols] - flat[col_books * k + pick]) @ U_inv  # [m, d]
            E_block[:, c0 - b0:c0 - b0 + d] = E
            if c0 + d < b1:
                T[:, c0 + d:b1] -= E @ U[cols, c0 + d:b1]
        if b1 < n_pad:
            T[:, b1:] -= E_block @ U[b0:b1, b1:]
    return codes.to(codes0.dtype)
