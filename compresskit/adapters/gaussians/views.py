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
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from compresskit.adapters.gaussians.camera import Camera, orbit_cameras
from compresskit.errors import CompressKitError

HOLD_EVERY = 8  # 3DGS's llffhold
ORBIT_SIZE = 128  # pixels of an orbit camera's image


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


@dataclass(frozen=True)
class Views:
    """Calibration and evaluation cameras (disjoint), and where they came from. ``images``: the
    ground-truth image file of every calibration camera, then every evaluation camera, when a
    ``cameras.json``'s dataset has them all (else empty, and ``images_note`` says why)."""

    calibration: tuple[Camera, ...]
    evaluation: tuple[Camera, ...]
    source: str  # "cameras.json: PATH", "scene json: PATH" or "orbit"
    images: tuple[Path, ...] = ()
    images_note: str = "the cameras come from no 3DGS cameras.json, so there are no training images to find"


def scene_views(ply: Path | None, means: torch.Tensor, size: int = 0) -> Views:
    """The :class:`Views` of the scene read from ``ply`` (``None``: no file to look beside) whose
    Gaussians sit at ``means [N, 3]``, images at most ``size`` pixels on the longer side (0: the
    cameras' own size; an orbit's is ORBIT_SIZE)."""
    if ply is not None:
        found = _find_cameras_json(ply)
        if found is not None:
            entries = _read_json(found)
            cams = [fit_camera(c, size) for c in cameras_from_json(entries, found)]
            if len(cams) < 2:
                raise CompressKitError(f"{found}: needs at least 2 cameras to keep calibration and evaluation apart, has {len(cams)}")
            held = [c for i, c in enumerate(cams) if i % HOLD_EVERY == 0]
            train = [c for i, c in enumerate(cams) if i % HOLD_EVERY != 0]
            files, note = training_images(found, entries)
            if files:
                files = [f for i, f in enumerate(files) if i % HOLD_EVERY != 0] + [f for i, f in enumerate(files) if i % HOLD_EVERY == 0]
            return Views(tuple(train), tuple(held), f"cameras.json: {found}", tuple(files), note)
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
    return cameras_from_json(_read_json(path), path)


def cameras_from_json(entries, path: Path) -> list[Camera]:
    """The cameras of the parsed ``cameras.json`` at ``path`` (named in errors)."""
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


def training_images(cameras_json: Path, entries: list) -> tuple[list[Path], str]:
    """``(the image file of each camera of cameras_json, in its order; "")``, found through the
    ``cfg_args`` beside it (see the module docstring), or ``([], why not)``; ``entries``: the file, parsed."""
    cfg = cameras_json.parent / "cfg_args"
    if not cfg.is_file():
        return [], f"no cfg_args beside {cameras_json} names the dataset the scene was trained on"
    text = cfg.read_text(encoding="utf-8", errors="replace")
    source = re.search(r"source_path=(['\"])(.*?)\1", text)
    if source is None:
        return [], f"{cfg} names no source_path"
    if re.search(r"white_background=True", text):
        return [], f"{cfg}: the scene was trained on a white background, and renders here have a black one"
    folder = re.search(r"\bimages=(['\"])(.*?)\1", text)
    root = Path(source.group(2)).expanduser()
    if not root.is_absolute():
        root = cameras_json.parent / root
    root = root / (folder.group(2) if folder else "images")
    files = []
    for i, e in enumerate(entries):
        name = e.get("img_name") if isinstance(e, dict) else None
        if not isinstance(name, str):
            return [], f"{cameras_json}: camera {i} has no img_name"
        found = next((root / (name + s) for s in ("", *IMAGE_SUFFIXES) if (root / (name + s)).is_file()), None)
        if found is None:
            return [], f"no image {name}.* in {root} (the training images of {cameras_json})"
        files.append(found)
    return files, ""


def read_image(path: Path, camera: Camera) -> torch.Tensor:
    """The image file at ``path`` as ``camera`` sees it: float32 ``[3, H, W]`` in [0, 1] at the camera's
    size (bicubic resampling, as 3DGS resizes its training images); an alpha channel is composited
    over black, the renders' background."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGBA").resize((camera.width, camera.height), Image.Resampling.BICUBIC)
            rgba = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)  # [H, W, 4]
    except (OSError, ValueError) as err:
        raise CompressKitError(f"{path}: cannot read it as an image ({' '.join(str(err).split())})") from None
    return (rgba[..., :3] * rgba[..., 3:]).permute(2, 0, 1).contiguous()


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
