"""From 3D Gaussians to 2D splats: SH colour and EWA projection, as in 3DGS (Kerbl et al. 2023).

Everything here is plain differentiable torch over ``[N, ...]`` tensors; the rasterizer (``raster.py``)
consumes what ``project`` returns. Units follow ``docs/gaussians.md``: log scales, logit opacities,
unnormalised ``wxyz`` quaternions, SH coefficients coefficient-major with the channel last.

References: the 3DGS paper's EWA splatting (Zwicker et al. 2002) with the 0.3-pixel low-pass filter, and
the real SH constants of 3DGS's ``utils/sh_utils.py`` (also what gsplat evaluates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compresskit.errors import CompressKitError

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)

NEAR_PLANE = 0.01  # camera-space z below this is culled (3DGS / gsplat default)
LOW_PASS = 0.3  # pixels^2 added to the 2D covariance's diagonal: every splat covers ~a pixel
ALPHA_MIN = 1.0 / 255.0  # contributions below this alpha are skipped (3DGS)
ALPHA_MAX = 0.99  # alpha cap: keeps 1 - alpha >= 0.01 so transmittance never reaches 0


def sh_to_color(sh: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Evaluate real SH of ``degree`` (0..3): ``sh [N, K, 3]`` (K >= (degree+1)^2), ``dirs [N, 3]`` unit.

    Returns the raw SH value ``[N, 3]`` (3DGS adds 0.5 and clamps at 0 afterwards, see ``colors``).
    """
    out = SH_C0 * sh[:, 0]
    if degree < 1:
        return out
    x, y, z = (dirs[:, i : i + 1] for i in range(3))  # [N, 1] each, broadcast over channels
    out = out - SH_C1 * y * sh[:, 1] + SH_C1 * z * sh[:, 2] - SH_C1 * x * sh[:, 3]
    if degree < 2:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (
        out
        + SH_C2[0] * xy * sh[:, 4]
        + SH_C2[1] * yz * sh[:, 5]
        + SH_C2[2] * (2.0 * zz - xx - yy) * sh[:, 6]
        + SH_C2[3] * xz * sh[:, 7]
        + SH_C2[4] * (xx - yy) * sh[:, 8]
    )
    if degree < 3:
        return out
    return (
        out
        + SH_C3[0] * y * (3.0 * xx - yy) * sh[:, 9]
        + SH_C3[1] * xy * z * sh[:, 10]
        + SH_C3[2] * y * (4.0 * zz - xx - yy) * sh[:, 11]
        + SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * sh[:, 12]
        + SH_C3[4] * x * (4.0 * zz - xx - yy) * sh[:, 13]
        + SH_C3[5] * z * (xx - yy) * sh[:, 14]
        + SH_C3[6] * x * (xx - 3.0 * yy) * sh[:, 15]
    )


def sh_degree_of(f_rest: torch.Tensor, sh_degree: int | None) -> int:
    """The SH degree to evaluate: ``sh_degree`` if given (checked against ``f_rest [N, K-1, 3]``), else all."""
    k = f_rest.shape[1] + 1
    stored = math.isqrt(k) - 1
    if (stored + 1) ** 2 != k or stored > 3:
        raise CompressKitError(
            f"f_rest has {k - 1} coefficients per channel; expected (degree+1)^2 - 1 with degree 0..3 (0, 3, 8, 15)"
        )
    if sh_degree is None:
        return stored
    if not 0 <= sh_degree <= stored:
        raise CompressKitError(f"sh_degree={sh_degree} asked for, but the scene stores SH up to degree {stored}")
    return sh_degree


