"""GaussianScene: the attributes as float32 parameters, .ply in and out, parametrizations seen
everywhere, and select / cat for pruning and densification."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

pytest.importorskip("plyfile")

from compresskit.adapters.gaussians.ply import PlyGaussians, read_ply  # noqa: E402
from compresskit.adapters.gaussians.scene import GaussianScene  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

FIELDS = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")


def tiny_ply(degree: int, n: int = 30, seed: int = 0) -> PlyGaussians:
    rng = np.random.default_rng(seed)
    k = (degree + 1) ** 2
    return PlyGaussians(
        means=rng.standard_normal((n, 3)), f_dc=rng.standard_normal((n, 3)),
        f_rest=rng.standard_normal((n, k - 1, 3)), opacities=rng.standard_normal(n),
        scales=rng.standard_normal((n, 3)) - 3, quats=rng.standard_normal((n, 4)),
    )


def tiny_scene(degree: int = 1, n: int = 30, seed: int = 0) -> GaussianScene:
    return GaussianScene.from_ply(tiny_ply(degree, n, seed))


def bits(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).view(np.uint32)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Double(nn.Module):
    def forward(self, x):
        return 2 * x


# ---- attributes and SH ------------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_the_attributes_are_float32_parameters_in_the_documented_shapes(degree):
    scene = tiny_scene(degree, n=30)
    k = (degree + 1) ** 2
    shapes = {"means": (30, 3), "f_dc": (30, 3), "f_rest": (30, k - 1, 3), "opacities": (30,), "scales": (30, 3), "quats": (30, 4)}
    assert dict(scene.named_parameters()).keys() == shapes.keys()
    for name, shape in shapes.items():
        value = getattr(scene, name)
        assert isinstance(value, nn.Parameter) and value.dtype == torch.float32 and tuple(value.shape) == shape, name
    assert scene.sh_degree == degree and scene.num_gaussians == 30
    assert scene.sh().shape == (30, k, 3)


def test_sh_is_f_dc_then_f_rest_and_carries_gradients():
    scene = tiny_scene(2)
    sh = scene.sh()
    assert torch.equal(sh[:, 0], scene.f_dc) and torch.equal(sh[:, 1:], scene.f_rest)
    (sh * torch.arange(9.0)[None, :, None]).sum().backward()
    assert torch.equal(scene.f_dc.grad, torch.zeros(30, 3))  # coefficient 0 had weight 0
    assert torch.equal(scene.f_rest.grad[:, 2], torch.full((30, 3), 3.0))


def test_degree_0_has_an_empty_f_rest():
    scene = tiny_scene(0, n=5)
    assert scene.f_rest.shape == (5, 0, 3)
    assert torch.equal(scene.sh(), scene.f_dc[:, None, :])


def test_the_constructor_checks_shapes_and_dtypes():
    good = {name: torch.from_numpy(getattr(tiny_ply(1, n=4), name)) for name in FIELDS}
    with pytest.raises(CompressKitError, match=r"GaussianScene.scales must have shape \[4, 3\]"):
        GaussianScene(**{**good, "scales": torch.zeros(4, 2)})
    with pytest.raises(CompressKitError, match="GaussianScene.f_rest must have shape"):
        GaussianScene(**{**good, "f_rest": torch.zeros(4, 3, 4)})  # channel first: not the layout
    with pytest.raises(CompressKitError, match="GaussianScene.quats must be a floating tensor"):
        GaussianScene(**{**good, "quats": torch.zeros(4, 4, dtype=torch.int64)})
    assert GaussianScene(**{**good, "means": good["means"].double()}).means.dtype == torch.float32


# ---- .ply ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_round_trip_is_bit_exact(tmp_path, degree):
    data = tiny_ply(degree)
    scene = GaussianScene.from_ply(data)
    for name in FIELDS:
        assert np.array_equal(bits(getattr(scene.to_ply(), name)), bits(getattr(data, name))), name
    scene.save(tmp_path / "scene.ply")
    loaded = GaussianScene.load(tmp_path / "scene.ply")
    assert loaded.sh_degree == degree
    for name in FIELDS:
        assert np.array_equal(bits(getattr(loaded, name).detach()), bits(getattr(data, name))), name


def test_from_ply_and_to_ply_copy(tmp_path):
    data = tiny_ply(1)
    scene = GaussianScene.from_ply(data)
    data.f_rest[:] = 7.0
    assert not torch.any(scene.f_rest == 7.0)
    out = scene.to_ply()
    out.means[:] = 7.0
    assert not torch.any(scene.means == 7.0)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tiny_scene(1, seed=0).save(tmp_path / "scene.ply")
    with pytest.raises(CompressKitError, match="already exists"):
        tiny_scene(1, seed=1).save(path)
    assert torch.equal(GaussianScene.load(path).means, tiny_scene(1, seed=0).means)
    tiny_scene(1, seed=1).save(path, overwrite=True)
    assert torch.equal(GaussianScene.load(path).means, tiny_scene(1, seed=1).means)


# ---- parametrizations ------------------------------------------------------------------------------
def test_a_parametrization_on_f_rest_keeps_its_shape_and_is_what_to_ply_writes(tmp_path):
    scene = tiny_scene(2)
    original = scene.f_rest.detach().clone()
    parametrize.register_parametrization(scene, "f_rest", Identity())
    assert parametrize.is_parametrized(scene, "f_rest")
    assert scene.f_rest.shape == (30, 8, 3) and torch.equal(scene.f_rest, original)

    scene = tiny_scene(2)
    parametrize.register_parametrization(scene, "f_rest", Double())
    assert np.array_equal(scene.to_ply().f_rest, 2 * original.numpy())
    assert torch.equal(scene.sh()[:, 1:], 2 * original)
    scene.save(tmp_path / "scene.ply")
    assert np.array_equal(read_ply(tmp_path / "scene.ply").f_rest, 2 * original.numpy())
    scene.sh().sum().backward()  # the gradient reaches the bare parameter under the parametrization
    assert torch.equal(scene.parametrizations.f_rest.original.grad, torch.full((30, 8, 3), 2.0))


def test_select_and_cat_of_a_parametrized_scene_are_plain_scenes_of_its_values():
    scene = tiny_scene(1)
    original = scene.f_rest.detach().clone()
    parametrize.register_parametrization(scene, "f_rest", Double())
    picked = scene.select([3, 1])
    assert type(picked) is GaussianScene and not parametrize.is_parametrized(picked)
    assert torch.equal(picked.f_rest, 2 * original[[3, 1]])
    both = GaussianScene.cat([scene, tiny_scene(1, seed=1)])
    assert type(both) is GaussianScene and torch.equal(both.f_rest[:30], 2 * original)


# ---- pruning and densification -------------------------------------------------------------------
def test_select_by_mask_keeps_the_true_rows_in_order():
    scene = tiny_scene(1, n=10)
    mask = torch.tensor([True, False] * 5)
    kept = scene.select(mask)
    assert kept.num_gaussians == 5 and kept.sh_degree == 1
    for name in FIELDS:
        assert torch.equal(getattr(kept, name), getattr(scene, name)[mask]), name
    assert isinstance(kept.means, nn.Parameter) and kept.means.data_ptr() != scene.means.data_ptr()
    assert scene.select(np.zeros(10, dtype=bool)).num_gaussians == 0


def test_select_by_index_allows_order_repeats_and_negative_indices():
    scene = tiny_scene(1, n=10)
    picked = scene.select([9, 0, 0, -1])
    assert torch.equal(picked.opacities, scene.opacities[[9, 0, 0, 9]])
    as_bytes = scene.select(torch.tensor([2, 3], dtype=torch.uint8))  # indices, not a mask
    assert torch.equal(as_bytes.quats, scene.quats[[2, 3]])
    assert scene.select([]).num_gaussians == 0


@pytest.mark.parametrize("index,expected", [
    (torch.ones(9, dtype=torch.bool), "mask has 9 entries for 10 Gaussians"),
    ([0, 10], r"must lie in \[-10, 10\), got 0..10"),
    ([-11], r"must lie in \[-10, 10\)"),
    (torch.tensor([0.0, 1.0]), "bool mask or integer indices, got torch.float32"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D mask or index"),
])
def test_select_refuses_a_bad_index(index, expected):
    with pytest.raises(CompressKitError, match=expected):
        tiny_scene(1, n=10).select(index)


def test_cat_appends_in_order():
    a, b = tiny_scene(2, n=4, seed=0), tiny_scene(2, n=3, seed=1)
    both = GaussianScene.cat([a, b])
    assert both.num_gaussians == 7 and both.sh_degree == 2
    for name in FIELDS:
        assert torch.equal(getattr(both, name), torch.cat([getattr(a, name), getattr(b, name)])), name
    alone = GaussianScene.cat([a])
    assert torch.equal(alone.means, a.means) and alone.means.data_ptr() != a.means.data_ptr()


def test_cat_refuses_mixed_degrees_and_nothing():
    with pytest.raises(CompressKitError, match=r"one SH degree, got degrees \[1, 2\]"):
        GaussianScene.cat([tiny_scene(1), tiny_scene(2)])
    with pytest.raises(CompressKitError, match="non-empty"):
        GaussianScene.cat([])
