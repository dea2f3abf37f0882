"""The 3DGS .ply reader / writer: bit-exact round trips, the on-disk layout 3DGS writes, the
channel-major f_rest, lenient reading, one clear error per broken file, and atomic writes."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

plyfile = pytest.importorskip("plyfile")

from compresskit.adapters.gaussians import ply as gs_ply  # noqa: E402
from compresskit.adapters.gaussians.ply import PlyGaussians, read_ply, write_ply  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

FIELDS = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")


def tiny(degree: int, n: int = 40, seed: int = 0) -> PlyGaussians:
    """Random Gaussians with a few awkward float32 values (-0, a denormal, the largest float)."""
    rng = np.random.default_rng(seed)
    k = (degree + 1) ** 2
    data = PlyGaussians(
        means=rng.standard_normal((n, 3)) * 10,
        f_dc=rng.standard_normal((n, 3)),
        f_rest=rng.standard_normal((n, k - 1, 3)) * 0.1,
        opacities=rng.standard_normal(n) * 3,
        scales=rng.standard_normal((n, 3)) - 4,
        quats=rng.standard_normal((n, 4)),
    )
    if n:
        data.means[0] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max]
    return data


def assert_bit_equal(a: PlyGaussians, b: PlyGaussians):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == np.float32, name
        assert x.shape == y.shape, name
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), name


def raw_ply(path, columns: dict, text=False, byte_order="<", element="vertex"):
    """Write a .ply straight with plyfile: ``columns`` is ``{property: values [N]}``, in that order."""
    n = len(next(iter(columns.values())))
    table = np.empty(n, dtype=[(name, np.asarray(v).dtype) for name, v in columns.items()])
    for name, values in columns.items():
        table[name] = values
    plyfile.PlyData([plyfile.PlyElement.describe(table, element)], text=text, byte_order=byte_order).write(str(path))
    return path


def columns_3dgs(degree: int, n: int = 4, drop=(), seed: int = 1) -> dict:
    """Every property of a degree-``degree`` 3DGS file, random float32 values."""
    rng = np.random.default_rng(seed)
    m = 3 * ((degree + 1) ** 2 - 1)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(m)),
             "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return {name: rng.standard_normal(n).astype(np.float32) for name in names if name not in drop}


# ---- round trip and layout -------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_round_trip_is_bit_exact(tmp_path, degree):
    data = tiny(degree)
    write_ply(tmp_path / "scene.ply", data)
    back = read_ply(tmp_path / "scene.ply")
    assert back.sh_degree == data.sh_degree == degree
    assert back.f_rest.shape == (40, (degree + 1) ** 2 - 1, 3)
    assert_bit_equal(back, data)


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_the_file_is_3dgs_binary_little_endian_float32_in_3dgs_order(tmp_path, degree):
    data = tiny(degree, n=7)
    path = write_ply(tmp_path / "scene.ply", data)
    m = 3 * ((degree + 1) ** 2 - 1)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(m)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 7\n"
    header += "".join(f"property float {name}\n" for name in names) + "end_header\n"
    raw = path.read_bytes()
    assert raw[: len(header)] == header.encode("ascii")
    # the body, built by hand: f_rest_j is channel j // (K-1), coefficient 1 + j % (K-1)
    rest = [data.f_rest[:, k, c] for c in range(3) for k in range(data.f_rest.shape[1])]
    cols = [*data.means.T, *np.zeros((3, 7)), *data.f_dc.T, *rest, data.opacities, *data.scales.T, *data.quats.T]
    assert raw[len(header):] == np.stack(cols, axis=1).astype("<f4").tobytes()


def test_f_rest_on_disk_is_red_then_green_then_blue(tmp_path):
    cols = columns_3dgs(degree=2, n=3)
    for j in range(24):  # value = 100 * row + j: f_rest_0..7 red, 8..15 green, 16..23 blue
        cols[f"f_rest_{j}"] = (100 * np.arange(3) + j).astype(np.float32)
    data = read_ply(raw_ply(tmp_path / "known.ply", cols))
    assert data.sh_degree == 2 and data.f_rest.shape == (3, 8, 3)
    np.testing.assert_array_equal(data.f_rest[0, :, 0], np.arange(8))  # red: f_rest_0..7
    np.testing.assert_array_equal(data.f_rest[0, :, 1], np.arange(8, 16))  # green
    np.testing.assert_array_equal(data.f_rest[2, :, 2], 200 + np.arange(16, 24))  # blue, row 2
    np.testing.assert_array_equal(data.f_dc, np.stack([cols["f_dc_0"], cols["f_dc_1"], cols["f_dc_2"]], 1))
    np.testing.assert_array_equal(data.quats[:, 0], cols["rot_0"])  # w first, as stored
    np.testing.assert_array_equal(data.opacities, cols["opacity"])


@pytest.mark.parametrize("text,byte_order", [(True, "="), (False, ">")])
def test_reads_any_order_ascii_or_big_endian_without_normals_and_with_extras(tmp_path, text, byte_order):
    cols = columns_3dgs(degree=1, n=5, drop=("nx", "ny", "nz"))
    shuffled = dict(reversed(list(cols.items())))
    shuffled["red"] = np.arange(5, dtype=np.uint8)  # extra properties (a viewer's colour) are ignored
    data = read_ply(raw_ply(tmp_path / "odd.ply", shuffled, text=text, byte_order=byte_order))
    reference = read_ply(raw_ply(tmp_path / "plain.ply", cols))
    assert_bit_equal(data, reference)
    np.testing.assert_array_equal(data.means[:, 2], cols["z"])
    np.testing.assert_array_equal(data.f_rest[:, 2, 1], cols["f_rest_5"])  # green, coefficient 3


def test_double_properties_are_read_as_float32(tmp_path):
    cols = {name: values.astype(np.float64) for name, values in columns_3dgs(degree=0).items()}
    data = read_ply(raw_ply(tmp_path / "double.ply", cols))
    assert data.scales.dtype == np.float32
    np.testing.assert_array_equal(data.scales[:, 1], cols["scale_1"].astype(np.float32))


# ---- broken files ----------------------------------------------------------------------------------
def _garbage(path):
    path.write_text("this is not a ply file\n")


def _truncated(path):
    write_ply(path, tiny(1, n=5))
    path.write_bytes(path.read_bytes()[:-10])


def _columns(degree=1, drop=(), **change):
    def make(path):
        cols = columns_3dgs(degree, drop=drop)
        for name, values in change.items():
            cols[name] = values
        raw_ply(path, cols)
    return make


def _no_vertex(path):
    raw_ply(path, columns_3dgs(1), element="point")


def _list_property(path):
    cols = columns_3dgs(0)
    table = np.empty(4, dtype=[(name, "<f4") if name != "rot_2" else (name, object) for name in cols])
    for name in cols:
        table[name] = cols[name] if name != "rot_2" else [np.zeros(2, np.float32)] * 4
    plyfile.PlyData([plyfile.PlyElement.describe(table, "vertex")]).write(str(path))


BROKEN = {
    "missing": (lambda path: None, "no such file"),
    "not a ply": (_garbage, "not a readable .ply"),
    "truncated": (_truncated, "not a readable .ply"),
    "no vertex": (_no_vertex, "no 'vertex' element"),
    "missing properties": (_columns(drop=("opacity", "scale_1")),
                           "missing vertex properties opacity, scale_1; a degree-1 3DGS .ply has x y z f_dc_0..2 f_rest_0..8 opacity"),
    "f_rest gap": (_columns(drop=("f_rest_8",), f_rest_9=np.ones(4, np.float32)), "missing vertex properties f_rest_8"),
    "f_rest count": (_columns(drop=tuple(f"f_rest_{i}" for i in range(5, 9))), "5 f_rest_* properties is no SH degree"),
    "int property": (_columns(x=np.arange(4, dtype=np.int32)), "must be float, but found int x"),
    "list property": (_list_property, "must be float, but found list"),
    "nan": (_columns(scale_1=np.array([0, 0, np.nan, 0], np.float32)),
            "scales has NaN or inf in 1 of 4 Gaussians (the first is Gaussian 2)"),
    "inf": (_columns(y=np.array([0, np.inf, 0, -np.inf], np.float32)),
            "means has NaN or inf in 2 of 4 Gaussians (the first is Gaussian 1)"),
    "nan f_rest": (_columns(f_rest_4=np.array([np.nan, 0, 0, 0], np.float32)), "f_rest has NaN or inf in 1 of 4"),
    "empty": (_columns(**{name: np.zeros(0, np.float32) for name in columns_3dgs(1)}), "empty (no Gaussians)"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_file_gives_one_line_naming_the_file(tmp_path, case):
    make, expected = BROKEN[case]
    path = tmp_path / f"{case.replace(' ', '_')}.ply"
    make(path)
    with pytest.raises(CompressKitError) as info:
        read_ply(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert expected in message


# ---- writing ---------------------------------------------------------------------------------------
def test_refuses_to_overwrite_unless_asked(tmp_path):
    path = write_ply(tmp_path / "scene.ply", tiny(1, seed=0))
    before = path.read_bytes()
    with pytest.raises(CompressKitError, match="already exists; pass overwrite=True") as info:
        write_ply(path, tiny(1, seed=1))
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    write_ply(path, tiny(2, seed=1), overwrite=True)
    assert_bit_equal(read_ply(path), tiny(2, seed=1))
    assert os.listdir(tmp_path) == ["scene.ply"]  # no temporary file left


def test_a_failed_write_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    def half_then_fail(self, stream):
        stream.write(b"ply\nformat binary_little_endian 1.0\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plyfile.PlyData, "write", half_then_fail)
    with pytest.raises(CompressKitError, match="No space left on device") as info:
        write_ply(tmp_path / "new.ply", tiny(1))
    assert str(tmp_path / "new.ply") in str(info.value)
    assert os.listdir(tmp_path) == []

    (tmp_path / "old.ply").write_bytes(b"the old scene")
    with pytest.raises(CompressKitError):
        write_ply(tmp_path / "old.ply", tiny(1), overwrite=True)
    assert (tmp_path / "old.ply").read_bytes() == b"the old scene"  # untouched, not half-replaced
    assert os.listdir(tmp_path) == ["old.ply"]


def _with_nan(data):
    data.quats[3, 1] = np.nan
    return data


@pytest.mark.parametrize("make,expected", [
    (lambda: _with_nan(tiny(1)), "quats has NaN or inf in 1 of 40 Gaussians (the first is Gaussian 3)"),
    (lambda: tiny(1, n=0), "no Gaussians"),
])
def test_the_writer_refuses_what_the_reader_would_refuse(tmp_path, make, expected):
    with pytest.raises(CompressKitError, match=re.escape(expected)) as info:
        write_ply(tmp_path / "bad.ply", make())
    assert str(tmp_path / "bad.ply") in str(info.value)
    assert os.listdir(tmp_path) == []


def test_the_writer_names_a_missing_directory(tmp_path):
    with pytest.raises(CompressKitError, match="does not exist") as info:
        write_ply(tmp_path / "nowhere" / "scene.ply", tiny(0))
    assert str(tmp_path / "nowhere" / "scene.ply") in str(info.value)


def test_the_written_file_has_the_mode_a_plain_open_gives(tmp_path):
    path = write_ply(tmp_path / "scene.ply", tiny(0))
    (tmp_path / "plain").write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777)


# ---- PlyGaussians ----------------------------------------------------------------------------------
def test_ply_gaussians_checks_shapes_and_dtypes():
    good = {name: getattr(tiny(1, n=3), name) for name in FIELDS}
    with pytest.raises(CompressKitError, match=r"PlyGaussians.opacities must have shape \[3\]"):
        PlyGaussians(**{**good, "opacities": np.zeros((3, 1))})
    with pytest.raises(CompressKitError, match=r"PlyGaussians.quats must have shape \[3, 4\]"):
        PlyGaussians(**{**good, "quats": np.zeros((2, 4))})
    with pytest.raises(CompressKitError, match="PlyGaussians.f_rest must have shape"):
        PlyGaussians(**{**good, "f_rest": np.zeros((3, 4, 3))})  # K - 1 = 4 is no SH degree
    with pytest.raises(CompressKitError, match="PlyGaussians.means must be a floating array"):
        PlyGaussians(**{**good, "means": np.zeros((3, 3), np.int64)})
    assert PlyGaussians(**{**good, "means": good["means"].astype(np.float64)}).means.dtype == np.float32
    assert gs_ply.property_names(3)[9 + 44] == "f_rest_44"