def colors(means: torch.Tensor, f_dc: torch.Tensor, f_rest: torch.Tensor, center: torch.Tensor, degree: int):
    """View-dependent RGB ``[N, 3]``: ``clamp(SH(normalise(mean - camera centre)) + 0.5, min=0)``."""
    sh = torch.cat([f_dc[:, None, :], f_rest[:, : (degree + 1) ** 2 - 1]], dim=1)  # [N, K, 3]
    dirs = torch.nn.functional.normalize(means - center, dim=-1) if degree > 0 else means
    return (sh_to_color(sh, dirs, degree) + 0.5).clamp(min=0.0)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[N, 3, 3]`` from unnormalised ``wxyz`` quaternions ``[N, 4]``."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariances(quats: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """World-space covariances ``R S S^T R^T``, ``[N, 3, 3]``, from ``quats [N, 4]`` and ``log_scales [N, 3]``."""
    m = quat_to_rotmat(quats) * torch.exp(log_scales)[:, None, :]  # [N, 3, 3] = R S
    return m @ m.transpose(-1, -2)


@dataclass
class Splats:
    """The visible Gaussians of one view, projected; ``M`` of them (``ids`` index the scene's ``N``).

    ids: ``[M]`` long. means2d: ``[M, 2]`` pixels. conics: ``[M, 3]`` = (a, b, c) of the inverse 2D
    covariance ``[[a, b], [b, c]]`` in 1/pixels^2. opacities: ``[M]`` in (0, 1). colors: ``[M, 3]``.
    depths: ``[M]`` camera-space z. extents: ``[M, 2]`` half-size in pixels (x, y) of the box outside
    which alpha < 1/255.
    """

    ids: torch.Tensor
    means2d: torch.Tensor
    conics: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    depths: torch.Tensor
    extents: torch.Tensor


def project(gaussians, camera, sh_degree: int | None = None) -> Splats:
    """EWA-project ``gaussians`` (attributes per ``docs/gaussians.md``) into ``camera``; cull what is not seen.

    Culled: camera-space z < 0.01, opacity < 1/255, or a box (see ``Splats.extents``) entirely off screen.
    Culling happens *before* the perspective divide so culled Gaussians never produce inf/NaN gradients.
    """
    degree = sh_degree_of(gaussians.f_rest, sh_degree)
    means = gaussians.means
    w2c = camera.world_to_camera.to(means)
    rot, trans = w2c[:3, :3], w2c[:3, 3]
    with torch.no_grad():
        front = torch.nonzero((means @ rot[2] + trans[2]) > NEAR_PLANE).squeeze(1)
    means = means[front]
    opac = torch.sigmoid(gaussians.opacities[front])
    cam = means @ rot.T + trans  # [M, 3]
    tx, ty, tz = cam.unbind(-1)
    cov_cam = rot @ covariances(gaussians.quats[front], gaussians.scales[front]) @ rot.T  # [M, 3, 3]
    # Jacobian of the perspective map at the mean. Like 3DGS / gsplat, x/z and y/z are clamped to 1.3x
    # the frustum so splats far off screen do not get absurdly stretched footprints.
    tan_x, tan_y = 0.5 * camera.width / camera.fx, 0.5 * camera.height / camera.fy
    ux = (tx / tz).clamp(-camera.cx / camera.fx - 0.3 * tan_x, (camera.width - camera.cx) / camera.fx + 0.3 * tan_x)
    uy = (ty / tz).clamp(-camera.cy / camera.fy - 0.3 * tan_y, (camera.height - camera.cy) / camera.fy + 0.3 * tan_y)
    zero = torch.zeros_like(tz)
    jac = torch.stack(
        [camera.fx / tz, zero, -camera.fx * ux / tz, zero, camera.fy / tz, -camera.fy * uy / tz], dim=-1
    ).reshape(-1, 2, 3)
    cov2d = jac @ cov_cam @ jac.transpose(-1, -2)  # [M, 2, 2]
    var_x = cov2d[:, 0, 0] + LOW_PASS
    var_y = cov2d[:, 1, 1] + LOW_PASS
    cov_xy = 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0])
    det = (var_x * var_y - cov_xy * cov_xy).clamp(min=1e-12)
    conics = torch.stack([var_y / det, -cov_xy / det, var_x / det], dim=-1)
    means2d = torch.stack([camera.fx * tx / tz + camera.cx, camera.fy * ty / tz + camera.cy], dim=-1)
    with torch.no_grad():
        # alpha = o * exp(-q/2) >= 1/255  <=>  q <= 2 ln(255 o); the ellipse q = level has the axis-aligned
        # half-extents sqrt(level * var). At o = 1 this is 3.33 sigma, gsplat's radius.
        level = 2.0 * torch.log((opac / ALPHA_MIN).clamp(min=1.0))
        extents = torch.stack([torch.sqrt(level * var_x), torch.sqrt(level * var_y)], dim=-1)
        lo, hi = means2d - extents, means2d + extents
        keep = (level > 0) & (hi[:, 0] > 0) & (hi[:, 1] > 0) & (lo[:, 0] < camera.width) & (lo[:, 1] < camera.height)
        keep = torch.nonzero(keep).squeeze(1)
    center = -rot.T @ trans  # the camera centre, in the scene's dtype (float64 scenes stay float64)
    rgb = colors(means[keep], gaussians.f_dc[front][keep], gaussians.f_rest[front][keep], center, degree)
    return Splats(
        ids=front[keep],
        means2d=means2d[keep],
        conics=conics[keep],
        opacities=opac[keep],
        colors=rgb,
        depths=tz[keep].detach(),
        extents=extents[keep],
    )
