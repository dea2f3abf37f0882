"""A differentiable tiled rasterizer for projected splats, in pure torch (the CPU path of ``render``).

3DGS's algorithm, vectorised: the image is cut into square tiles (16x16 by default, as 3DGS); each splat
is listed in every tile its alpha >= 1/255 box touches; each tile's list is sorted by depth; pixels
composite front to back,
``C = sum_i c_i a_i T_i`` with ``T_i = prod_{j<i} (1 - a_j)`` and ``a = min(0.99, o exp(-d^T S^-1 d / 2))``,
contributions with ``a < 1/255`` skipped.

Work is done in *chunks* of tiles: a chunk's tensors are ``[tiles, P, K]`` (``P`` pixels per tile, ``K`` the
longest list in the chunk, shorter lists padded with opacity 0), and ``tiles * P * K <= max_elements``. Tiles
are sorted by list length first so padding wastes little, and a list longer than ``max_elements / P`` is
split along depth into slices composited in turn. So no tensor grows as Gaussians x pixels.

The tile size changes the work, never the image (tile lists are exact supersets of where alpha >= 1/255).
On CPU, 8x8 tiles are ~1.2-1.7x faster than 16x16 (fewer padded pixel-splat pairs; docs/BENCHMARKS.md).

The Gaussian exponent is a quadratic in the pixel position, so for a whole chunk it is one batched matmul
``feats [P, 6] @ coef [T, 6, K]`` with ``feats = (u^2, v^2, uv, u, v, 1)`` in tile-local coordinates
(centred on the tile, so the terms stay small and float32 keeps ~1e-6 accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compresskit.adapters.gaussians.composite import composite
from compresskit.adapters.gaussians.project import Splats

TILE = 16  # default pixels per tile side, as 3DGS and gsplat
DEFAULT_MAX_ELEMENTS = 1 << 19  # per-chunk [T, K, P] size: ~2 MB float32 tensors, cache-friendly on CPU


@dataclass
class Bins:
    """Splat-tile intersections sorted by (tile, depth); only tiles with at least one splat are listed.

    gauss: ``[I]`` long, index into the Splats of each intersection, tile-major then front to back.
    tile_x, tile_y: ``[I]`` long, tile column and row of each intersection.
    tiles: ``[U]`` long, flat ids (``row * n_tiles_x + col``) of the non-empty tiles, ascending.
    starts, counts: ``[U]`` long, where each non-empty tile's run begins in ``gauss`` and its length.
    """

    gauss: torch.Tensor
    tile_x: torch.Tensor
    tile_y: torch.Tensor
    tiles: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


@torch.no_grad()
def bin_splats(splats: Splats, width: int, height: int, tile: int = TILE) -> Bins:
    """List each splat in the ``tile`` x ``tile`` tiles whose pixel centres its alpha >= 1/255 box covers,
    sorted by depth."""
    n_tx = (width + tile - 1) // tile
    m = splats.means2d.shape[0]
    lo = torch.ceil(splats.means2d - splats.extents - 0.5)  # first pixel index whose centre is inside
    hi = torch.floor(splats.means2d + splats.extents - 0.5)
    size = torch.tensor([width - 1, height - 1], dtype=lo.dtype, device=lo.device)
    lo = torch.minimum(torch.maximum(lo, torch.zeros_like(lo)), size + 1).long()
    hi = torch.minimum(torch.maximum(hi, torch.full_like(hi, -1.0)), size).long()
    t0 = torch.div(lo, tile, rounding_mode="floor")
    t1 = torch.div(hi, tile, rounding_mode="floor")
    span = (t1 - t0 + 1).clamp(min=0) * (hi >= lo)  # [M, 2] tiles covered along x and y
    per_splat = span[:, 0] * span[:, 1]  # [M]
    gauss = torch.repeat_interleave(torch.arange(m, device=lo.device), per_splat)  # [I]
    first = torch.cumsum(per_splat, 0) - per_splat  # [M] offset of each splat's first intersection
    local = torch.arange(gauss.numel(), device=lo.device) - first[gauss]
    wide = span[gauss, 0]
    tile_x = t0[gauss, 0] + local % wide.clamp(min=1)
    tile_y = t0[gauss, 1] + torch.div(local, wide.clamp(min=1), rounding_mode="floor")
    flat = tile_y * n_tx + tile_x
    # Sort by tile, then by depth (stable for equal depths: lower index in front).
    rank = torch.empty(m, dtype=torch.long, device=lo.device)
    rank[torch.sort(splats.depths, stable=True).indices] = torch.arange(m, device=lo.device)
    order = torch.sort(flat * max(m, 1) + rank[gauss]).indices
    gauss, tile_x, tile_y, flat = gauss[order], tile_x[order], tile_y[order], flat[order]
    tiles, counts = torch.unique_consecutive(flat, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return Bins(gauss, tile_x, tile_y, tiles, starts, counts)


def plan_chunks(counts: torch.Tensor, max_elements: int, pixels: int = TILE * TILE) -> list[tuple[int, int, int, int]]:
    """Split the work into chunks of at most ``max_elements`` per-pixel-per-splat entries.

    counts: ``[U]`` list lengths, sorted descending. Returns ``(row0, row1, k0, k)``: tiles ``row0:row1`` of
    that order, depth slots ``k0 : k0 + k``, so a chunk's tensors are ``[row1 - row0, pixels, k]``.
    """
    max_k = max(1, max_elements // pixels)
    plan = []
    c = counts.tolist()
    k0 = 0
    while c and c[0] > k0:  # one pass per depth slice of max_k slots; tiles with lists that long take part
        n_rows = sum(1 for x in c if x > k0)  # a prefix, since counts are sorted descending
        row = 0
        while row < n_rows:
            k = min(c[row] - k0, max_k)
            rows = max(1, min(n_rows - row, max_elements // (k * pixels)))
            plan.append((row, row + rows, k0, k))
            row += rows
        k0 += max_k
    return plan


def pixel_features(dtype: torch.dtype, device, tile: int = TILE) -> torch.Tensor:
    """``[tile*tile, 6]``: (u^2, v^2, uv, u, v, 1) of each pixel centre relative to its tile's centre."""
    r = torch.arange(tile, dtype=dtype, device=device) + 0.5 - tile / 2
    v, u = torch.meshgrid(r, r, indexing="ij")  # row-major pixels: v is the row offset, u the column
    u, v = u.reshape(-1), v.reshape(-1)
    return torch.stack([u * u, v * v, u * v, u, v, torch.ones_like(u)], dim=1)


