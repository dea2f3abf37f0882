"""The standard 3DGS ``.ply``: read it into plain float32 arrays, write it back bit for bit.

The layout is the one the original 3D Gaussian Splatting code writes (Kerbl et al., SIGGRAPH 2023,
``graphdeco-inria/gaussian-splatting``, ``GaussianModel.save_ply``): one ``vertex`` element, one
vertex per Gaussian, every property ``float`` (float32), ``binary_little_endian``, in this order::

    x y z  nx ny nz  f_dc_0..2  f_rest_0..M-1  opacity  scale_0..2  rot_0..3

``M = 3 (K - 1)`` with ``K = (degree + 1)^2`` SH coefficients per channel, so ``M`` is 0, 9, 24 or
45 for SH degree 0..3. ``f_rest`` is stored **channel-major**: ``f_rest_0..(K-2)`` are the red
channel's coefficients 1..K-1, then green, then blue; in memory it is ``[N, K - 1, 3]``,
coefficient-major with the channel last (``reshape(N, 3, K - 1).transpose(0, 2, 1)``). ``opacity``
is a logit, ``scale_*`` are log standard deviations, ``rot_*`` an unnormalised quaternion ``w x y z``;
``nx ny nz`` are unused (3DGS writes zeros, and so do we). See ``docs/gaussians.md``.

Reading accepts any property order, ascii or either binary byte order, no ``nx ny nz``, float64
properties (cast to float32) and extra properties (ignored). Anything else wrong with a file is one
:class:`CompressKitError` naming it. Writing is atomic: a temporary file next to the target is
renamed over it only once it is complete.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from compresskit.errors import CompressKitError
from compresskit.files import write_atomically
from compresskit.optional import require

_DEGREE_OF_REST = {0: 0, 9: 1, 24: 2, 45: 3}  # number of f_rest_* properties -> SH degree
_REST = re.compile(r"f_rest_\d+")
NORMALS = ("nx", "ny", "nz")
ATTRIBUTES = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")  # the fields of PlyGaussians


def property_names(sh_degree: int) -> list[str]:
    """The vertex properties of a degree-``sh_degree`` file, in the order 3DGS writes them."""
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return ["x", "y", "z", *NORMALS, "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(n_rest)),
            "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


@dataclass
class PlyGaussians:
    """A 3DGS scene as plain float32 numpy arrays, in the layout of ``docs/gaussians.md``.

    ``means [N, 3]`` world coordinates; ``f_dc [N, 3]`` SH coefficient 0 per channel (RGB);
    ``f_rest [N, K - 1, 3]`` SH coefficients 1..K-1, channel last (``[N, 0, 3]`` at degree 0);
    ``opacities [N]`` logits; ``scales [N, 3]`` log standard deviations; ``quats [N, 4]``
    unnormalised ``w x y z``. Floating arrays (or CPU tensors) are converted to contiguous float32.
    """

    means: np.ndarray  # [N, 3] float32
    f_dc: np.ndarray  # [N, 3] float32
    f_rest: np.ndarray  # [N, K - 1, 3] float32
    opacities: np.ndarray  # [N] float32
    scales: np.ndarray  # [N, 3] float32
    quats: np.ndarray  # [N, 4] float32

    def __post_init__(self):
        for f in fields(self):
            value = np.asarray(getattr(self, f.name))
            if value.dtype.kind != "f":
                raise CompressKitError(f"PlyGaussians.{f.name} must be a floating array, got dtype {value.dtype}")
            setattr(self, f.name, np.ascontiguousarray(value, dtype=np.float32))
        check_shapes("PlyGaussians", {f.name: getattr(self, f.name).shape for f in fields(self)})

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        """0..3, from the number of SH coefficients in ``f_rest``."""
        return _DEGREE_OF_REST[3 * self.f_rest.shape[1]]


def check_shapes(owner: str, shapes: Mapping[str, Sequence[int]]) -> int:
    """The SH degree of attributes with these ``shapes`` (``{"means": (N, 3), ...}``, the six of
    :class:`PlyGaussians`); one :class:`CompressKitError` naming ``owner.attribute`` if one is wrong."""
    n = shapes["means"][0] if len(shapes["means"]) else -1
    expected = {"means": (n, 3), "f_dc": (n, 3), "opacities": (n,), "scales": (n, 3), "quats": (n, 4)}
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CompressKitError(f"{owner}.{name} must have shape {list(shape)} (N = len(means)), got {list(shapes[name])}")
    rest = tuple(shapes["f_rest"])
    if len(rest) != 3 or rest[0] != n or rest[2] != 3 or 3 * rest[1] not in _DEGREE_OF_REST:
        raise CompressKitError(f"{owner}.f_rest must have shape [{n}, K - 1, 3] with K - 1 in 0, 3, 8, 15 "
                               f"(SH degree 0-3), got {list(rest)}")
    return _DEGREE_OF_REST[3 * rest[1]]


def read_ply(path: str | os.PathLike) -> PlyGaussians:
    """Read a 3DGS ``.ply`` (see the module docstring); one :class:`CompressKitError` if it is not one."""
    plyfile = require("plyfile", "gaussians", "3DGS .ply files")
    path = Path(path)
    try:
        ply = plyfile.PlyData.read(str(path))
    except FileNotFoundError:
        raise CompressKitError(f"{path}: no such file") from None
    except OSError as e:
        raise CompressKitError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (plyfile.PlyParseError, ValueError, UnicodeDecodeError) as e:
        raise CompressKitError(f"{path}: not a readable .ply file ({_one_line(e)})") from None

    elements = [el.name for el in ply.elements]
    if "vertex" not in elements:
        raise CompressKitError(f"{path}: no 'vertex' element (it has {', '.join(elements) or 'none'}); "
                               "a 3DGS .ply stores one vertex per Gaussian")
    vertex = ply["vertex"]
    props = {p.name: p for p in vertex.properties}
    n_rest = sum(1 for name in props if _REST.fullmatch(name))
    if n_rest not in _DEGREE_OF_REST:
        raise CompressKitError(f"{path}: {n_rest} f_rest_* properties is no SH degree "
                               "(a 3DGS file has 0, 9, 24 or 45 for degree 0-3)")
    degree = _DEGREE_OF_REST[n_rest]
    required = [name for name in property_names(degree) if name not in NORMALS]
    missing = [name for name in required if name not in props]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        rest = f" f_rest_0..{n_rest - 1}" if n_rest else ""
        raise CompressKitError(f"{path}: missing vertex properties {', '.join(missing[:5])}{more}; a degree-{degree} "
                               f"3DGS .ply has x y z f_dc_0..2{rest} opacity scale_0..2 rot_0..3")
    not_float = [name for name in required
                 if isinstance(props[name], plyfile.PlyListProperty) or np.dtype(props[name].val_dtype).kind != "f"]
    if not_float:
        found = ", ".join(str(props[name]).removeprefix("property ") for name in not_float[:3])
        raise CompressKitError(f"{path}: vertex properties must be float, but found {found}")
    if vertex.count == 0:
        raise CompressKitError(f"{path}: the vertex element is empty (no Gaussians)")

    table = vertex.data  # structured [N] (memory-mapped for binary files): every column is copied out
    n = vertex.count

    def cols(names):  # [N, len(names)] float32, a copy
        return np.stack([np.asarray(table[name], dtype=np.float32) for name in names], axis=1)

    rest = [f"f_rest_{i}" for i in range(n_rest)]
    f_rest = cols(rest).reshape(n, 3, n_rest // 3).transpose(0, 2, 1) if rest else np.zeros((n, 0, 3), np.float32)
    data = PlyGaussians(
        means=cols(["x", "y", "z"]),
        f_dc=cols(["f_dc_0", "f_dc_1", "f_dc_2"]),
        f_rest=f_rest,  # channel-major on disk -> [N, K - 1, 3]
        opacities=np.array(table["opacity"], dtype=np.float32),
        scales=cols(["scale_0", "scale_1", "scale_2"]),
        quats=cols(["rot_0", "rot_1", "rot_2", "rot_3"]),
    )
    bad = _nonfinite(data)
    if bad:
        raise CompressKitError(f"{path}: {bad}")
    return data


def write_ply(path: str | os.PathLike, data: PlyGaussians, overwrite: bool = False) -> Path:
    """Write ``data`` as a standard 3DGS ``.ply`` (binary little-endian float32, 3DGS property order).

    Refuses an existing ``path`` unless ``overwrite``; the file appears complete or not at all.
    Returns the path written.
    """
    plyfile = require("plyfile", "gaussians", "3DGS .ply files")
    path = Path(path)
    if not isinstance(data, PlyGaussians):
        raise CompressKitError(f"cannot write {path}: expected PlyGaussians, got {type(data).__name__}")
    if path.is_dir():
        raise CompressKitError(f"cannot write {path}: it is a directory")
    if path.exists() and not overwrite:
        raise CompressKitError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise CompressKitError(f"cannot write {path}: the directory {path.parent} does not exist")
    if data.num_gaussians == 0:
        raise CompressKitError(f"cannot write {path}: the scene has no Gaussians")
    bad = _nonfinite(data)
    if bad:
        raise CompressKitError(f"cannot write {path}: {bad}")

    n = data.num_gaussians
    rest = data.f_rest.transpose(0, 2, 1).reshape(n, -1)  # [N, 3 (K - 1)], channel-major as 3DGS stores it
    columns = [data.means, np.zeros((n, 3), np.float32), data.f_dc, rest, data.opacities[:, None], data.scales, data.quats]
    rows = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype="<f4")  # [N, P]
    vertex = rows.view(np.dtype([(name, "<f4") for name in property_names(data.sh_degree)])).reshape(n)
    ply = plyfile.PlyData([plyfile.PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")

    try:
        write_atomically(path, ply.write)
    except OSError as e:
        raise CompressKitError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def _nonfinite(data: PlyGaussians) -> str | None:
    """A one-line description of the first field holding NaN or inf, or None."""
    if data.num_gaussians == 0:
        return None
    for f in fields(data):
        values = getattr(data, f.name).reshape(data.num_gaussians, -1)  # [N, D]
        bad_rows = ~np.isfinite(values).all(axis=1)  # [N] bool
        if bad_rows.any():
            return (f"{f.name} has NaN or inf in {int(bad_rows.sum())} of {data.num_gaussians} Gaussians "
                    f"(the first is Gaussian {int(bad_rows.argmax())})")
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
