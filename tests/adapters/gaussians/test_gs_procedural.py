"""The procedural object's ground truth: the object is where the geometry says, renders are deterministic,
surface samples lie on the visible surface with the colours the renderer shows."""
from __future__ import annotations

import math

import pytest
import torch

from compresskit.adapters.gaussians import procedural as P
from compresskit.adapters.gaussians.render import Camera, orbit_cameras
from compresskit.errors import CompressKitError


def front_camera(size: int = 32) -> Camera:
    return Camera.look_at((3.0, 0.0, 0.3), (0.0, 0.0, 0.0), fov_deg=50.0, width=size, height=size)


def test_centre_hits_the_object_and_corners_are_background():
    for cam in orbit_cameras(6, 2.8, elevation_range_deg=(-35.0, 80.0), width=24, height=24):
        image = P.render_ground_truth(cam)
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        assert image[:, 12, 12].sum() > 0.1  # the object sits in the middle of every orbit view
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert torch.equal(image[:, y, x], torch.tensor(P.BACKGROUND))
        assert 0 <= image.min() and image.max() <= 1


def test_render_is_deterministic_and_supersampling_only_softens_edges():
    cam = front_camera()
    a, b = P.render_ground_truth(cam), P.render_ground_truth(cam)
    assert torch.equal(a, b)
    sharp = P.render_ground_truth(cam, supersample=1)
    assert (sharp - a).abs().mean() < 0.05  # the same picture, anti-aliased
    with pytest.raises(CompressKitError, match="supersample"):
        P.render_ground_truth(cam, supersample=0)


def test_a_ray_at_the_sphere_centre_hits_its_near_side():
    centre = torch.tensor(P.SPHERE_CENTRE)
    origin = centre + torch.tensor([3.0, 0.0, 0.0])
    t, normal, _ = P._hit_sphere(origin.unsqueeze(0), torch.tensor([[-1.0, 0.0, 0.0]]))
    assert t.item() == pytest.approx(3.0 - P.SPHERE_RADIUS, abs=1e-5)
    assert torch.allclose(normal[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    miss, _, _ = P._hit_sphere(origin.unsqueeze(0), torch.tensor([[0.0, 0.0, 1.0]]))
    assert math.isinf(miss.item())


def test_the_box_face_is_where_its_half_size_says():
    rot = P._box_rotation()
    centre, half = torch.tensor(P.BOX_CENTRE), torch.tensor(P.BOX_HALF)
    axis_x = rot[:, 0]  # the box's local +x in the world
    origin = centre + 4.0 * axis_x
    t, normal, _ = P._hit_box(origin.unsqueeze(0), -axis_x.unsqueeze(0))
    assert t.item() == pytest.approx(4.0 - half[0].item(), abs=1e-5)
    assert torch.allclose(normal[0], axis_x, atol=1e-5)


def test_pixel_colour_matches_a_cast_ray():
    cam = front_camera(16)
    image = P.render_ground_truth(cam, supersample=1)
    origins, dirs = P.camera_rays(cam)
    assert torch.allclose(image.reshape(3, -1).T, P.shade_rays(origins, dirs))
    assert torch.allclose(origins[0], cam.center.float(), atol=1e-5)


def test_surface_points_lie_on_the_visible_surface():
    s = P.sample_surface_points(2000, seed=3)
    assert s.points.shape == s.colours.shape == s.normals.shape == (2000, 3)
    on_sphere = ((s.points - torch.tensor(P.SPHERE_CENTRE)).norm(dim=-1) - P.SPHERE_RADIUS).abs() < 1e-5
    local = (s.points - torch.tensor(P.BOX_CENTRE)) @ P._box_rotation()
    on_box = ((local.abs() - torch.tensor(P.BOX_HALF)).abs().amin(-1) < 1e-5) & (local.abs() <= torch.tensor(P.BOX_HALF) + 1e-5).all(-1)
    assert (on_sphere | on_box).all()
    assert not (P._inside_box(s.points[on_sphere]).any() or P._inside_sphere(s.points[on_box]).any())
    # area-uniform: the shares follow the visible areas (about a tenth of the box is inside the sphere)
    sphere_area, box_area = P.surface_areas()
    assert 0.8 * sphere_area / (sphere_area + box_area) < on_sphere.float().mean() < 1.2 * sphere_area / (sphere_area + box_area)
    assert torch.allclose(s.normals.norm(dim=-1), torch.ones(2000), atol=1e-5)
    assert (s.points.norm(dim=-1) <= P.BOUNDING_RADIUS).all()
    assert 0 <= s.colours.min() and s.colours.max() <= 1


def test_surface_samples_are_seeded_and_coloured_as_the_renderer_shows_them():
    a, b, c = P.sample_surface_points(50, seed=1), P.sample_surface_points(50, seed=1), P.sample_surface_points(50, seed=2)
    assert torch.equal(a.points, b.points) and torch.equal(a.colours, b.colours)
    assert not torch.equal(a.points, c.points)
    # a ray cast back at each point along its normal sees the point's colour plus, at most, the highlight
    origins, dirs = a.points + 0.5 * a.normals, -a.normals
    nearest = torch.minimum(P._hit_sphere(origins, dirs)[0], P._hit_box(origins, dirs)[0])
    clear = (nearest - 0.5).abs() < 1e-4  # nothing in front of the point
    assert clear.sum() > 25
    seen = P.shade_rays(origins, dirs)
    assert ((seen[clear] - a.colours[clear]) >= -1e-4).all()
    diff, unclamped = seen[clear] - a.colours[clear], (seen[clear] < 1).all(-1)
    assert (diff.amax(-1) - diff.amin(-1))[unclamped].max() < 1e-4  # the highlight is white: the same on every channel
    with pytest.raises(CompressKitError, match="n must be"):
        P.sample_surface_points(0)
