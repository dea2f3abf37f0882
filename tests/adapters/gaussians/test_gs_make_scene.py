"""bench/make_ref_scene.py at tiny sizes (16 x 16 images, two training views, a few hundred Gaussians): the
loss falls, densification and pruning change the count as designed, resume is bit-identical, the .ply and
its .json come out and regenerate the cameras."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from compresskit.adapters.gaussians.image_metrics import render_loss
from compresskit.adapters.gaussians.render import orbit_cameras, render
from compresskit.errors import CompressKitError

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "make_ref_scene.py"
TINY = ["--size", "16", "--train-views", "2", "--heldout-views", "1", "--init-points", "200", "--random-points", "10",
        "--threads", "1", "--log-every", "5"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_ref_scene", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, tmp_path: Path, *extra: str):
    return script.main([*TINY, "--out", str(tmp_path / "scene.ply"), *extra])


def train_losses(fitter) -> list[float]:
    with torch.no_grad():
        return [float(render_loss(render(fitter.gaussians(), cam).image, target)) for cam, target in zip(fitter.train_cams, fitter.targets)]


def test_the_loss_falls_on_every_training_view(script, tmp_path):
    start = script.SceneFitter(script.parse_args([*TINY, "--iters", "30"]))
    before = train_losses(start)
    fitter = run(script, tmp_path, "--iters", "30", "--densify-from", "100", "--densify-until", "100")
    after = train_losses(fitter)
    assert fitter.step == 30 and fitter.num_gaussians == 210  # no densification asked
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)


def crafted(script, tmp_path, max_gaussians: int = 100):
    """A fitter holding four Gaussians: small + high gradient, large + high gradient, faint, ordinary."""
    fitter = script.SceneFitter(script.parse_args([*TINY, "--iters", "10", "--max-gaussians", str(max_gaussians),
                                                   "--init-points", "4", "--random-points", "0"]))
    small, large = math.log(0.5 * script.PERCENT_DENSE * fitter.extent), math.log(2 * script.PERCENT_DENSE * fitter.extent)
    params = {
        "means": torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.3]]),
        "f_dc": torch.arange(12.0).reshape(4, 3), "f_rest": torch.randn(4, 15, 3, generator=torch.Generator().manual_seed(0)),
        "opacities": torch.tensor([0.0, 0.0, script._logit(script.MIN_OPACITY / 2), 0.0]),
        "scales": torch.tensor([[small] * 3, [large, small, small], [small] * 3, [small] * 3]),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(4, 1),
    }
    fitter.params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fitter.exp_avg = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    fitter.exp_avg_sq = {k: torch.full_like(v, 0.25) for k, v in params.items()}
    fitter.grad_count = torch.tensor([2.0, 2.0, 2.0, 2.0])
    fitter.grad_accum = torch.tensor([3.0, 4.0, 0.0, 0.0]) * fitter.args.grad_threshold  # means 1.5 and 2 x threshold
    fitter.max_radius_px = torch.ones(4)
    return fitter, params


def test_densify_clones_small_splits_large_and_prunes_faint(script, tmp_path):
    fitter, before = crafted(script, tmp_path)
    counts = fitter.densify_and_prune(after_reset=False)
    assert counts == {"cloned": 1, "split": 1, "pruned": 1, "count": 5}
    p = {k: v.detach() for k, v in fitter.params.items()}
    # order: kept originals (0 and 3; 1 was split, 2 pruned), the clone of 0, the two halves of 1
    assert torch.equal(p["means"][:2], before["means"][[0, 3]]) and torch.equal(p["means"][2], before["means"][0])
    assert torch.equal(p["f_dc"][2], before["f_dc"][0]) and torch.equal(p["f_rest"][3:], before["f_rest"][[1, 1]])
    assert torch.allclose(p["scales"][3:], (before["scales"][[1, 1]].exp() / 1.6).log())
    spread = (p["means"][3:] - before["means"][1]).abs() / before["scales"][1].exp()  # in the parent's stds
    assert (spread < 6).all() and not torch.equal(p["means"][3], p["means"][4])
    # Adam moments follow the kept Gaussians; the new ones start from zero
    assert (fitter.exp_avg["means"][:2] == 0.5).all() and (fitter.exp_avg["means"][2:] == 0).all()
    assert (fitter.exp_avg_sq["scales"][2:] == 0).all()
    assert fitter.grad_accum.shape == (5,) and not fitter.grad_accum.any()


def test_densify_respects_the_cap_by_gradient(script, tmp_path):
    fitter, before = crafted(script, tmp_path, max_gaussians=5)  # room for one more: the larger gradient (the split) wins
    assert fitter.densify_and_prune(after_reset=False) == {"cloned": 0, "split": 1, "pruned": 1, "count": 4}


def test_prune_after_reset_drops_what_covers_the_screen(script, tmp_path):
    fitter, _ = crafted(script, tmp_path)
    fitter.grad_accum.zero_()
    fitter.max_radius_px = torch.tensor([1.0, 1.0, 1.0, 16.0])  # the last one covers the 16-px image
    assert fitter.densify_and_prune(after_reset=False)["count"] == 3
    fitter, _ = crafted(script, tmp_path)
    fitter.grad_accum.zero_()
    fitter.max_radius_px = torch.tensor([1.0, 1.0, 1.0, 16.0])
    assert fitter.densify_and_prune(after_reset=True)["count"] == 2


def test_opacity_reset_caps_opacities_and_clears_their_moments(script, tmp_path):
    fitter, _ = crafted(script, tmp_path)
    fitter.reset_opacity()
    assert (torch.sigmoid(fitter.params["opacities"]) <= script.RESET_OPACITY + 1e-6).all()
    assert not fitter.exp_avg["opacities"].any() and (fitter.exp_avg["means"] == 0.5).all()


SCHEDULE = ["--iters", "16", "--densify-from", "3", "--densify-every", "4", "--densify-until", "14", "--opacity-reset-at", "9",
            "--sh-every", "3", "--grad-threshold", "1e-5"]


def test_resume_is_bit_identical_across_densification(script, tmp_path):
    straight = run(script, tmp_path / "a", *SCHEDULE)
    assert straight.num_gaussians != 210  # densification ran
    ckpt = tmp_path / "b" / "state.ckpt"
    stopped = run(script, tmp_path / "b", *SCHEDULE, "--checkpoint", str(ckpt), "--stop-at", "6")
    assert stopped.step == 6 and ckpt.is_file() and not ckpt.with_name(ckpt.name + ".tmp").exists()
    assert not (tmp_path / "b" / "scene.ply").exists()  # a stopped session writes no scene
    resumed = run(script, tmp_path / "b", *SCHEDULE, "--checkpoint", str(ckpt), "--resume")
    assert resumed.step == 16
    for k in script.ATTRS:
        assert torch.equal(straight.params[k], resumed.params[k]), k
        assert torch.equal(straight.exp_avg[k], resumed.exp_avg[k]) and torch.equal(straight.exp_avg_sq[k], resumed.exp_avg_sq[k]), k
    assert torch.equal(straight.grad_accum, resumed.grad_accum)


def test_resume_refuses_another_runs_checkpoint(script, tmp_path):
    ckpt = tmp_path / "state.ckpt"
    run(script, tmp_path, "--iters", "4", "--checkpoint", str(ckpt), "--stop-at", "2")
    with pytest.raises(CompressKitError, match="other arguments"):
        run(script, tmp_path, "--iters", "4", "--seed", "1", "--checkpoint", str(ckpt), "--resume")


def test_writes_the_ply_the_json_and_the_preview(script, tmp_path):
    from compresskit.adapters.gaussians.ply import read_ply

    fitter = run(script, tmp_path, "--iters", "6", "--preview", str(tmp_path / "views.png"))
    scene = read_ply(tmp_path / "scene.ply")
    assert scene.num_gaussians == fitter.num_gaussians and scene.sh_degree == 3
    assert torch.equal(torch.from_numpy(scene.means), fitter.params["means"].detach())
    record = json.loads((tmp_path / "scene.json").read_text())
    assert record["num_gaussians"] == fitter.num_gaussians and record["training"]["iters"] == 6
    assert record["split"]["train"] == [0, 1] and record["split"]["heldout"] == [0]
    assert math.isfinite(record["heldout"]["psnr_db_mean"]) and 0 < record["heldout"]["ssim_mean"] <= 1
    for rig, cams in (("train", fitter.train_cams), ("heldout", fitter.heldout_cams)):
        again = orbit_cameras(**{k: v for k, v in record["cameras"][rig].items()})
        assert all(torch.equal(a.world_to_camera, b.world_to_camera) for a, b in zip(again, cams))
    assert (tmp_path / "views.png").stat().st_size > 0
