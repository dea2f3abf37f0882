"""Numba kernels behind ``kmeans.py``. Private: inputs are assumed valid, float32 and contiguous.

Layout: points are stored dimension-major, ``XT [G, D, N]``, and centroids as ``M2C [G, D, kp]``
(minus twice the centroid) plus ``CSQ [G, kp]`` (squared norms), with ``kp`` a multiple of 4 (padded
with copies of the last centroid, which never win a strict comparison). A point's *score* for a
centroid is ``||c||^2 - 2 x.c = ||x - c||^2 - ||x||^2``: the same argmin, D multiply-adds per pair.

The scan keeps a block of points in a small scratch array and walks the centroids four at a time,
so the innermost loop runs over points with no cross-iteration dependency and LLVM vectorises it
(8 float32 lanes on AVX2). The subvector width reaches the kernels as ``dims``, a tuple of D zeros:
its length is part of the argument type, so each width gets its own compiled kernel with the
dimension loop unrolled (``numba.literally`` would do the same but re-dispatches slowly on every
call); ``cache=True`` keeps the compiled kernels on disk.

Lloyd iterations skip most of the work with Hamerly's bounds (G. Hamerly, "Making k-means even
faster", SDM 2010): per point an upper bound on the distance to its centroid and a lower bound on the
distance to every other one. When centroids move by ``drift``, the bounds move by at most that much
(triangle inequality); a point whose upper bound is below ``max(lower, half the gap from its centroid
to the nearest other one)`` cannot change cluster and is not rescanned.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Fast-math without 'ninf'/'nnan': +inf is used as "no candidate yet" and must compare correctly.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
BLOCK = 128  # points scanned together (the vectorised dimension)
CHUNK = 2048  # points per parallel task


@njit(fastmath=FASTMATH, cache=True)
def _scan(xb, n, m2c, csq, best, second, bidx, dims, with_second):
    """Best (and, if ``with_second``, second-best) score of points ``xb [D, BLOCK]`` (first n valid)
    over all centroids. ``best``/``second`` [BLOCK] float32 scores, ``bidx`` [BLOCK] int32: index
    of the first minimum."""
    D = len(dims)
    kp = csq.shape[0]
    for p in range(n):
        best[p] = np.inf
        second[p] = np.inf
        bidx[p] = 0
    for j in range(0, kp, 4):
        for pu in range(np.uint64(n)):  # unsigned index: no negative-index wraparound, so it vectorises
            p = np.uint64(pu)
            m = best[p]
            m2 = second[p]
            bi = bidx[p]
            for u in range(4):
                score = csq[j + u]
                for t in range(D):
                    score += m2c[t, j + u] * xb[t, p]
                if with_second:
                    m2 = min(m2, max(score, m))
                take = score < m
                bi = np.int32(j + u) if take else bi
                m = score if take else m
            best[p] = m
            second[p] = m2
            bidx[p] = bi


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def assign_all(XT, M2C, CSQ, codes, dims):
    """Brute-force nearest centroid: XT [G, D, N], M2C [G, D, kp], CSQ [G, kp] -> codes [G, N] int32."""
    D = len(dims)
    G, N = XT.shape[0], XT.shape[2]
    n_chunks = (N + CHUNK - 1) // CHUNK
    for task in prange(G * n_chunks):
        g = task // n_chunks
        lo = (task % n_chunks) * CHUNK
        hi = min(N, lo + CHUNK)
        xb = np.zeros((D, BLOCK), np.float32)
        best = np.empty(BLOCK, np.float32)
        second = np.empty(BLOCK, np.float32)
        bidx = np.empty(BLOCK, np.int32)
        for p0 in range(lo, hi, BLOCK):
            n = min(BLOCK, hi - p0)
            for t in range(D):
                for p in range(n):
                    xb[t, p] = XT[g, t, p0 + p]
            _scan(xb, n, M2C[g], CSQ[g], best, second, bidx, dims, False)
            for p in range(n):
                codes[g, p0 + p] = bidx[p]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def assign_bounded(X, XT, XSQ, C, M2C, CSQ, drift, drift_top, half_gap, codes, upper, lower, dims):
    """Hamerly-pruned assignment; updates ``codes``, ``upper``, ``lower`` [G, N] in place.

    ``drift [G, k]``: how far each centroid moved since the bounds were last valid; ``drift_top
    [G, 3]``: (largest drift, its index, second largest); ``half_gap [G, k]``: half the distance from
    each centroid to its nearest neighbour (0 disables that test). Returns the number of points scanned.
    """
    D = len(dims)
    G, N = XT.shape[0], XT.shape[2]
    n_chunks = (N + CHUNK - 1) // CHUNK
    scanned = np.zeros(G * n_chunks, np.int64)
    for task in prange(G * n_chunks):
        g = task // n_chunks
        lo = (task % n_chunks) * CHUNK
        hi = min(N, lo + CHUNK)
        todo = np.empty(CHUNK, np.int64)
        n_todo = 0
        top, top_j, runner_up = drift_top[g, 0], np.int64(drift_top[g, 1]), drift_top[g, 2]
        for i in range(lo, hi):
            a = codes[g, i]
            u = upper[g, i] + drift[g, a]
            low = lower[g, i] - (runner_up if a == top_j else top)
            lower[g, i] = low
            z = max(low, half_gap[g, a])
            if u > z:  # the bound is loose: tighten it with the exact distance
                dist = np.float32(0.0)
                for t in range(D):
                    diff = X[g, i, t] - C[g, a, t]
                    dist += diff * diff
                u = np.sqrt(dist)
                if u > z:
                    todo[n_todo] = i
                    n_todo += 1
            upper[g, i] = u
        scanned[task] = n_todo
        xb = np.zeros((D, BLOCK), np.float32)
        best = np.empty(BLOCK, np.float32)
        second = np.empty(BLOCK, np.float32)
        bidx = np.empty(BLOCK, np.int32)
        for b0 in range(0, n_todo, BLOCK):
            n = min(BLOCK, n_todo - b0)
            for t in range(D):
                for p in range(n):
                    xb[t, p] = XT[g, t, todo[b0 + p]]
            _scan(xb, n, M2C[g], CSQ[g], best, second, bidx, dims, True)
            for p in range(n):
                i = todo[b0 + p]
                codes[g, i] = bidx[p]
                upper[g, i] = np.sqrt(max(best[p] + XSQ[g, i], 0.0))
                lower[g, i] = np.sqrt(max(second[p] + XSQ[g, i], 0.0))
    return scanned.sum()


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def centroid_geometry(C, C_old, M2C, CSQ, drift, drift_top, half_gap, with_gap, dims):
    """From centroids C [G, k, D] (and the previous ones C_old): fill M2C, CSQ (padded to kp),
    drift [G, k], drift_top [G, 3] and, if ``with_gap``, half_gap [G, k] (else zeros)."""
    D = len(dims)
    G, k = C.shape[0], C.shape[1]
    kp = CSQ.shape[1]
    for g in prange(G):
        for j in range(kp):
            src = min(j, k - 1)  # padding repeats the last centroid
            s = np.float32(0.0)
            for t in range(D):
                M2C[g, t, j] = -2.0 * C[g, src, t]
                s += C[g, src, t] * C[g, src, t]
            CSQ[g, j] = s
        top, top_j, runner_up = -1.0, 0, -1.0
        for j in range(k):
            s = 0.0
            for t in range(D):
                diff = C[g, j, t] - C_old[g, j, t]
                s += diff * diff
            dj = np.sqrt(s)
            drift[g, j] = dj
            if dj > top:
                runner_up, top, top_j = top, dj, j
            elif dj > runner_up:
                runner_up = dj
        drift_top[g, 0], drift_top[g, 1], drift_top[g, 2] = top, top_j, max(runner_up, 0.0)
        if not with_gap:
            half_gap[g, :] = 0.0
            continue
        for j in range(k):  # ||c_j - c_j2||^2 = |c_j|^2 + |c_j2|^2 - 2 c_j.c_j2, vectorised over j2
            nearest = np.float32(np.inf)
            self_j = np.uint64(j)
            for j2u in range(np.uint64(k)):
                j2 = np.uint64(j2u)
                s = CSQ[g, j] + CSQ[g, j2]
                for t in range(D):
                    s += M2C[g, t, j2] * C[g, j, t]
                nearest = min(nearest, np.float32(np.inf) if j2 == self_j else s)
            half_gap[g, j] = 0.5 * np.sqrt(max(nearest, 0.0))


@njit(parallel=True, cache=True)
def cluster_sums(X, codes, weights, k):
    """Weighted sums [G, k, D] and weights [G, k] (float64) of the points in each cluster."""
    G, N, D = X.shape
    sums = np.zeros((G, k, D), np.float64)
    counts = np.zeros((G, k), np.float64)
    for g in prange(G):
        for i in range(N):
            a = codes[g, i]
            w = weights[g, i]
            counts[g, a] += w
            for t in range(D):
                sums[g, a, t] += w * X[g, i, t]
    return sums, counts


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def kmeanspp(XT, weights, first, uniforms, C, dims):
    """k-means++ seeding: XT [G, D, N], weights [G, N], first [G] (index of the first centroid),
    uniforms [G, k] in [0, 1) -> C [G, k, D]. Centroid j is drawn with probability ~ w * D(x)^2;
    when every weighted point already sits on a centroid, with probability ~ w."""
    D = len(dims)
    G, N = XT.shape[0], XT.shape[2]
    k = C.shape[1]
    blk = 512
    n_blk = (N + blk - 1) // blk
    for g in prange(G):
        best = np.full(N, np.inf, np.float32)
        mass = np.empty(n_blk, np.float64)  # per-block sum of w * D(x)^2
        w_mass = np.empty(n_blk, np.float64)  # per-block sum of w
        for b in range(n_blk):
            s = 0.0
            for i in range(b * blk, min(N, b * blk + blk)):
                s += weights[g, i]
            w_mass[b] = s
        cj = np.empty(D, np.float32)
        pick = first[g]
        for j in range(k):
            for t in range(D):
                cj[t] = XT[g, t, pick]
                C[g, j, t] = cj[t]
            if j == k - 1:
                break
            total = 0.0
            for b in range(n_blk):  # best = min(best, |x - c_j|^2), and the block masses
                s = np.float32(0.0)
                lo = np.uint64(b * blk)
                for iu in range(np.uint64(min(blk, N - b * blk))):
                    i = lo + iu
                    dist = np.float32(0.0)
                    for t in range(D):
                        diff = XT[g, t, i] - cj[t]
                        dist += diff * diff
                    nb = min(best[i], dist)
                    best[i] = nb
                    s += nb * weights[g, i]
                mass[b] = s
                total += s
            use_w = not total > 0.0
            target = uniforms[g, j + 1] * (w_mass.sum() if use_w else total)
            pick = -1
            acc = 0.0
            for b in range(n_blk):
                m = w_mass[b] if use_w else mass[b]
                if m <= 0.0:
                    continue
                if acc + m <= target:  # the target lies past this block
                    acc += m
                    continue
                for i in range(b * blk, min(N, b * blk + blk)):
                    p = weights[g, i] * (1.0 if use_w else best[i])
                    if p > 0.0:
                        pick = i
                        acc += p
                        if acc > target:
                            break
                break
            if pick < 0:  # rounding put the target past the end: take the last point with mass
                pick = 0
                for i in range(N - 1, -1, -1):
                    if weights[g, i] * (1.0 if use_w else best[i]) > 0.0:
                        pick = i
                        break
    return C
