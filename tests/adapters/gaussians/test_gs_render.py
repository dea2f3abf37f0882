"""The 3DGS renderer: closed forms for single splats, compositing order, culling, SH, gradients, tiling
against a brute-force reference, chunking and its memory cap, and (if installed) gsplat's torch reference."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from compresskit.adapters.gaussians import raster
from compresskit.adapters.gaussians.composite import composite, composite_reference
from compresskit.adapters.gaussians.project import ALPHA_MAX, ALPHA_MIN, SH_C0, project, sh_to_color
from compresskit.adapters.gaussians.render import Camera, orbit_cameras, render, render_views
from compresskit.errors import CompressKitError


def scene(means, rgb=None, opacity=0.8, sigma=0.05, degree=0, dtype=torch.float32, grad=False, seed=0):
    """Gaussians at ``means [N, 3]`` with isotropic ``sigma`` (world units), colour ``rgb [N, 3]`` via f_dc."""
    means = torch.as_tensor(means, dtype=dtype).reshape(-1, 3)
    n = means.shape[0]
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, generator=gen, dtype=dtype) if rgb is None else torch.as_tensor(rgb, dtype=dtype).reshape(n, 3)
    opacity = torch.as_tensor(opacity, dtype=dtype).expand(n)
    g = SimpleNamespace(
        means=means.clone(),
        f_dc=(rgb - 0.5) / SH_C0,
        f_rest=torch.zeros(n, (degree + 1) ** 2 - 1, 3, dtype=dtype),
        opacities=torch.logit(opacity).clone(),
        scales=torch.full((n, 3), math.log(sigma), dtype=dtype),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype).repeat(n, 1),
    )
    if grad:
        for v in vars(g).values():
            v.requires_grad_(True)
    return g


def random_scene(n, degree=1, dtype=torch.float32, seed=0, spread=0.6, log_sigma=(-3.0, -1.8)):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)  # noqa: E731
    return SimpleNamespace(
        means=(r(n, 3) * 2 - 1) * spread,
        f_dc=torch.randn(n, 3, generator=gen, dtype=dtype),
        f_rest=0.3 * torch.randn(n, (degree + 1) ** 2 - 1, 3, generator=gen, dtype=dtype),
        opacities=torch.randn(n, generator=gen, dtype=dtype),
        scales=log_sigma[0] + (log_sigma[1] - log_sigma[0]) * r(n, 3),
        quats=torch.randn(n, 4, generator=gen, dtype=dtype),
    )


def axis_camera(width=48, height=40, f=40.0, cx=20.5, cy=16.5):
    """Identity extrinsics: world = camera space; the optical axis hits the centre of pixel (20, 16)."""
    return Camera(torch.eye(4), f, f, cx, cy, width, height)


def test_single_isotropic_gaussian_matches_closed_form():
    cam, z, sigma, o = axis_camera(), 2.0, 0.05, 0.7
    g = scene([[0.0, 0.0, z]], rgb=[[0.9, 0.5, 0.2]], opacity=o, sigma=sigma)
    out = render(g, cam)
    assert out.image.shape == (3, 40, 48) and out.alpha.shape == (40, 48)
    var = (cam.fx * sigma / z) ** 2 + 0.3  # EWA: (J sigma)^2 plus the 0.3 px^2 low-pass
    assert divmod(int(out.alpha.argmax()), 48) == (16, 20)
    torch.testing.assert_close(out.alpha[16, 20], torch.tensor(o), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image[:, 16, 20], o * torch.tensor([0.9, 0.5, 0.2]), atol=1e-5, rtol=0)
    for dy, dx in [(0, 1), (1, 0), (2, -3), (-1, 2)]:
        want = o * math.exp(-0.5 * (dx * dx + dy * dy) / var)
        want = want if want >= ALPHA_MIN else 0.0
        assert abs(float(out.alpha[16 + dy, 20 + dx]) - want) < 1e-5


def test_anisotropic_rotated_gaussian_swaps_axes():
    cam, z, o = axis_camera(), 2.0, 0.9
    g = scene([[0.0, 0.0, z]], opacity=o)
    g.scales = torch.log(torch.tensor([[0.02, 0.08, 0.05]]))
    g.quats = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]]) * 3.0  # 90 deg about z, unnormalised
    alpha = render(g, cam).alpha
    var_x, var_y = (cam.fx * 0.08 / z) ** 2 + 0.3, (cam.fx * 0.02 / z) ** 2 + 0.3  # rotated: x gets the 0.08
    assert abs(float(alpha[16, 22]) - o * math.exp(-0.5 * 4 / var_x)) < 1e-5
    assert abs(float(alpha[17, 20]) - o * math.exp(-0.5 * 1 / var_y)) < 1e-5


def test_off_axis_gaussian_lands_on_its_projected_pixel():
    cam = Camera.look_at((0.3, -3.0, 1.0), (0.0, 0.0, 0.0), fov_deg=45, width=48, height=48)
    mean = torch.tensor([0.25, 0.1, -0.15])
    g = scene(mean[None], opacity=0.9, sigma=0.02)
    p = cam.world_to_camera[:3, :3] @ mean + cam.world_to_camera[:3, 3]
    u, v = cam.fx * p[0] / p[2] + cam.cx, cam.fy * p[1] / p[2] + cam.cy
    row, col = divmod(int(render(g, cam).alpha.argmax()), 48)
    assert (row, col) == (int(v), int(u))


def test_front_to_back_compositing_is_depth_ordered():
    cam = axis_camera()
    rgb = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    g = scene([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]], rgb=rgb, opacity=[0.6, 0.7])
    swapped = scene([[0.0, 0.0, 3.0], [0.0, 0.0, 2.0]], rgb=rgb[::-1], opacity=[0.7, 0.6])
    a, b = render(g, cam), render(swapped, cam)
    torch.testing.assert_close(a.image, b.image, atol=0, rtol=0)
    torch.testing.assert_close(a.alpha, b.alpha, atol=0, rtol=0)
    want = 0.6 * torch.tensor([1.0, 0.0, 0.0]) + 0.4 * 0.7 * torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(a.image[:, 16, 20], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.alpha[16, 20], torch.tensor(1 - 0.4 * 0.3), atol=1e-5, rtol=0)


def test_alpha_is_capped_and_background_shows_through():
    cam = axis_camera()
    g = scene([[0.0, 0.0, 2.0]], rgb=[[0.2, 0.4, 0.6]], opacity=0.9999)
    out = render(g, cam, background=[1.0, 1.0, 1.0])
    torch.testing.assert_close(out.alpha[16, 20], torch.tensor(ALPHA_MAX), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image[:, 16, 20], 0.99 * torch.tensor([0.2, 0.4, 0.6]) + 0.01, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image[:, 0, 0], torch.ones(3))


def test_gaussian_behind_camera_contributes_nothing():
    cam = axis_camera()
    front = scene([[0.05, 0.0, 2.0]], seed=1)
    both = scene([[0.05, 0.0, 2.0], [0.0, 0.0, -2.0]], rgb=torch.cat([front.f_dc * SH_C0 + 0.5, torch.ones(1, 3)]), grad=True)
    behind = scene([[0.0, 0.0, -2.0], [0.0, 0.0, 0.005]], opacity=0.99, sigma=0.5, grad=True)  # inside the near plane
    empty = render(behind, cam)
    assert float(empty.alpha.abs().max()) == 0.0
    empty.image.sum().backward()  # a view with nothing on screen still back-propagates (zeros), as in training
    grads = [v.grad for v in vars(behind).values()]
    assert any(x is not None for x in grads) and all(x is None or float(x.abs().max()) == 0.0 for x in grads)
    out = render(both, cam)
    torch.testing.assert_close(out.image, render(front, cam).image, atol=0, rtol=0)
    out.image.sum().backward()
    assert torch.isfinite(both.means.grad).all() and float(both.means.grad[1].abs().max()) == 0.0


def test_sh_degree_0_colour_is_c0_fdc_plus_half_and_higher_bands_are_ignored():
    cam = axis_camera()
    g = scene([[0.0, 0.0, 2.0]], opacity=0.5, degree=3)
    g.f_dc = torch.tensor([[0.7, -0.4, -3.0]])  # the last one clamps at 0
    g.f_rest = torch.randn(1, 15, 3)
    img = render(g, cam, sh_degree=0).image[:, 16, 20]
    torch.testing.assert_close(img, 0.5 * (SH_C0 * g.f_dc[0] + 0.5).clamp(min=0), atol=1e-5, rtol=0)
    assert float(img[2]) == 0.0
    assert not torch.allclose(render(g, cam).image[:, 16, 20], img)  # degree 3 does see f_rest


def test_sh_basis_is_orthonormal():
    """Each coefficient slot's basis function, integrated over the sphere: the Gram matrix is the identity."""
    n = 200_000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    dirs = torch.stack([torch.sqrt(1 - z * z) * torch.cos(phi), torch.sqrt(1 - z * z) * torch.sin(phi), z], -1)
    basis = torch.stack([sh_to_color(torch.eye(16, dtype=torch.float64)[k].expand(n, 16)[..., None], dirs, 3)[:, 0] for k in range(16)], -1)
    gram = basis.T @ basis * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=1e-4, rtol=0)


