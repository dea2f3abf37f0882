"""The gaussians family's preparation step (``--option prune=F``): importance, which Gaussians are kept,
the distilling fine-tune, the saved directory still measured against the unpruned scene, and the
one-line refusals. Tiny random scenes (a few hundred Gaussians) and 16-pixel renders."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("plyfile", reason="3DGS .ply files need plyfile (pip install 'compresskit[gaussians]')")

import compresskit  # noqa: E402
from compresskit import CompressConfig  # noqa: E402
from compresskit.adapters.gaussians.adapter import GaussianSplatAdapter  # noqa: E402
from compresskit.adapters.gaussians.image_metrics import psnr, render_loss  # noqa: E402
from compresskit.adapters.gaussians.prune import PruneSettings, fine_tune, importance, prune_scene  # noqa: E402
from compresskit.adapters.gaussians.render import render, render_views  # noqa: E402
from compresskit.adapters.gaussians.scene import GaussianScene  # noqa: E402
from compresskit.adapters.gaussians.views import fit_camera  # noqa: E402
from compresskit.cli.main import main  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402
from compresskit.io import load_compressed, read_manifest  # noqa: E402

from test_gs_adapter import random_scene  # noqa: E402  (pytest puts this folder on sys.path)

SIZE = 16
FAST = {"prune_size": SIZE}
EVAL = {"eval_size": SIZE}


@pytest.fixture()
def ply(tmp_path):
    path = tmp_path / "scene.ply"
    random_scene().save(path)
    return path


def calibration_cameras(loaded, n=None):
    return [fit_camera(c, SIZE) for c in loaded.extras["views"].calibration[:n]]


def test_importance_is_each_gaussians_blend_weight_summed_over_the_pixels(ply):
    loaded = GaussianSplatAdapter().load(str(ply))
    scene, cams = loaded.model.gaussians, calibration_cameras(loaded, 3)
    scores = importance(scene, cams)
    # the blend weights a_i T_i of a pixel add up to its accumulated alpha
    alpha = sum(float(render(scene, c).alpha.sum()) for c in cams)
    assert scores.shape == (300,) and (scores >= 0).all()
    assert float(scores.sum()) == pytest.approx(alpha, rel=1e-4)
    # one Gaussian alone: its weight at each pixel is its alpha there
    alone = scene.select([int(scores.argmax())]).requires_grad_(False)
    assert float(importance(alone, cams)) == pytest.approx(sum(float(render(alone, c).alpha.sum()) for c in cams), rel=1e-4)
    # the scene's colours do not matter (a black Gaussian still hides what is behind it)
    dark = GaussianScene(scene.means, torch.full((300, 3), -5.0), scene.f_rest, scene.opacities, scene.scales, scene.quats)
    torch.testing.assert_close(importance(dark, cams), scores)


@pytest.mark.parametrize("fraction, kept", [(0.5, 150), (0.3, 210), (0.999, 1)])
def test_pruning_keeps_the_expected_count_and_the_most_important(ply, fraction, kept):
    loaded = GaussianSplatAdapter().load(str(ply))
    teacher, cams = loaded.model.gaussians, calibration_cameras(loaded)
    scores = importance(teacher, cams)
    pruned, record = prune_scene(teacher, cams, PruneSettings(fraction, steps=0, size=SIZE))
    assert pruned.num_gaussians == kept == record["num_gaussians"] and record["num_gaussians_before"] == 300
    order = scores.argsort(descending=True, stable=True)
    expected = order[:kept].sort().values  # the most important, in the scene's order
    torch.testing.assert_close(pruned.means, teacher.means.detach()[expected])
    assert teacher.num_gaussians == 300  # the teacher is left as it was


def test_invisible_gaussians_are_the_ones_dropped(ply):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    scene = loaded.model.gaussians
    hidden = torch.arange(300) % 2 == 1
    with torch.no_grad():
        scene.opacities[hidden] = -10.0  # opacity 4.5e-5 < 1/255: culled from every view
    adapter.prepare(loaded, adapter.prepare_settings({"prune": 0.5, "prune_steps": 0, **FAST}))
    torch.testing.assert_close(loaded.model.gaussians.means, scene.means.detach()[~hidden])


def test_fine_tuning_lowers_the_render_loss_against_the_unpruned_scene_and_is_deterministic(ply):
    loaded = GaussianSplatAdapter().load(str(ply))
    teacher, cams = loaded.model.gaussians, calibration_cameras(loaded, 8)
    targets = render_views(teacher, cams)

    def loss(scene):
        with torch.no_grad():
            return float(render_loss(render_views(scene, cams), targets))

    pruned, _ = prune_scene(teacher, cams, PruneSettings(0.5, steps=0, size=SIZE))
    tuned, record = prune_scene(teacher, cams, PruneSettings(0.5, steps=40, size=SIZE))
    assert loss(tuned) < 0.9 * loss(pruned)
    assert record["loss_last"] < record["loss_first"]
    again, _ = prune_scene(teacher, cams, PruneSettings(0.5, steps=40, size=SIZE))
    for attr in ("means", "f_rest", "opacities", "quats"):
        assert torch.equal(getattr(again, attr), getattr(tuned, attr))
        assert not getattr(tuned, attr).requires_grad
    assert fine_tune(pruned, cams, list(targets), PruneSettings(0.5, steps=0)) == []  # no steps: unchanged


def test_a_pruned_directory_is_evaluated_against_the_original_scene(ply, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", "--model", str(ply), "--method", "pq", "--bits", "2", "--preset", "none", "--out", str(out),
          "--option", "prune=0.5", "--option", "prune_steps=10", "--option", "prune_size=16", "--option", "eval_size=16", "--json"])
    result = json.loads(capsys.readouterr().out)
    prep = result["report"]["preparation"]
    assert prep["num_gaussians"] == 150 and prep["num_gaussians_before"] == 300 and prep["steps"] == 10
    assert result["report"]["metrics"]["before"]["num_gaussians"] == 300  # "before" is the unpruned scene
    assert read_manifest(out)["totals"]["preparation"] == prep
    scene_json = json.loads((out / "architecture" / "scene.json").read_text())
    assert scene_json["num_gaussians"] == 150 and scene_json["original"]["num_gaussians"] == 300 and scene_json["preparation"] == prep

    main(["eval", str(out), "--option", "eval_size=16", "--json"])
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    after = result["report"]["metrics"]["after"]
    assert {k: metrics[k] for k in ("psnr", "ssim", "bits_per_gaussian")} == pytest.approx({k: after[k] for k in ("psnr", "ssim", "bits_per_gaussian")}, abs=1e-4)
    # against the original .ply: its renders, its bytes, its float32 attributes
    reloaded, _ = load_compressed(out)
    cams = [fit_camera(c, SIZE) for c in reloaded.extras["views"].evaluation]
    original = GaussianScene.load(ply)
    mine, theirs = render_views(reloaded.model.gaussians, cams).clamp(0, 1), render_views(original, cams).clamp(0, 1)
    assert metrics["psnr"] == pytest.approx(float(psnr(mine, theirs).mean()), abs=1e-4) and metrics["psnr"] < 100
    assert metrics["compression_ratio"] == pytest.approx(ply.stat().st_size / (out / "model.safetensors").stat().st_size)
    assert metrics["attribute_ratio"] == pytest.approx(300 * 59 * 32 / (metrics["bits_per_gaussian"] * 150))
    assert metrics["num_gaussians"] == 150


def test_calibration_renders_its_targets_from_the_unpruned_scene(ply):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    spec = adapter.calib_spec(n_samples=2, options={"calib_size": SIZE})
    before = adapter.calibration_batches(loaded, spec)
    adapter.prepare(loaded, adapter.prepare_settings({"prune": 0.5, "prune_steps": 0, **FAST}))
    after = adapter.calibration_batches(loaded, spec)
    assert loaded.model.gaussians.num_gaussians == 150
    for b, a in zip(before, after):
        assert torch.equal(b["target"], a["target"])


@pytest.mark.parametrize("options, message", [
    ({"prune": 1.0}, "in [0, 1)"),
    ({"prune": -0.1}, "in [0, 1)"),
    ({"prune": 0.5, "prune_steps": -1}, "prune_steps must be >= 0"),
    ({"prune": 0.5, "prune_lr": 0.0}, "prune_lr must be a positive"),
    ({"prune": 0.5, "prune_size": 0}, "prune_size must be a positive"),
    ({"prune_steps": 100}, "prune_steps would do nothing"),
    ({"prune": 0.5, "prune_steps": 0, "prune_lr": 2.0}, "prune_lr would do nothing"),
    ({"prune": "half"}, "option 'prune' must be a float"),
    ({"prune_rate": 0.5}, "no preparation option 'prune_rate'"),
    ({"prune": 0.5, "prune_target": "truth"}, "option 'prune_target' must be one of renders, ground-truth"),
    ({"prune_target": "ground-truth"}, "prune_target would do nothing"),
    ({"order": "z-curve"}, "option 'order' must be one of keep, morton"),
    ({"prune": 0.5, "prune_steps": 0, "prune_target": "ground-truth"}, "prune_target would do nothing: prune_steps is 0"),
    ({"prune": 0.5, "prune_steps": 1, "prune_target": "ground-truth"}, "prune_target=ground-truth: this scene has no ground-truth images (the cameras come from no 3DGS cameras.json"),
])
def test_bad_preparation_options_are_one_clear_error(ply, options, message):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    with pytest.raises(CompressKitError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        compresskit.compress(loaded, CompressConfig(method="pq", bits=2, prepare=options), adapter=adapter)
    assert loaded.model.gaussians.num_gaussians == 300 and not compresskit.nn.quantized_tensors(loaded.model)


def test_preparation_options_need_a_family_that_has_them():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(CompressKitError, match="need the model family's adapter"):
        compresskit.compress(model, CompressConfig(method="rtn", bits=4, prepare={"prune": 0.5}))
    with pytest.raises(CompressKitError, match="needs the LoadedModel"):
        compresskit.compress(torch.nn.Module(), CompressConfig(prepare={"prune": 0.5}), adapter=GaussianSplatAdapter())


@pytest.mark.parametrize("argv, message", [
    (["--model", "{ply}", "--option", "prune=1"], "option prune must be a fraction"),
    (["--model", "{ply}", "--option", "prune=0.5", "--option", "prune_steps=-3"], "prune_steps must be >= 0"),
    (["--model", "{ply}", "--option", "prune_steps=5"], "would do nothing"),
    (["--model", "fmnist-dit", "--option", "prune=0.5"], "adapter has no option 'prune'"),
    (["--model", "{ply}", "--option", "prune=0.5", "--option", "prune_target=gt"], "must be one of renders, ground-truth"),
])
def test_cli_refuses_bad_preparation_options_with_one_line_and_nothing_written(ply, tmp_path, capsys, argv, message):
    argv = ["quantize", *[a.format(ply=ply) for a in argv], "--preset", "none", "--out", str(tmp_path / "o")]
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0]
    assert set(tmp_path.iterdir()) == before


def test_fine_tuning_trains_towards_the_ground_truth_when_asked(ply):
    loaded = GaussianSplatAdapter().load(str(ply))
    teacher, cams = loaded.model.gaussians, calibration_cameras(loaded, 8)
    truth = [torch.rand(3, c.height, c.width, generator=torch.Generator().manual_seed(i)) for i, c in enumerate(cams)]  # not the scene's renders
    settings = PruneSettings(0.5, steps=40, size=SIZE, target="ground-truth")
    tuned, record = prune_scene(teacher, cams, settings, truth=truth)
    assert record["target"] == "ground-truth" and "ground-truth images" in record["fine_tune_target"]
    distilled, _ = prune_scene(teacher, cams, PruneSettings(0.5, steps=40, size=SIZE))
    with torch.no_grad():
        images = torch.stack(truth)
        assert render_loss(render_views(tuned, cams), images) < render_loss(render_views(distilled, cams), images)
    with pytest.raises(CompressKitError, match="no ground-truth images"):
        prune_scene(teacher, cams, settings)


def test_calibration_targets_are_the_ground_truth_images_when_asked(ply):
    from compresskit.adapters.gaussians.procedural import render_ground_truth

    adapter = GaussianSplatAdapter()
    reference = adapter.load("ref-scene")
    spec = adapter.calib_spec(n_samples=2, options={"calib_size": SIZE, "calib_target": "ground-truth"})
    batches = adapter.calibration_batches(reference, spec)
    cams = reference.extras["views"].calibration
    for b in batches:
        (i,) = b["camera_index"].tolist()
        assert torch.equal(b["target"], render_ground_truth(fit_camera(cams[i], SIZE))[None]) and b["target"].shape == (1, 3, SIZE, SIZE)
    renders = adapter.calibration_batches(reference, adapter.calib_spec(n_samples=2, options={"calib_size": SIZE}))
    assert [b["camera_index"] for b in renders] == [b["camera_index"] for b in batches]  # the same cameras
    assert not torch.equal(renders[0]["target"], batches[0]["target"])

    other = adapter.load(str(ply))  # a scene without ground truth
    with pytest.raises(CompressKitError, match="calib_target=ground-truth: this scene has no ground-truth images"):
        adapter.calibration_batches(other, spec)
    with pytest.raises(CompressKitError, match="'calib_target' must be one of renders, ground-truth"):
        adapter.calib_spec(options={"calib_target": "images"})
