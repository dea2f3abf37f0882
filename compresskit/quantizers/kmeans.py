"""Batched k-means: many independent clusterings (one per PQ subspace) in one call.

This is the hot path of the toolkit. ``X`` is ``[G, N, d]``: G independent groups (subspaces,
codebooks), N points each, of dimension d; every group gets its own k centroids.

Initialisation is k-means++ (or k points sampled at random), then Lloyd iterations. Optionally the
*stochastic relaxation* of k-means (Zeger et al. 1992, used by PQF and DPQ): during iteration t of T
the centroids used for assignment are perturbed with Gaussian noise of standard deviation
``noise * (1 - t / T) * std(X_g)``, so early iterations can escape poor local minima and the last
ones are plain Lloyd steps. Empty clusters are re-seeded from random points of their group.

The arithmetic runs in numba kernels (``_kmeans_kernels.py``): a vectorised nearest-centroid scan,
Hamerly's bounds so that Lloyd iterations only rescan points that may have changed cluster (the
result is the same as a full scan, ties aside), and k-means++ seeding. Random numbers all come from
one ``torch.Generator``, so results depend on the seed only, not on the number of threads.
"""
from __future__ import annotations

import numpy as np
import torch

from compresskit.quantizers import _kmeans_kernels as _k


def _padded(k: int) -> int:
    return -(-k // 4) * 4


def _dims(d: int) -> tuple[int, ...]:
    """The kernels' compile-time width: a tuple whose length is d (see ``_kmeans_kernels``)."""
    return (0,) * d


def _centroid_tables(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C [G, k, d] -> (M2C [G, d, kp] = -2 C^T, CSQ [G, kp] = ||C||^2), padded as the kernels need."""
    G, k, d = C.shape
    C_pad = np.concatenate([C, np.repeat(C[:, -1:], _padded(k) - k, axis=1)], axis=1)  # [G, kp, d]
    m2c = np.ascontiguousarray(-2.0 * C_pad.transpose(0, 2, 1), dtype=np.float32)  # [G, d, kp]
    csq = np.ascontiguousarray((C_pad * C_pad).sum(-1), dtype=np.float32)  # [G, kp]
    return m2c, csq


def assign(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every point: X [G, N, d], C [G, k, d] -> codes [G, N] int64.

    Memory stays O(G (N + k) d): no distance matrix is formed, so N ~ 1e5 points against k ~ 3e4
    centroids is fine.
    """
    G, N, d = X.shape
    x = X.detach().to(torch.float32).numpy()
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))  # [G, d, N]
    m2c, csq = _centroid_tables(C.detach().to(torch.float32).numpy())
    codes = np.empty((G, N), np.int32)
    _k.assign_all(xt, m2c, csq, codes, _dims(d))
    return torch.from_numpy(codes).to(torch.int64)


class _Lloyd:
    """Assignment state carried across Lloyd iterations: codes and Hamerly bounds per point."""

    def __init__(self, X: np.ndarray, k: int):
        G, N, d = X.shape
        self.X = X  # [G, N, d] float32
        self.XT = np.ascontiguousarray(X.transpose(0, 2, 1))  # [G, d, N]
        self.XSQ = np.ascontiguousarray((X * X).sum(-1))  # [G, N]
        self.codes = np.zeros((G, N), np.int32)
        self.upper = np.full((G, N), np.inf, np.float32)  # >= distance to own centroid
        self.lower = np.zeros((G, N), np.float32)  # <= distance to any other centroid
        self.C_last: np.ndarray | None = None  # centroids the bounds refer to [G, k, d]
        self.with_gap = k <= max(N // 4, 1)  # the k^2 gap table only pays off for k << N
        kp = _padded(k)
        self.m2c = np.empty((G, d, kp), np.float32)
        self.csq = np.empty((G, kp), np.float32)
        self.drift = np.empty((G, k), np.float32)
        self.drift_top = np.empty((G, 3), np.float32)
        self.half_gap = np.empty((G, k), np.float32)
        self.scanned = 0  # points fully rescanned so far (a measure of the pruning)

    def assign(self, C: np.ndarray) -> np.ndarray:
        """Nearest of centroids C [G, k, d] for every point -> codes [G, N] int32 (updated in place)."""
        old = C if self.C_last is None else self.C_last
        _k.centroid_geometry(
            C, old, self.m2c, self.csq, self.drift, self.drift_top, self.half_gap, self.with_gap, _dims(C.shape[2])
        )
        self.scanned += _k.assign_bounded(
            self.X, self.XT, self.XSQ, C, self.m2c, self.csq, self.drift, self.drift_top, self.half_gap,
            self.codes, self.upper, self.lower, _dims(self.X.shape[2]),
        )
        self.C_last = C.copy()
        return self.codes


def _init_random(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    G, N, _ = X.shape
    idx = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(G)])  # [G, k]
    return torch.gather(X, 1, idx.unsqueeze(-1).expand(-1, -1, X.shape[2])).clone()


def _init_kmeanspp(XT: np.ndarray, k: int, gen: torch.Generator, w: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding from XT [G, d, N], each group independently: centroid j drawn with
    probability ~ w * D(x)^2."""
    G, d, _ = XT.shape
    first = torch.multinomial(w, 1, generator=gen).squeeze(1)  # [G]
    uniforms = torch.rand(G, k, generator=gen, dtype=torch.float64)  # [G, k], one draw per centroid
    C = np.empty((G, k, d), np.float32)
    _k.kmeanspp(XT, w.numpy(), first.numpy(), uniforms.numpy(), C, _dims(d))
    return torch.from_numpy(C)


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
    X = X.detach().to(torch.float32).contiguous()
    G, N, d = X.shape
    w = torch.ones(G, N) if weights is None else weights.detach().to(torch.float32).contiguous()
    gen = torch.Generator().manual_seed(seed)
    state = _Lloyd(X.numpy(), k)
    C = _init_kmeanspp(state.XT, k, gen, w) if init == "kmeans++" else _init_random(X, k, gen)
    spread = X.std(dim=1).mean(-1) if noise > 0 else None  # [G]
    x_np, w_np = X.numpy(), w.numpy()
    for t in range(n_iter):
        C_assign = C
        if spread is not None:
            scale = noise * (1.0 - t / n_iter) * spread  # [G]
            C_assign = C + torch.randn(C.shape, generator=gen) * scale[:, None, None]
        codes = state.assign(np.ascontiguousarray(C_assign.numpy()))
        sums, counts = (torch.from_numpy(a) for a in _k.cluster_sums(x_np, codes, w_np, k))
        filled = counts > 0  # [G, k]
        C = torch.where(filled.unsqueeze(-1), (sums / counts.clamp(min=1e-12).unsqueeze(-1)).float(), C)
        empty = ~filled
        if empty.any():
            g_idx, _ = empty.nonzero(as_tuple=True)
            pick = torch.randint(0, N, (g_idx.numel(),), generator=gen)
            C[empty] = X[g_idx, pick]
    codes = state.assign(np.ascontiguousarray(C.numpy()))
    _, counts = _k.cluster_sums(x_np, codes, w_np, k)
    return C.contiguous(), torch.from_numpy(codes).to(torch.int64), torch.from_numpy(counts).float()
