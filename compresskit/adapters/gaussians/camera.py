"""Pinhole cameras for the 3DGS renderer, in the OpenCV convention gsplat's ``viewmats`` use.

Camera space: x right, y down, z forward (into the scene). Pixel ``(i, j)`` (column, row) has its centre at
``(i + 0.5, j + 0.5)``, so a point on the optical axis lands at ``(cx, cy)`` and ``cx = width / 2`` is the
middle of the image, as in gsplat. ``look_at`` and ``orbit_cameras`` take the world's up axis as ``+z``
unless told otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from compresskit.errors import CompressKitError


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: extrinsics as a world-to-camera matrix, intrinsics in pixels.

    world_to_camera: ``[4, 4]`` float; ``x_cam = R @ x_world + t`` with ``R = [:3, :3]``, ``t = [:3, 3]``.
    fx, fy: focal lengths in pixels. cx, cy: principal point in pixels (image centre is ``width / 2``).
    width, height: image size in pixels.
    """

    world_to_camera: torch.Tensor
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self):
        if tuple(self.world_to_camera.shape) != (4, 4):
            raise CompressKitError(
                f"Camera.world_to_camera must be a [4, 4] matrix, got shape {tuple(self.world_to_camera.shape)}"
            )
        if self.width <= 0 or self.height <= 0 or self.fx <= 0 or self.fy <= 0:
            raise CompressKitError(
                f"Camera needs positive width, height, fx and fy, got {self.width}x{self.height}, "
                f"fx={self.fx}, fy={self.fy}"
            )

    @property
    def center(self) -> torch.Tensor:
        """The camera's position in world coordinates, ``[3]`` (``-R^T t``)."""
        rot, trans = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -rot.T @ trans

    @property
    def K(self) -> torch.Tensor:
        """The ``[3, 3]`` intrinsics matrix, in the dtype and device of ``world_to_camera``."""
        w2c = self.world_to_camera
        return torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=w2c.dtype, device=w2c.device
        )

    @classmethod
    def look_at(
        cls,
        eye: Sequence[float],
        target: Sequence[float],
        up: Sequence[float] = (0.0, 0.0, 1.0),
        fov_deg: float = 50.0,
        width: int = 64,
        height: int = 64,
    ) -> "Camera":
        """A camera at ``eye`` looking at ``target``, with ``up`` pointing up in the image (float32).

        fov_deg: field of view across the image *width*, in degrees; ``fx = fy`` (square pixels).
        """
        eye_t = torch.as_tensor(eye, dtype=torch.float64)
        forward = torch.as_tensor(target, dtype=torch.float64) - eye_t
        if forward.norm() < 1e-12:
            raise CompressKitError("Camera.look_at needs eye and target at different points")
        forward = forward / forward.norm()
        # OpenCV: x = forward x up points right, y = forward x right points down (z forward).
        right = torch.linalg.cross(forward, torch.as_tensor(up, dtype=torch.float64))
        if right.norm() < 1e-9:
            raise CompressKitError("Camera.look_at: up is parallel to the viewing direction; pass another up vector")
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        cam_to_world_rot = torch.stack([right, down, forward], dim=1)  # [3, 3], columns are camera axes
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3] = cam_to_world_rot.T
        w2c[:3, 3] = -cam_to_world_rot.T @ eye_t
        if not 0.0 < fov_deg < 180.0:
            raise CompressKitError(f"Camera.look_at needs 0 < fov_deg < 180, got {fov_deg}")
        focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
        return cls(w2c.float(), focal, focal, width / 2, height / 2, int(width), int(height))


def orbit_cameras(
    n: int,
    radius: float,
    elevations_deg: float | Sequence[float] | None = None,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    fov_deg: float = 50.0,
    width: int = 64,
    height: int = 64,
    up: Sequence[float] = (0.0, 0.0, 1.0),
    elevation_range_deg: tuple[float, float] = (5.0, 75.0),
) -> list[Camera]:
    """``n`` cameras on a sphere of ``radius`` around ``target``, all looking at it; deterministic.

    elevations_deg None: a Fibonacci spiral over the band ``elevation_range_deg`` of the upper hemisphere
    (equal area per camera, golden-angle azimuths), so neighbours in the list look from far-apart places
    and every k-th camera is a fair held-out set. A number or a list: camera ``i`` sits at azimuth
    ``360 i / n`` and elevation ``elevations_deg[i % len]`` (rings that interleave).
    Elevation is the angle above the plane through ``target`` normal to ``up``, in degrees.
    """
    if n <= 0 or radius <= 0:
        raise CompressKitError(f"orbit_cameras needs n > 0 and radius > 0, got n={n}, radius={radius}")
    up_t = torch.as_tensor(up, dtype=torch.float64)
    up_t = up_t / up_t.norm()
    # Two axes spanning the horizontal plane, so azimuth 0 is a fixed, reproducible direction.
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    if abs(float(helper @ up_t)) > 0.9:
        helper = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    ax = helper - (helper @ up_t) * up_t
    ax = ax / ax.norm()
    ay = torch.linalg.cross(up_t, ax)
    if elevations_deg is None:
        lo, hi = (math.sin(math.radians(e)) for e in elevation_range_deg)
        golden = math.pi * (3.0 - math.sqrt(5.0))
        angles = [(math.asin(lo + (hi - lo) * (i + 0.5) / n), golden * i) for i in range(n)]
    else:
        elevs = [float(elevations_deg)] if isinstance(elevations_deg, (int, float)) else list(elevations_deg)
        if not elevs or any(abs(e) >= 90.0 for e in elevs):
            raise CompressKitError("orbit_cameras: elevations_deg must be strictly between -90 and 90 degrees")
        angles = [(math.radians(elevs[i % len(elevs)]), 2 * math.pi * i / n) for i in range(n)]
    center = torch.as_tensor(target, dtype=torch.float64)
    cams = []
    for elev, azim in angles:
        offset = math.cos(elev) * (math.cos(azim) * ax + math.sin(azim) * ay) + math.sin(elev) * up_t
        eye = center + radius * offset
        cams.append(Camera.look_at(eye.tolist(), center.tolist(), up_t.tolist(), fov_deg, width, height))
    return cams