def brute_force(splats, width, height, background):
    """Every pixel against every splat, no tiles: the reference for the tiled rasterizer."""
    order = torch.sort(splats.depths, stable=True).indices
    m2, con, o, rgb = splats.means2d[order], splats.conics[order], splats.opacities[order], splats.colors[order]
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    dx = xs.reshape(-1, 1).to(m2) - m2[:, 0]  # [P, M]
    dy = ys.reshape(-1, 1).to(m2) - m2[:, 1]
    q = con[:, 0] * dx * dx + 2 * con[:, 1] * dx * dy + con[:, 2] * dy * dy
    alpha = (o * torch.exp(-0.5 * q)).clamp(max=ALPHA_MAX)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, 0.0)
    image, trans = torch.zeros(width * height, 3, dtype=m2.dtype), torch.ones(width * height, dtype=m2.dtype)
    for k in range(alpha.shape[1]):  # the textbook loop, front to back
        image = image + (trans * alpha[:, k])[:, None] * rgb[k]
        trans = trans * (1 - alpha[:, k])
    image = image + trans[:, None] * background
    return image.T.reshape(3, height, width), (1 - trans).reshape(height, width)


@pytest.mark.parametrize("width,height,tile", [(40, 36, 16), (48, 48, 16), (40, 36, 8), (33, 30, 5)])
def test_tiled_matches_brute_force(width, height, tile):
    g = random_scene(120, seed=3)
    cam = Camera.look_at((0.0, -2.5, 0.8), (0.0, 0.0, 0.0), fov_deg=50, width=width, height=height)
    bg = torch.tensor([0.1, 0.2, 0.3])
    out = render(g, cam, background=bg, tile_size=tile)
    image, alpha = brute_force(project(g, cam), width, height, bg)
    torch.testing.assert_close(out.image, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.alpha, alpha, atol=1e-5, rtol=0)
    assert float(alpha.max()) > 0.5  # the scene is really seen


