"""Which cameras a scene is calibrated and evaluated from, kept apart.

A scene file holds no cameras, so they come from, in this order:

1. ``cameras.json`` as the original 3DGS writes it into its output directory (``model/cameras.json``
   beside ``model/point_cloud/iteration_N/point_cloud.ply``; looked for next to the ``.ply`` and up
   to three directories above): one entry per training image with ``width``, ``height``,
   ``position`` (the camera centre), ``rotation`` (camera-to-world ``[3][3]``, columns the camera's
   axes), ``fx``, ``fy``. Every 8th camera is held out for evaluation, as 3DGS's ``--eval`` does
   (``llffhold = 8``); the others calibrate.
2. A JSON next to the ``.ply`` (``scene.json`` for ``scene.ply``) with ``"cameras"`` as
   ``bench/make_ref_scene.py`` writes it: a ``train`` and a ``heldout`` rig of ``orbit_cameras``
   arguments (the held-out rig shares no camera with the training one).
3. Otherwise two interleaved orbits around the scene's bulk (the median of the means, radius from
   the 90th percentile of the distances), one to calibrate and one, at other angles, to evaluate.

Images are rendered at most ``size`` pixels on the longer side (the intrinsics scale with them), so
evaluation on CPU stays affordable for a big scene.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from compresskit.adapters.gaussians.camera import Camera, orbit_cameras
from compresskit.errors import CompressKitError

HOLD_EVERY = 8  # 3DGS's llffhold
ORBIT_SIZE = 128  # pixels of an orbit camera's image


@dataclass(frozen=True)
class Views:
    """Calibration and evaluation cameras (disjoint), and where they came from."""

    calibration: tuple[Camera, ...]
    evaluation: tuple[Camera, ...]
    source: str  # "cameras.json: PATH", "scene json: PATH" or "orbit"


def scene_views(ply: Path | None, means: torch.Tensor, size: int = 0) -> Views:
    """The :class:`Views` of the scene read from ``ply`` (``None``: no file to look beside) whose
    Gaussians sit at ``means [N, 3]``, images at most ``size`` pixels on the longer side (0: the
    cameras' own size; an orbit's is ORBIT_SIZE)."""
    if ply is not None:
        found = _find_cameras_json(ply)
        if found is not None:
            cams = [fit_camera(c, size) for c in read_cameras_json(found)]
            if len(cams) < 2:
                raise CompressKitError(f"{found}: needs at least 2 cameras to keep calibration and evaluation apart, has {len(cams)}")
            held = [c for i, c in enumerate(cams) if i % HOLD_EVERY == 0]
            train = [c for i, c in enumerate(cams) if i % HOLD_EVERY != 0]
            return Views(tuple(train), tuple(held), f"cameras.json: {found}")
        sidecar = ply.with_suffix(".json")
        if sidecar.is_file():
            config = _read_json(sidecar)
            if isinstance(config, dict) and isinstance(config.get("cameras"), dict):
                return _from_orbit_record(config["cameras"], sidecar, size)
    return orbit_views(means, size)


def orbit_views(means: torch.Tensor, size: int = 0, n_calibration: int = 24, n_evaluation: int = 8) -> Views:
    """Two orbits around the bulk of ``means``: ``n_calibration`` cameras on a spiral and
    ``n_evaluation`` on a ring at elevations the spiral does not use."""
    centre = means.detach().float().median(dim=0).values
    spread = float((means.detach().float() - centre).norm(dim=1).quantile(0.9))
    radius = 2.5 * max(spread, 1e-3)
    target = centre.tolist()
    size = size or ORBIT_SIZE
    calib = orbit_cameras(n_calibration, radius, None, target, 50.0, size, size)
    held = orbit_cameras(n_evaluation, radius, [20.0, 50.0], target, 50.0, size, size)
    return Views(tuple(calib), tuple(held), "orbit")


def read_cameras_json(path: Path) -> list[Camera]:
    """The cameras of a 3DGS ``cameras.json`` (see the module docstring)."""
    entries = _read_json(path)
    if not isinstance(entries, list) or not entries:
        raise CompressKitError(f"{path}: a 3DGS cameras.json is a non-empty list of cameras")
    cams = []
    for i, e in enumerate(entries):
        try:
            w, h, fx, fy = int(e["width"]), int(e["height"]), float(e["fx"]), float(e["fy"])
            c2w_rot = torch.tensor(e["rotation"], dtype=torch.float64).reshape(3, 3)
            centre = torch.tensor(e["position"], dtype=torch.float64).reshape(3)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise CompressKitError(f"{path}: camera {i} needs width, height, fx, fy, position [3] and rotation [3][3]") from None
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3] = c2w_rot.T
        w2c[:3, 3] = -c2w_rot.T @ centre
        cams.append(Camera(w2c.float(), fx, fy, w / 2, h / 2, w, h))
    return cams


def _find_cameras_json(ply: Path) -> Path | None:
    for directory in [ply.parent, *list(ply.parent.parents)[:3]]:
        candidate = directory / "cameras.json"
        if candidate.is_file():
            return candidate
    return None


def _from_orbit_record(record: dict, path: Path, size: int) -> Views:
    """``{"train": {orbit_cameras kwargs}, "heldout": {...}}``, as ``bench/make_ref_scene.py`` writes."""
    rigs = []
    for rig in ("train", "heldout"):
        kwargs = record.get(rig)
        if not isinstance(kwargs, dict):
            raise CompressKitError(f"{path}: 'cameras' needs 'train' and 'heldout' rigs of orbit_cameras arguments")
        try:
            rigs.append([fit_camera(c, size) for c in orbit_cameras(**kwargs)])
        except TypeError as err:
            raise CompressKitError(f"{path}: the {rig!r} camera rig is not orbit_cameras arguments ({err})") from None
    return Views(tuple(rigs[0]), tuple(rigs[1]), f"scene json: {path}")


def fit_camera(camera: Camera, size: int) -> Camera:
    """``camera`` with its image at most ``size`` pixels on the longer side (intrinsics scaled)."""
    longest = max(camera.width, camera.height)
    if size <= 0 or longest <= size:
        return camera
    s = size / longest
    w, h = max(1, round(camera.width * s)), max(1, round(camera.height * s))
    return replace(camera, fx=camera.fx * w / camera.width, fy=camera.fy * h / camera.height,
                   cx=camera.cx * w / camera.width, cy=camera.cy * h / camera.height, width=w, height=h)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CompressKitError(f"{path}: cannot read it as JSON ({' '.join(str(err).split())})") from None
