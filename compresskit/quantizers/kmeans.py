"""Batched k-means: many independent clusterings (one per PQ subspace) in one call.

This is the hot path of the toolkit. ``X`` is ``[G, N, d]``: G independent groups (subspaces,
codebooks), N points each, of dimension d; every group gets its own k centroids.

Initialisation is k-means++ (or k points sampled at random), then Lloyd iterations. Optionally the
*stochastic relaxation* of k-means (Zeger et al. 1992, used by PQF and DPQ): during iteration t of T
the centroids used for assignment are perturbed with Gaussian noise of standard deviation
``noise * (1 - t / T) * std(X_g)``, so early iterations can escape poor local minima and the last
ones are plain Lloyd steps. Empty clusters are re-seeded from random points of their group.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMS = 1 << 22  # distance-matrix elements per chunk (16 MB of float32)


def assign(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every point: X [G, N, d], C [G, k, d] -> codes [G, N] int64."""
    G, N, _ = X.shape
    k = C.shape[1]
    codes = torch.empty(G, N, dtype=torch.int64)
    c_sq = (C * C).sum(-1)  # [G, k]
    minus2_ct = (-2.0 * C).transpose(1, 2)  # [G, d, k]
    rows = max(1, min(N, _CHUNK_ELEMS // k))
    for g in range(G):
        for r in range(0, N, rows):
            dist = torch.addmm(c_sq[g], X[g, r : r + rows], minus2_ct[g])  # [rows, k]
            codes[g, r : r + rows] = dist.argmin(-1)
    return codes


def _update(X: torch.Tensor, codes: torch.Tensor, k: int, weights: torch.Tensor | None):
    """Weighted centroid sums and counts: returns sums [G, k, d], counts [G, k] (float64-safe)."""
    G, N, d = X.shape
    flat = (codes + torch.arange(G).unsqueeze(1) * k).reshape(-1)  # [G*N]
    w = torch.ones(G * N) if weights is None else weights.reshape(-1).to(torch.float32)
    sums = torch.zeros(G * k, d).index_add_(0, flat, X.reshape(-1, d) * w.unsqueeze(1))
    counts = torch.zeros(G * k).index_add_(0, flat, w)
    return sums.reshape(G, k, d), counts.reshape(G, k)


def _init_random(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    G, N, _ = X.shape
    idx = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(G)])  # [G, k]
    return torch.gather(X, 1, idx.unsqueeze(-1).expand(-1, -1, X.shape[2])).clone()


def _init_kmeanspp(X: torch.Tensor, k: int, gen: torch.Generator, weights: torch.Tensor | None) -> torch.Tensor:
    """k-means++ seeding, all groups at once: each new centroid drawn with prob ~ w * D(x)^2."""
    G, N, d = X.shape
    C = torch.empty(G, k, d)
    w = torch.ones(G, N) if weights is None else weights.to(torch.float32)
    first = torch.multinomial(w, 1, generator=gen).squeeze(1)  # [G]
    C[:, 0] = X[torch.arange(G), first]
    best = ((X - C[:, :1]) ** 2).sum(-1)  # [G, N]
    for j in range(1, k):
        p = best * w
        p = torch.where(p.sum(1, keepdim=True) > 0, p, w)  # all points coincide with centroids
        nxt = torch.multinomial(p, 1, generator=gen).squeeze(1)
        C[:, j] = X[torch.arange(G), nxt]
        best = torch.minimum(best, ((X - C[:, j : j + 1]) ** 2).sum(-1))
    return C


def kmeans(
    X: torch.Tensor,
    k: int,
    n_iter: int = 20,
    init: str = "kmeans++",
    noise: float = 0.0,
    seed: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster each group of ``X`` [G, N, d] into ``k`` centroids.

    ``weights`` [G, N] (optional, non-negative) weighs points in seeding and centroid updates.
    Returns ``(centroids [G, k, d] float32, codes [G, N] int64, counts [G, k] float32)`` where
    counts are the (weighted) cluster sizes of the final assignment. Deterministic for a seed.
    """
    X = X.to(torch.float32).contiguous()
    G, N, d = X.shape
    gen = torch.Generator().manual_seed(seed)
    C = _init_kmeanspp(X, k, gen, weights) if init == "kmeans++" else _init_random(X, k, gen)
    spread = X.std(dim=1).mean(-1) if noise > 0 else None  # [G]
    for t in range(n_iter):
        C_assign = C
        if spread is not None:
            scale = noise * (1.0 - t / n_iter) * spread  # [G]
            C_assign = C + torch.randn(C.shape, generator=gen) * scale[:, None, None]
        codes = assign(X, C_assign)
        sums, counts = _update(X, codes, k, weights)
        C = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1e-12).unsqueeze(-1), C)
        empty = counts == 0
        if empty.any():
            g_idx, _ = empty.nonzero(as_tuple=True)
            pick = torch.randint(0, N, (g_idx.numel(),), generator=gen)
            C[empty] = X[g_idx, pick]
    codes = assign(X, C)
    _, counts = _update(X, codes, k, weights)
    return C, codes, counts
