"""A textured procedural object with an exact ground-truth renderer: the target the reference scene is fitted to.

3DGS is normally fitted to photographs; offline we have none, so ``bench/make_ref_scene.py`` fits Gaussians to
renders of a small analytic object instead. Because the object is analytic, every view has an exact ground
truth (no Gaussians involved): rays are cast through each pixel and intersected with the shapes in closed form.

The object (world coordinates, **z up**, everything inside a ball of radius :data:`BOUNDING_RADIUS` around the
origin):

* a sphere (centre ``(-0.2, 0, 0.1)``, radius 0.5) with a latitude / longitude checker (12 x 6 cells, polar
  axis z), red and cream, with a Blinn-Phong highlight (so the degree-3 SH have something view-dependent to learn);
* an oriented box (centre ``(0.45, 0.15, -0.15)``, half sizes ``(0.28, 0.28, 0.42)``, turned 30 degrees about z)
  with blue / yellow stripes (horizontal on its sides, across its top and bottom) and a weaker highlight.

Shading is ``albedo * (ambient + diffuse * max(n . l, 0)) + specular * max(n . h, 0) ** shininess`` from one
directional light, no shadows, clamped to [0, 1]; the background is black. Each pixel averages
``supersample ** 2`` rays on a regular sub-pixel grid, so edges are anti-aliased as in a photograph (a hard
edge would be a target no sum of Gaussians reaches).

Cameras are duck-typed to ``render.Camera`` (OpenCV convention: x right, y down, z forward; the attributes
``world_to_camera [4, 4]``, ``fx fy cx cy``, ``width height``). A pixel ``(u, v)`` covers
``[u, u + 1) x [v, v + 1)`` in the image coordinates ``fx * x / z + cx``; its centre is ``u + 0.5``.

:func:`sample_surface_points` draws visible surface points (area-uniform; points buried inside the other
shape are dropped) with their view-independent colour, to initialise Gaussians as 3DGS does from SfM points.
Everything is float32 and deterministic (seeded generators only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compresskit.errors import CompressKitError

BACKGROUND = (0.0, 0.0, 0.0)
BOUNDING_RADIUS = 1.0  # every surface point is within this distance of the origin
LIGHT_DIR = (0.45, -0.35, 0.82)  # towards the light (normalised where used)
AMBIENT, DIFFUSE = 0.25, 0.75
SUPERSAMPLE = 3  # rays per pixel along each axis

SPHERE_CENTRE, SPHERE_RADIUS = (-0.2, 0.0, 0.1), 0.5
SPHERE_CELLS = (12, 6)  # checker cells along longitude, latitude
SPHERE_COLOURS = ((0.85, 0.22, 0.15), (0.95, 0.88, 0.70))
SPHERE_SPECULAR, SPHERE_SHININESS = 0.45, 20.0

BOX_CENTRE, BOX_HALF = (0.45, 0.15, -0.15), (0.28, 0.28, 0.42)
BOX_YAW_DEG = 30.0  # about z
BOX_STRIPE_PERIOD = 0.2  # world units per blue + yellow pair
BOX_COLOURS = ((0.15, 0.35, 0.85), (0.95, 0.80, 0.20))
BOX_SPECULAR, BOX_SHININESS = 0.15, 12.0

_NO_HIT = float("inf")


def _vec(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _box_rotation() -> torch.Tensor:
    """Box frame -> world (columns are the box's axes), ``[3, 3]``."""
    a = math.radians(BOX_YAW_DEG)
    return _vec([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _light() -> torch.Tensor:
    light = _vec(LIGHT_DIR)
    return light / light.norm()


# ---- intersections: origins / directions [R, 3] -> distance [R] (inf: missed), normal [R, 3], albedo [R, 3] ----

def _hit_sphere(origins: torch.Tensor, dirs: torch.Tensor):
    centre = _vec(SPHERE_CENTRE)
    oc = origins - centre  # [R, 3]
    b = (oc * dirs).sum(-1)
    c = (oc * oc).sum(-1) - SPHERE_RADIUS**2
    disc = b * b - c
    root = disc.clamp(min=0).sqrt()
    t = torch.where(-b - root > 1e-6, -b - root, -b + root)  # the near root, the far one from inside
    t = torch.where((disc >= 0) & (t > 1e-6), t, torch.full_like(t, _NO_HIT))
    p = origins + dirs * t.clamp(max=1e6).unsqueeze(-1) - centre  # [R, 3], from the centre
    normal = p / SPHERE_RADIUS
    return t, normal, _sphere_albedo(normal)


def _sphere_albedo(normal: torch.Tensor) -> torch.Tensor:
    """Checker over (longitude, latitude) of unit vectors from the centre, ``[R, 3] -> [R, 3]``."""
    n_lon, n_lat = SPHERE_CELLS
    lon = torch.atan2(normal[:, 1], normal[:, 0]) + math.pi  # [0, 2 pi]
    lat = torch.acos(normal[:, 2].clamp(-1, 1))  # [0, pi]
    cell = torch.floor(lon * (n_lon / (2 * math.pi))) + torch.floor(lat * (n_lat / math.pi))
    odd = (cell.remainder(2) > 0.5).unsqueeze(-1)
    return torch.where(odd, _vec(SPHERE_COLOURS[1]), _vec(SPHERE_COLOURS[0]))


def _hit_box(origins: torch.Tensor, dirs: torch.Tensor):
    rot, centre, half = _box_rotation(), _vec(BOX_CENTRE), _vec(BOX_HALF)
    o, d = (origins - centre) @ rot, dirs @ rot  # [R, 3] in the box frame
    d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (-half - o) / d, (half - o) / d  # [R, 3] slab entries / exits
    t_in, axis = torch.minimum(t1, t2).max(-1)
    t_out = torch.maximum(t1, t2).min(-1).values
    t = torch.where((t_in <= t_out) & (t_in > 1e-6), t_in, torch.full_like(t_in, _NO_HIT))
    local = o + d * t.clamp(max=1e6).unsqueeze(-1)  # [R, 3]
    sign = -torch.sign(d.gather(1, axis.unsqueeze(1)))  # the face looks back at the ray
    normal = torch.zeros_like(local).scatter_(1, axis.unsqueeze(1), sign) @ rot.T
    return t, normal, _box_albedo(local, axis)


def _box_albedo(local: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Stripes along z on the sides, along x on the top and bottom (``axis`` 2), ``[R, 3]``."""
    coord = torch.where(axis == 2, local[:, 0], local[:, 2])
    odd = (torch.floor(coord / (BOX_STRIPE_PERIOD / 2)).remainder(2) > 0.5).unsqueeze(-1)
    return torch.where(odd, _vec(BOX_COLOURS[1]), _vec(BOX_COLOURS[0]))


def _diffuse(albedo: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    lambert = (normal @ _light()).clamp(min=0).unsqueeze(-1)
    return albedo * (AMBIENT + DIFFUSE * lambert)


def shade_rays(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """The colour seen along each ray (``dirs`` unit length), ``[R, 3] -> [R, 3]`` in [0, 1]; black where nothing is hit."""
    ts, ns, albedo = (torch.stack(x) for x in zip(_hit_sphere(origins, dirs), _hit_box(origins, dirs)))
    t, which = ts.min(0)  # [R]: the nearer shape
    pick = which.view(1, -1, 1).expand(1, -1, 3)
    normal, albedo = ns.gather(0, pick)[0], albedo.gather(0, pick)[0]  # [R, 3]
    half_vec = _light() - dirs
    half_vec = half_vec / half_vec.norm(dim=-1, keepdim=True)
    spec = torch.where(which == 0, SPHERE_SPECULAR, BOX_SPECULAR)
    shininess = torch.where(which == 0, SPHERE_SHININESS, BOX_SHININESS)
    lit = (normal @ _light()) > 0  # no highlight on the dark side
    highlight = spec * (normal * half_vec).sum(-1).clamp(min=0) ** shininess * lit
    colour = (_diffuse(albedo, normal) + highlight.unsqueeze(-1)).clamp(0, 1)
    return torch.where(torch.isfinite(t).unsqueeze(-1), colour, _vec(BACKGROUND))


def camera_rays(camera, offsets: tuple[float, float] = (0.5, 0.5)):
    """World-space origins and unit directions, ``[H * W, 3]`` each in row-major pixel order, through
    the point ``(u + offsets[0], v + offsets[1])`` of each pixel ``(u, v)``."""
    w2c = torch.as_tensor(camera.world_to_camera, dtype=torch.float64)
    if w2c.shape != (4, 4):
        raise CompressKitError(f"camera.world_to_camera must be [4, 4], got {tuple(w2c.shape)}")
    h, w = int(camera.height), int(camera.width)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x = (u.reshape(-1) + offsets[0] - float(camera.cx)) / float(camera.fx)
    y = (v.reshape(-1) + offsets[1] - float(camera.cy)) / float(camera.fy)
    d_cam = torch.stack([x, y, torch.ones_like(x)], -1)  # [H*W, 3]
    rot, trans = w2c[:3, :3], w2c[:3, 3]
    dirs = d_cam @ rot  # R^T d, row-wise
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origin = -(rot.T @ trans)
    return origin.expand_as(dirs).float(), dirs.float()


@torch.no_grad()
def render_ground_truth(camera, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """The exact image of the object seen by ``camera``: float32 ``[3, H, W]`` in [0, 1], black background,
    each pixel the mean of ``supersample ** 2`` rays on a regular grid inside it."""
    if supersample < 1:
        raise CompressKitError(f"supersample must be >= 1, got {supersample}")
    h, w = int(camera.height), int(camera.width)
    total = torch.zeros(h * w, 3)
    for i in range(supersample):
        for j in range(supersample):
            origins, dirs = camera_rays(camera, ((j + 0.5) / supersample, (i + 0.5) / supersample))
            total += shade_rays(origins, dirs)
    return (total / supersample**2).T.reshape(3, h, w).contiguous()


# ---- surface samples --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SurfaceSamples:
    points: torch.Tensor  # [N, 3] world coordinates, on the visible surface
    colours: torch.Tensor  # [N, 3] in [0, 1]: albedo under ambient + diffuse light (no highlight)
    normals: torch.Tensor  # [N, 3] unit, outwards


def _inside_sphere(p: torch.Tensor) -> torch.Tensor:
    return (p - _vec(SPHERE_CENTRE)).norm(dim=-1) < SPHERE_RADIUS - 1e-6


def _inside_box(p: torch.Tensor) -> torch.Tensor:
    local = (p - _vec(BOX_CENTRE)) @ _box_rotation()
    return (local.abs() < _vec(BOX_HALF) - 1e-6).all(-1)


def _sphere_samples(n: int, gen: torch.Generator):
    normal = torch.randn(n, 3, generator=gen)
    normal = normal / normal.norm(dim=-1, keepdim=True)
    return _vec(SPHERE_CENTRE) + SPHERE_RADIUS * normal, normal, _sphere_albedo(normal)


def _box_samples(n: int, gen: torch.Generator):
    half = _vec(BOX_HALF)
    face_area = torch.stack([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)  # [6]: -x -y -z, +x +y +z
    face = torch.multinomial(face_area, n, replacement=True, generator=gen)  # [n]
    axis, sign = face % 3, torch.where(face < 3, -1.0, 1.0)
    local = (torch.rand(n, 3, generator=gen) * 2 - 1) * half
    local.scatter_(1, axis.unsqueeze(1), (sign * half[axis]).unsqueeze(1))
    rot = _box_rotation()
    normal = torch.zeros(n, 3).scatter_(1, axis.unsqueeze(1), sign.unsqueeze(1)) @ rot.T
    return local @ rot.T + _vec(BOX_CENTRE), normal, _box_albedo(local, axis)


def surface_areas() -> tuple[float, float]:
    """The areas of the sphere and of the box (buried parts included)."""
    hx, hy, hz = BOX_HALF
    return 4 * math.pi * SPHERE_RADIUS**2, 8 * (hx * hy + hy * hz + hx * hz)


def sample_surface_points(n: int, seed: int = 0) -> SurfaceSamples:
    """``n`` points drawn uniformly by area over the object's visible surface (parts of one shape inside
    the other are not drawn), with their colour under the light without the highlight and their normal."""
    if n < 1:
        raise CompressKitError(f"n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    sphere_area, box_area = surface_areas()
    parts, have = [], 0
    while have < n:
        m = 2 * (n - have) + 16  # oversample: about a tenth of the drawn points are buried
        on_sphere = int((torch.rand(m, generator=gen) < sphere_area / (sphere_area + box_area)).sum())
        for (p, normal, albedo), buried in ((_sphere_samples(on_sphere, gen), _inside_box), (_box_samples(m - on_sphere, gen), _inside_sphere)):
            keep = ~buried(p)
            parts.append((p[keep], normal[keep], _diffuse(albedo[keep], normal[keep]).clamp(0, 1)))
            have += int(keep.sum())
    points, normals, colours = (torch.cat(x) for x in zip(*parts))
    order = torch.randperm(points.shape[0], generator=gen)[:n]  # mix the shapes, then keep n
    return SurfaceSamples(points=points[order], colours=colours[order], normals=normals[order])