def exponent_coefs(means2d, conics, tile_x, tile_y, tile: int = TILE):
    """``[I, 6]`` coefficients of ``-d^T S^-1 d / 2`` as a quadratic in tile-local pixel coordinates.

    means2d ``[I, 2]`` pixels and conics ``[I, 3]`` (a, b, c) per intersection; tile_x, tile_y ``[I]``.
    """
    mx = means2d[:, 0] - (tile_x * tile + tile / 2).to(means2d.dtype)
    my = means2d[:, 1] - (tile_y * tile + tile / 2).to(means2d.dtype)
    a, b, c = conics.unbind(-1)
    return torch.stack(
        [-0.5 * a, -0.5 * c, -b, a * mx + b * my, b * mx + c * my, -0.5 * (a * mx * mx + c * my * my) - b * mx * my],
        dim=-1,
    )


def rasterize(
    splats: Splats,
    width: int,
    height: int,
    background: torch.Tensor,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    tile: int = TILE,
):
    """Composite ``splats`` into an image; returns ``image [3, H, W]`` and ``alpha [H, W]`` (1 - transmittance).

    background: ``[3]``, added where transmittance remains. ``max_elements`` bounds every chunk and ``tile``
    is the tile side in pixels (see the module docstring); neither changes the image.
    """
    dtype, device = splats.means2d.dtype, splats.means2d.device
    n_tx, n_ty = (width + tile - 1) // tile, (height + tile - 1) // tile
    pixels = tile * tile
    bins = bin_splats(splats, width, height, tile)
    color = torch.zeros(n_tx * n_ty, pixels, 3, dtype=dtype, device=device)
    trans = torch.ones(n_tx * n_ty, pixels, dtype=dtype, device=device)
    if bins.gauss.numel():
        g = bins.gauss
        coefs = exponent_coefs(splats.means2d[g], splats.conics[g], bins.tile_x, bins.tile_y, tile)  # [I, 6]
        # One zero row at the end: padding slots index it, so they have opacity 0 and add nothing.
        coefs = torch.cat([coefs, coefs.new_zeros(1, 6)])
        opac = torch.cat([splats.opacities[g], splats.opacities.new_zeros(1)])
        rgb = torch.cat([splats.colors[g], splats.colors.new_zeros(1, 3)])
        pad = g.numel()
        counts, by_len = torch.sort(bins.counts, descending=True, stable=True)
        starts = bins.starts[by_len]
        feats = pixel_features(dtype, device, tile)
        tile_color = torch.zeros(counts.numel(), pixels, 3, dtype=dtype, device=device)
        tile_trans = torch.ones(counts.numel(), pixels, dtype=dtype, device=device)
        parts: dict[int, list] = {}
        for row0, row1, k0, k in plan_chunks(counts, max_elements, pixels):
            slot = torch.arange(k0, k0 + k, device=device)
            idx = starts[row0:row1, None] + slot  # [T, k]
            idx = torch.where(slot < counts[row0:row1, None], idx, torch.full_like(idx, pad))
            parts.setdefault(k0, []).append(composite(coefs[idx], opac[idx], rgb[idx], feats))
        for k0 in sorted(parts):  # depth slices in front-to-back order: C += T * C_slice, T *= T_slice
            c_slice = torch.cat([p[0] for p in parts[k0]])
            t_slice = torch.cat([p[1] for p in parts[k0]])
            n = c_slice.shape[0]
            tile_color = torch.cat([tile_color[:n] + tile_trans[:n, :, None] * c_slice, tile_color[n:]])
            tile_trans = torch.cat([tile_trans[:n] * t_slice, tile_trans[n:]])
        where = bins.tiles[by_len]
        color = color.index_copy(0, where, tile_color)
        trans = trans.index_copy(0, where, tile_trans)
    else:  # nothing on screen: stay on the autograd graph (zero gradients) so a training step's backward works
        color = color + 0.0 * splats.opacities.sum()
    image = color + trans[..., None] * background.to(dtype)  # [n_tiles, P, 3]
    image = image.reshape(n_ty, n_tx, tile, tile, 3).permute(4, 0, 2, 1, 3).reshape(3, n_ty * tile, n_tx * tile)
    alpha = (1.0 - trans).reshape(n_ty, n_tx, tile, tile).permute(0, 2, 1, 3).reshape(n_ty * tile, n_tx * tile)
    return image[:, :height, :width], alpha[:height, :width]
