"""Render a 3DGS scene from a camera: the public entry of the renderer.

``render(gaussians, camera)`` projects (``project.py``) and rasterizes (``raster.py``) in pure torch, so it
runs and back-propagates on CPU. When the tensors are on CUDA and gsplat is installed it hands the same
inputs to ``gsplat.rasterization`` instead (same conventions: OpenCV camera, pixel centres at +0.5,
eps2d = 0.3, colour = clamp(SH + 0.5, 0)); the outputs have the same shapes and meaning.

``gaussians`` is anything with the attributes of ``docs/gaussians.md``: ``means [N, 3]``, ``f_dc [N, 3]``,
``f_rest [N, K-1, 3]``, ``opacities [N]`` (logits), ``scales [N, 3]`` (log), ``quats [N, 4]`` (wxyz).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

import torch

from compresskit.adapters.gaussians.camera import Camera, orbit_cameras
from compresskit.adapters.gaussians.project import project, sh_degree_of
from compresskit.adapters.gaussians.raster import DEFAULT_MAX_ELEMENTS, TILE, rasterize
from compresskit.errors import CompressKitError

__all__ = ["Camera", "RenderResult", "orbit_cameras", "render", "render_views"]

_ATTRIBUTES = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")


@dataclass
class RenderResult:
    """image: ``[3, H, W]`` float RGB (background included). alpha: ``[H, W]`` accumulated opacity in [0, 1]."""

    image: torch.Tensor
    alpha: torch.Tensor


def _check(gaussians) -> None:
    missing = [a for a in _ATTRIBUTES if not hasattr(gaussians, a)]
    if missing:
        raise CompressKitError(f"render needs Gaussians with attributes {', '.join(_ATTRIBUTES)}; missing {', '.join(missing)}")
    n = gaussians.means.shape[0]
    shapes = {a: tuple(getattr(gaussians, a).shape) for a in _ATTRIBUTES}
    want = {"means": (n, 3), "f_dc": (n, 3), "opacities": (n,), "scales": (n, 3), "quats": (n, 4)}
    bad = [f"{a} {shapes[a]}" for a, s in want.items() if shapes[a] != s]
    if len(shapes["f_rest"]) != 3 or shapes["f_rest"][0] != n or shapes["f_rest"][2] != 3:
        bad.append(f"f_rest {shapes['f_rest']}")
    if bad:
        raise CompressKitError(
            f"Gaussian attributes have the wrong shapes for N={n}: {', '.join(bad)} (see docs/gaussians.md)"
        )


def _use_gsplat(gaussians) -> bool:
    return gaussians.means.is_cuda and importlib.util.find_spec("gsplat") is not None


def _render_gsplat(gaussians, camera: Camera, background: torch.Tensor, sh_degree: int) -> RenderResult:
    """The CUDA branch: gsplat's fused rasterizer on the same inputs (classic mode, no antialiasing)."""
    import gsplat

    sh = torch.cat([gaussians.f_dc[:, None, :], gaussians.f_rest], dim=1)  # [N, K, 3]
    device = gaussians.means.device
    colors, alphas, _ = gsplat.rasterization(
        means=gaussians.means,
        quats=gaussians.quats,
        scales=torch.exp(gaussians.scales),
        opacities=torch.sigmoid(gaussians.opacities),
        colors=sh,
        viewmats=camera.world_to_camera.to(device=device, dtype=gaussians.means.dtype)[None],
        Ks=camera.K.to(device=device, dtype=gaussians.means.dtype)[None],
        width=camera.width,
        height=camera.height,
        near_plane=0.01,
        eps2d=0.3,
        sh_degree=sh_degree,
        backgrounds=background[None],
        rasterize_mode="classic",
        packed=False,  # gsplat 1.5.3 checks packed backgrounds against no camera axis and fails
    )
    return RenderResult(image=colors[0].permute(2, 0, 1), alpha=alphas[0, ..., 0])


def render(
    gaussians,
    camera: Camera,
    background: torch.Tensor | Sequence[float] | None = None,
    sh_degree: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    tile_size: int = TILE,
) -> RenderResult:
    """Render ``gaussians`` seen by ``camera``; differentiable w.r.t. every attribute.

    background: RGB ``[3]`` in [0, 1] behind the scene, black by default. sh_degree: SH degree to evaluate
    (default: all the scene stores). CPU path only, neither changes the image: max_elements, the largest
    per-chunk ``[tiles, pixels, K]`` tensor (memory versus speed); tile_size, the tile side in pixels (16 as
    3DGS; 8 is ~1.2-1.7x faster on CPU, see ``docs/BENCHMARKS.md``).
    """
    _check(gaussians)
    means = gaussians.means
    degree = sh_degree_of(gaussians.f_rest, sh_degree)
    if background is None:
        bg = torch.zeros(3, dtype=means.dtype, device=means.device)
    else:
        bg = torch.as_tensor(background, dtype=means.dtype, device=means.device).reshape(-1)
        if bg.numel() != 3:
            raise CompressKitError(f"background must be 3 RGB values, got {bg.numel()}")
    if _use_gsplat(gaussians):
        return _render_gsplat(gaussians, camera, bg, degree)
    splats = project(gaussians, camera, degree)
    if tile_size < 1:
        raise CompressKitError(f"tile_size must be a positive number of pixels, got {tile_size}")
    image, alpha = rasterize(splats, camera.width, camera.height, bg, max_elements, tile_size)
    return RenderResult(image=image, alpha=alpha)


@torch.no_grad()
def render_views(
    gaussians,
    cameras: Sequence[Camera],
    background=None,
    sh_degree: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    tile_size: int = TILE,
) -> torch.Tensor:
    """Render every camera without gradients: ``[V, 3, H, W]`` (all cameras must share one image size)."""
    if not cameras:
        raise CompressKitError("render_views needs at least one camera")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) > 1:
        raise CompressKitError(f"render_views needs cameras of one image size, got {sorted(sizes)}")
    return torch.stack([render(gaussians, c, background, sh_degree, max_elements, tile_size).image for c in cameras])