def test_chunk_and_tile_sizes_do_not_change_image_or_gradients():
    cam = Camera.look_at((0.0, -2.5, 0.8), (0.0, 0.0, 0.0), fov_deg=50, width=40, height=36)
    results = []
    # 2 and 7 depth slots per chunk force depth slices (lists are longer); tile 8 changes every list.
    for max_elements, tile in [(256 * 2, 16), (256 * 7, 16), (1 << 16, 16), (1 << 22, 16), (64 * 3, 8), (1 << 16, 8)]:
        g = random_scene(150, seed=4)
        for v in vars(g).values():
            v.requires_grad_(True)
        out = render(g, cam, max_elements=max_elements, tile_size=tile)
        (out.image * torch.linspace(0, 1, 40)).sum().backward()
        results.append((out.image.detach(), g.means.grad, g.opacities.grad))
    for image, gm, go in results[1:]:
        torch.testing.assert_close(image, results[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(gm, results[0][1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(go, results[0][2], atol=1e-4, rtol=1e-4)


def test_plan_chunks_caps_size_and_covers_every_slot_once():
    counts = torch.tensor([23, 23, 9, 8, 5, 1, 1])
    budget = 256 * 10
    covered = torch.zeros(len(counts), 30, dtype=torch.long)
    for row0, row1, k0, k in raster.plan_chunks(counts, budget):
        assert (row1 - row0) * k * 256 <= budget
        covered[row0:row1, k0 : k0 + k] += 1
    for row, c in enumerate(counts.tolist()):
        assert covered[row, :c].eq(1).all(), f"tile {row}: every one of its {c} splats in exactly one chunk"


def test_largest_chunk_tensor_stays_under_the_cap(monkeypatch):
    """Spy on the compositor: every [tiles, K, 256] tensor it builds must respect max_elements."""
    sizes = []
    real = raster.composite

    def spy(coefs, opacities, rgb, feats_t):
        sizes.append(coefs.shape[0] * coefs.shape[1] * feats_t.shape[0])  # the [T, P, K] tensors' size
        return real(coefs, opacities, rgb, feats_t)

    monkeypatch.setattr(raster, "composite", spy)
    g = random_scene(300, seed=5)
    cam = Camera.look_at((0.0, -2.5, 0.8), (0.0, 0.0, 0.0), fov_deg=50, width=48, height=48)
    budget = 256 * 24
    render(g, cam, max_elements=budget)
    bins = raster.bin_splats(project(g, cam), 48, 48)
    assert int(bins.counts.max()) > 24, "the scene must have tiles longer than one chunk allows"
    assert max(sizes) <= budget and len(sizes) > 1


def test_saved_for_backward_is_per_intersection_not_per_pixel(monkeypatch):
    """What autograd keeps for backward must stay below one float per (pixel, splat) pair of the tiles: the
    compositor recomputes instead of saving [tiles, 256, K] tensors. Plain autograd breaks the bound ~20x."""
    g = random_scene(300, seed=5)
    for v in vars(g).values():
        v.requires_grad_(True)
    cam = Camera.look_at((0.0, -2.5, 0.8), (0.0, 0.0, 0.0), fov_deg=50, width=48, height=48)
    pairs = 256 * raster.bin_splats(project(g, cam), 48, 48).gauss.numel()

    def saved_bytes():
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            render(g, cam)
        return sum(sizes)

    assert saved_bytes() < 4 * pairs
    monkeypatch.setattr(raster, "composite", composite_reference)
    assert saved_bytes() > 4 * pairs  # the bound is one plain autograd would fail


def chunk_inputs(t, k, dtype, seed):
    """Random but valid compositing inputs: ellipses near the tile, some opacities at the 0.99 cap, padding."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)  # noqa: E731
    a, c, b = 0.05 + 0.3 * r(t, k), 0.05 + 0.3 * r(t, k), 0.05 * (r(t, k) - 0.5)
    mx, my = 20 * r(t, k) - 10, 20 * r(t, k) - 10
    coefs = torch.stack([-0.5 * a, -0.5 * c, -b, a * mx + b * my, b * mx + c * my,
                         -0.5 * (a * mx * mx + c * my * my) - b * mx * my], -1)  # fmt: skip
    opac = 0.05 + 0.9 * r(t, k)
    opac[0, :3] = 0.999  # capped at 0.99 near their centres
    opac[-1, -2:] = 0.0  # padding slots
    return coefs, opac, r(t, k, 3), raster.pixel_features(dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_written_backward_matches_autograd_reference(dtype):
    coefs, opac, rgb, feats = chunk_inputs(3, 40, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    g_color, g_trans = torch.randn(3, 256, 3, generator=gen, dtype=dtype), torch.randn(3, 256, generator=gen, dtype=dtype)
    grads = []
    for fn in (composite, composite_reference):
        inputs = [x.clone().requires_grad_(True) for x in (coefs, opac, rgb)]
        color, trans = fn(*inputs, feats)
        ((color * g_color).sum() + (trans * g_trans).sum()).backward()
        grads.append((color.detach(), trans.detach(), *[x.grad for x in inputs]))
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for ours, ref in zip(grads[0][:-1], grads[1][:-1]):  # colour, transmittance, coefs, opacity grads
        torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(grads[0][-1], grads[1][-1], **tol)
    assert float(grads[0][3][0, :3].abs().sum()) > 0  # the capped splats still get opacity gradient off-centre


def test_composite_gradcheck_float64():
    coefs, opac, rgb, feats = chunk_inputs(2, 6, torch.float64, seed=13)
    inputs = [x.clone().requires_grad_(True) for x in (coefs, opac, rgb)]
    assert torch.autograd.gradcheck(lambda *x: composite(*x, feats), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_finite_difference_gradients_float64():
    g = random_scene(6, degree=1, dtype=torch.float64, seed=6, spread=0.3, log_sigma=(-2.2, -1.6))
    cam = Camera.look_at((0.0, -2.0, 0.5), (0.0, 0.0, 0.0), fov_deg=40, width=20, height=18)
    names = ["means", "opacities", "f_dc", "f_rest", "scales", "quats"]
    weights = torch.rand(3, 18, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(*tensors):
        out = render(SimpleNamespace(**dict(zip(names, tensors))), cam, background=[0.2, 0.3, 0.4])
        return torch.stack([(out.image * weights).sum(), out.alpha.sum()])

    inputs = [getattr(g, n).clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_cameras_look_at_their_target_and_orbit_is_deterministic():
    cams = orbit_cameras(12, radius=3.0, target=(0.1, 0.2, 0.3), fov_deg=45, width=32, height=24)
    assert len(cams) == 12
    for c in cams:
        assert abs(float((c.center - torch.tensor([0.1, 0.2, 0.3])).norm()) - 3.0) < 1e-5
        p = c.world_to_camera @ torch.tensor([0.1, 0.2, 0.3, 1.0])
        assert abs(float(p[0])) < 1e-5 and abs(float(p[1])) < 1e-5 and float(p[2]) > 0
    elev = [math.degrees(math.asin(float(c.center[2] - 0.3) / 3.0)) for c in cams]
    assert 5.0 - 1e-3 <= min(elev) and max(elev) <= 75.0 + 1e-3 and len({round(e, 3) for e in elev}) == 12
    again = orbit_cameras(12, radius=3.0, target=(0.1, 0.2, 0.3), fov_deg=45, width=32, height=24)
    assert all(torch.equal(a.world_to_camera, b.world_to_camera) for a, b in zip(cams, again))
    rings = orbit_cameras(8, 2.0, elevations_deg=[10.0, 40.0])
    assert [round(math.degrees(math.asin(float(c.center[2]) / 2.0))) for c in rings[:3]] == [10, 40, 10]


def test_look_at_image_axes_follow_opencv():
    cam = Camera.look_at((0.0, -3.0, 0.0), (0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0), width=32, height=32)
    r = cam.world_to_camera[:3, :3]
    torch.testing.assert_close(r[0], torch.tensor([1.0, 0.0, 0.0]))  # world +x is image right
    torch.testing.assert_close(r[1], torch.tensor([0.0, 0.0, -1.0]))  # world up is image up (y down)
    torch.testing.assert_close(cam.center, torch.tensor([0.0, -3.0, 0.0]))
    with pytest.raises(CompressKitError):
        Camera.look_at((0.0, 0.0, 3.0), (0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0))


def test_render_views_stacks_without_grad_and_bad_input_is_a_clear_error():
    g = random_scene(40, seed=7)
    g.means.requires_grad_(True)
    cams = orbit_cameras(3, 2.5, width=24, height=20)
    views = render_views(g, cams)
    assert views.shape == (3, 3, 20, 24) and not views.requires_grad
    torch.testing.assert_close(views[1], render(g, cams[1]).image.detach())
    with pytest.raises(CompressKitError, match="f_rest"):
        render(SimpleNamespace(**{**vars(g), "f_rest": torch.zeros(40, 5, 3)}), cams[0])
    with pytest.raises(CompressKitError, match="opacities"):
        render(SimpleNamespace(**{**vars(g), "opacities": torch.zeros(40, 1)}), cams[0])
    with pytest.raises(CompressKitError, match="sh_degree"):
        render(g, cams[0], sh_degree=2)


def test_projection_and_sh_match_gsplat_torch_reference():
    # ImportError too: gsplat is installed --no-deps, so a missing jaxtyping must skip, not fail.
    pytest.importorskip(
        "gsplat", reason="gsplat not importable: pip install --no-deps gsplat jaxtyping wadler-lindig", exc_type=ImportError
    )
    from gsplat.cuda import _torch_impl as ref

    # Spread wide (some off screen, 17 behind the camera) and faint (so opacity-aware culling matters).
    g = random_scene(200, degree=3, dtype=torch.float64, seed=8, spread=3.0)
    g.opacities = g.opacities - 2.0
    cam = Camera.look_at((0.4, -2.2, 0.9), (0.0, 0.0, 0.0), fov_deg=60, width=48, height=40)
    ours = project(g, cam)
    K = torch.tensor([[cam.fx, 0.0, cam.cx], [0.0, cam.fy, cam.cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    covars, _ = ref._quat_scale_to_covar_preci(g.quats, torch.exp(g.scales), compute_preci=False)
    radii, means2d, depths, conics, _ = ref._fully_fused_projection(
        g.means, covars, cam.world_to_camera.double()[None], K[None], 48, 40
    )
    assert 50 < len(ours.ids) < 190
    torch.testing.assert_close(ours.means2d, means2d[0, ours.ids], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ours.conics, conics[0, ours.ids], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(ours.depths, depths[0, ours.ids])
    # What gsplat keeps (3.33-sigma radius) but we cull must reach alpha >= 1/255 at no pixel centre.
    kept = torch.zeros(200, dtype=torch.bool)
    kept[ours.ids] = True
    dropped = torch.nonzero((radii[0] > 0).all(-1) & ~kept).squeeze(1)
    ys, xs = torch.meshgrid(torch.arange(40) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    dx = xs.reshape(-1, 1).double() - means2d[0, dropped, 0]
    dy = ys.reshape(-1, 1).double() - means2d[0, dropped, 1]
    a, b, c = conics[0, dropped].unbind(-1)
    alpha = torch.sigmoid(g.opacities[dropped]) * torch.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))
    assert dropped.numel() > 0 and float(alpha.max()) < ALPHA_MIN
    sh = torch.cat([g.f_dc[:, None], g.f_rest], 1)
    w2c = cam.world_to_camera.double()
    dirs = g.means + w2c[:3, :3].T @ w2c[:3, 3]  # mean - camera centre
    want = (ref._spherical_harmonics(3, dirs, sh) + 0.5).clamp(min=0)
    torch.testing.assert_close(ours.colors, want[ours.ids], atol=1e-9, rtol=1e-9)


def test_a_few_adam_steps_fit_a_target_view():
    """The gradients are useful: fitting a jittered copy of a scene to the scene's render lowers the loss."""
    from compresskit.adapters.gaussians.image_metrics import render_loss

    cam = Camera.look_at((0.0, -2.5, 0.8), (0.0, 0.0, 0.0), fov_deg=50, width=24, height=24)
    target = render(random_scene(30, seed=14), cam).image
    g = random_scene(30, seed=14)
    gen = torch.Generator().manual_seed(15)
    for name in ("means", "f_dc", "opacities"):
        v = getattr(g, name)
        v.add_(0.1 * torch.randn(v.shape, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([g.means, g.f_dc, g.opacities], lr=0.01)
    losses = []
    for _ in range(40):
        loss = render_loss(render(g, cam).image, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
