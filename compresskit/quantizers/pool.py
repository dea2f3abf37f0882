"""DPQ's codebook compression: many per-subspace codebooks -> one shared pool + a projection table.

A PQ layer with B codebooks of k centroids stores B*k centroids. DPQ (Section 3.2 and the
supplementary) replaces them with one pool of ``N' = m*n / (16 d^2)`` centroids and a table
``projection [B, k]`` (int16) mapping each codebook entry to a pool entry; codes are unchanged and a
subvector is rebuilt as ``pool[projection[b, code]]``.

How the pool is chosen (frequency and similarity, as the paper describes):
1. centroids closer than ``tau_c`` (relative to the weight's RMS, on a grid of that cell size) are
   merged into one usage-weighted mean;
2. if more remain than the pool holds, the most used ones seed the pool (the least used go first);
3. a few Lloyd steps of k-means over the centroids, weighted by usage, refine the pool. With codes
   fixed, the added squared error of the layer is the usage-weighted distance of each centroid to
   its pool entry, which is exactly what these steps minimise.
"""
from __future__ import annotations

import torch

from compresskit.quantizers.kmeans import assign


def pool_size_for(rows: int, cols: int, d: int) -> int:
    """The paper's pool size ``N' = m n / (16 d^2)`` (floored), for a weight of rows x cols."""
    return max(1, (rows * cols) // (16 * d * d))


def build_pool(
    codebooks: torch.Tensor,
    counts: torch.Tensor,
    pool_size: int,
    tau_c: float,
    scale: float,
    n_iter: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``codebooks`` [B, k, d] used ``counts`` [B, k] times into a pool.

    Returns ``(pool [P, d] float32, projection [B, k] int64)`` with ``P <= pool_size``.
    """
    B, k, d = codebooks.shape
    flat = codebooks.reshape(-1, d).to(torch.float32)  # [B*k, d]
    usage = counts.reshape(-1).to(torch.float32)  # [B*k]

    # 1. similarity merge on a grid of cell tau_c * scale
    cell = max(tau_c * scale, 1e-12)
    keys = torch.round(flat / cell).to(torch.int64)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # [B*k] -> unique id
    n_unique = int(inverse.max()) + 1
    weight = usage + 1e-6  # unused centroids still get a well-defined mean
    merged_w = torch.zeros(n_unique).index_add_(0, inverse, weight)
    merged = torch.zeros(n_unique, d).index_add_(0, inverse, flat * weight[:, None]) / merged_w[:, None]
    merged_usage = torch.zeros(n_unique).index_add_(0, inverse, usage)
    if n_unique <= pool_size:
        return merged, inverse.reshape(B, k)

    # 2. seed with the most used, 3. usage-weighted Lloyd refinement
    order = torch.argsort(merged_usage, descending=True, stable=True)
    pool = merged[order[:pool_size]].clone()
    w = merged_usage + 1e-6
    for _ in range(n_iter):
        a = assign(merged[None], pool[None])[0]  # [n_unique]
        sums = torch.zeros(pool_size, d).index_add_(0, a, merged * w[:, None])
        tot = torch.zeros(pool_size).index_add_(0, a, w)
        pool = torch.where(tot[:, None] > 0, sums / tot.clamp(min=1e-12)[:, None], pool)
    a = assign(merged[None], pool[None])[0]
    return pool, a[inverse].reshape(B, k)


def refine_pool(
    sub: torch.Tensor,
    book_idx: torch.Tensor,
    codes: torch.Tensor,
    pool: torch.Tensor,
    projection: torch.Tensor,
    n_iter: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternate three exact minimisations of the layer's squared error ``sum ||x - pool[proj[code]]||^2``.

    ``sub`` [n_sub, m, d] subvectors, ``book_idx`` [n_sub, 1] = book * k, ``codes`` [n_sub, m],
    ``pool`` [P, d], ``projection`` [B, k]. Each round: (1) every pool entry becomes the mean of the
    subvectors that reach it; (2) every codebook slot points to the pool entry nearest to the mean of
    its subvectors (weighted by their count, this is exact); (3) every subvector takes the slot of its
    book whose pool entry is nearest. None can raise the error. Returns (pool, projection, codes).
    """
    n_sub, m, d = sub.shape
    B = projection.shape[0]
    x = sub.reshape(-1, d)  # [n_sub*m, d]
    proj = projection.reshape(-1).clone()  # [B*k]
    pool = pool.clone()
    P = pool.shape[0]
    for _ in range(n_iter):
        slot = (book_idx + codes.long()).reshape(-1)  # [n_sub*m] codebook slot per subvector
        # (1) pool entries
        entry = proj[slot]
        sums = torch.zeros(P, d).index_add_(0, entry, x)
        cnt = torch.zeros(P).index_add_(0, entry, torch.ones(entry.numel()))
        pool = torch.where(cnt[:, None] > 0, sums / cnt.clamp(min=1)[:, None], pool)
        # (2) projection: slot mean -> nearest pool entry
        slot_sums = torch.zeros(B * k, d).index_add_(0, slot, x)
        slot_cnt = torch.zeros(B * k).index_add_(0, slot, torch.ones(slot.numel()))
        used = slot_cnt > 0
        means = slot_sums[used] / slot_cnt[used, None]
        proj[used] = assign(means[None].contiguous(), pool[None].contiguous())[0]
        # (3) codes: nearest effective centroid of the subvector's book
        effective = pool[proj].reshape(B, k, d)
        books = effective[(book_idx[:, 0] // k)]  # [n_sub, k, d]
        codes = assign(sub, books.contiguous())
    return pool, proj.reshape(B, k), codes
