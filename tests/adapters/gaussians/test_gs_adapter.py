"""The gaussians adapter through the front door and the CLI, on a tiny random scene (a few hundred
Gaussians, 16-pixel renders): targets and their methods, save / load / decompress round trips,
render-loss calibration, cameras from a 3DGS cameras.json, and the one-line errors."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("plyfile", reason="3DGS .ply files need plyfile (pip install 'compresskit[gaussians]')")

import compresskit  # noqa: E402
from compresskit import CompressConfig  # noqa: E402
from compresskit.adapters import adapter_for  # noqa: E402
from compresskit.adapters.gaussians.adapter import GaussianSplatAdapter  # noqa: E402
from compresskit.adapters.gaussians.ply import read_ply  # noqa: E402
from compresskit.adapters.gaussians.scene import GaussianScene  # noqa: E402
from compresskit.calib.config import CalibrationConfig  # noqa: E402
from compresskit.cli.main import main  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

EVAL = {"eval_size": 16}


def random_scene(n: int = 300, seed: int = 0) -> GaussianScene:
    g = torch.Generator().manual_seed(seed)
    return GaussianScene(
        torch.randn(n, 3, generator=g) * 0.5, torch.randn(n, 3, generator=g) * 0.5, torch.randn(n, 15, 3, generator=g) * 0.1,
        torch.randn(n, generator=g) + 1, torch.randn(n, 3, generator=g) * 0.3 - 2.5, torch.randn(n, 4, generator=g),
    )


@pytest.fixture()
def ply(tmp_path):
    path = tmp_path / "scene.ply"
    random_scene().save(path)
    return path


def compressed(ply, **config):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    report = compresskit.compress(loaded, CompressConfig(**{"method": "pq", "bits": 2, **config}), adapter=adapter)
    return adapter, loaded, report


def test_the_adapter_is_picked_from_a_ply_and_attributes_are_the_targets(ply):
    assert adapter_for(str(ply)) is GaussianSplatAdapter
    _, loaded, report = compressed(ply)
    methods = {layer.name: (layer.method, layer.shape) for layer in report.layers}
    assert methods == {
        "gaussians.f_rest": ("pq", (300, 15, 3)), "gaussians.f_dc": ("pq", (300, 3)), "gaussians.scales": ("pq", (300, 3)),
        "gaussians.quats": ("pq", (300, 4)), "gaussians.opacities": ("rtn", (1, 300)), "gaussians.means": ("rtn", (3, 300)),
    }
    scene = loaded.model.gaussians
    assert scene.opacities.shape == (300,) and scene.f_rest.shape == (300, 15, 3)
    # 16-bit positions: within half a step of a 2^16-level grid over each coordinate's range
    original = read_ply(ply).means
    step = (original.max(0) - original.min(0)) / 65535
    assert (scene.means.detach().numpy() - original).__abs__().max() <= step.max() * 0.51 + 1e-6


def test_the_users_override_and_exclude_win_over_the_familys_methods(ply):
    _, loaded, report = compressed(ply, overrides=(("gaussians.opacities", {"method": "rtn", "bits": 4}),), exclude=("gaussians.means",))
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["gaussians.opacities"].params["bits"] == 4
    assert "gaussians.means" not in by_name and "gaussians.means" in report.kept_dense


def test_evaluation_compares_with_the_uncompressed_renders_and_counts_bytes(ply, tmp_path):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    before = adapter.evaluate(loaded, adapter.eval_spec(options=EVAL))
    assert before["psnr"] == 100.0 and before["ssim"] == pytest.approx(1.0) and before["compression_ratio"] == 1.0
    assert "psnr_drop_db_skipped" in before  # a random scene has no ground truth
    report = compresskit.compress(loaded, CompressConfig(method="pq", bits=2), adapter=adapter)
    after = adapter.evaluate(loaded, adapter.eval_spec(options=EVAL))
    assert 10 < after["psnr"] < 60 and after["ssim"] < 1
    fp32_bits = 300 * 59 * 32
    assert after["attribute_ratio"] == pytest.approx(fp32_bits / after["bits_per_gaussian"] / 300)
    out = tmp_path / "c"
    compresskit.save(loaded.model, report, out, source={"model": str(ply), "adapter": "gaussians"},
                     save_architecture=lambda d: adapter.save_architecture(loaded, d))
    from compresskit.io import load_compressed

    reloaded, _ = load_compressed(out)
    again = adapter.evaluate(reloaded, adapter.eval_spec(options=EVAL))
    assert again["psnr"] == pytest.approx(after["psnr"], abs=1e-4)
    assert again["compression_ratio"] == pytest.approx(ply.stat().st_size / (out / "model.safetensors").stat().st_size)
    for attr in ("means", "f_rest", "opacities"):
        assert torch.equal(getattr(reloaded.model.gaussians, attr), getattr(loaded.model.gaussians, attr))


def test_render_loss_calibration_trains_the_codebooks_and_lowers_the_loss(ply):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    calibration = CalibrationConfig(n_samples=4, batch_size=2, m_objective="task", em_rounds=1, m_steps=6, lr=3e-3, m_batch=2,
                                    options={"calib_size": 16})
    plain = adapter.load(str(ply))
    compresskit.compress(plain, CompressConfig(method="pq", bits=1), adapter=adapter)
    compresskit.compress(loaded, CompressConfig(method="pq", bits=1), adapter=adapter, calibration=calibration)
    batches = adapter.calibration_batches(loaded, adapter.calib_spec(n_samples=4, options={"calib_size": 16}))
    with torch.no_grad():
        loss_plain = sum(float(adapter.task_loss(plain.model, b)) for b in batches)
        loss_em = sum(float(adapter.task_loss(loaded.model, b)) for b in batches)
    assert loss_em < loss_plain


def test_quantization_in_the_loop_trains_every_attribute_at_3dgs_rates_and_saves_plain_codes(ply, tmp_path):
    """latent_steps on a scene: the latents of the bare-tensor targets (codebook and scalar ones) train
    through the renderer at the family's per-attribute rates; what is saved is codes and tables, and the
    directory reads back to the same renders."""
    from compresskit.adapters.gaussians.prune import LR, LR_MEANS, camera_extent
    from compresskit.io import load_compressed

    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    assert adapter.latent_lr(loaded, "gaussians.f_rest") == LR["f_rest"]
    assert adapter.latent_lr(loaded, "gaussians.opacities") == LR["opacities"]
    assert adapter.latent_lr(loaded, "gaussians.means") == pytest.approx(LR_MEANS[1] * camera_extent(loaded.extras["views"].calibration))
    calibration = CalibrationConfig(n_samples=4, batch_size=2, m_objective="task", em_rounds=1, m_steps=2, lr=3e-3, m_batch=1,
                                    latent_steps=8, reassign_every=2, options={"calib_size": 16})
    em_only = adapter.load(str(ply))
    compresskit.compress(em_only, CompressConfig(method="pq", bits=1), adapter=adapter,
                         calibration=CalibrationConfig(n_samples=4, batch_size=2, m_objective="task", em_rounds=1, m_steps=2, lr=3e-3,
                                                       m_batch=1, options={"calib_size": 16}))
    report = compresskit.compress(loaded, CompressConfig(method="pq", bits=1), adapter=adapter, calibration=calibration)
    assert report.calibration["latent_steps"] == 8
    batches = adapter.calibration_batches(loaded, adapter.calib_spec(n_samples=4, options={"calib_size": 16}))
    with torch.no_grad():
        loss_em = sum(float(adapter.task_loss(em_only.model, b)) for b in batches)
        loss_loop = sum(float(adapter.task_loss(loaded.model, b)) for b in batches)
    assert loss_loop < loss_em
    out = tmp_path / "looped"
    compresskit.save(loaded.model, report, out, source={"model": str(ply), "resolved": str(ply), "adapter": adapter.name},
                     save_architecture=lambda d: adapter.save_architecture(loaded, d))
    reloaded, _ = load_compressed(out)
    index = torch.tensor([0])
    with torch.no_grad():
        assert torch.allclose(reloaded.model(index, 16), loaded.model(index, 16), atol=1e-5)


def write_cameras_json(directory, n=10):
    """A 3DGS ``cameras.json`` of ``n`` 40x30 cameras on a circle around the origin; returns its entries."""
    cams = []
    for i in range(n):
        angle = 2 * math.pi * i / n
        centre = [3 * math.cos(angle), 3 * math.sin(angle), 0.5]
        forward = torch.tensor([-c for c in centre])
        forward = forward / forward.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        rotation = torch.stack([right, down, forward], dim=1)  # camera-to-world, columns the camera axes
        cams.append({"id": i, "img_name": f"{i:05d}", "width": 40, "height": 30, "position": centre, "rotation": rotation.tolist(), "fx": 35.0, "fy": 35.0})
    (directory / "cameras.json").write_text(json.dumps(cams))
    return cams


def test_cameras_come_from_a_3dgs_cameras_json_with_every_8th_held_out(ply):
    cams = write_cameras_json(ply.parent)
    views = GaussianSplatAdapter().load(str(ply)).extras["views"]
    assert len(views.evaluation) == 2 and len(views.calibration) == 8 and views.source.startswith("cameras.json")
    assert (views.evaluation[1].width, views.evaluation[1].height) == (40, 30)
    torch.testing.assert_close(views.evaluation[1].center.double(), torch.tensor(cams[8]["position"], dtype=torch.float64), atol=1e-5, rtol=0)
    assert views.images == () and "no cfg_args" in views.images_note


def write_dataset(ply, n=10, white=False):
    """A 3DGS output beside ``ply`` (cameras.json, cfg_args) and its dataset's training images
    (random 80x60 RGBA PNGs in ``dataset/images``); returns the image tensors [4, 60, 80] by camera."""
    from PIL import Image

    write_cameras_json(ply.parent, n)
    (ply.parent / "cfg_args").write_text(f"Namespace(eval=True, images='images', model_path='out', sh_degree=3, source_path='dataset', white_background={white})")
    folder = ply.parent / "dataset" / "images"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    images = []
    for i in range(n):
        rgba = (torch.rand(60, 80, 4, generator=g) * 255).to(torch.uint8)
        Image.fromarray(rgba.numpy(), "RGBA").save(folder / f"{i:05d}.png")
        images.append(rgba.permute(2, 0, 1).float() / 255)
    return images


def test_training_images_of_a_3dgs_output_are_the_ground_truth(ply, tmp_path, capsys):
    from compresskit.adapters.gaussians.views import fit_camera, read_image

    images = write_dataset(ply)
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    views = loaded.extras["views"]
    calibration_ids = [i for i in range(10) if i % 8]
    assert [f.name for f in views.images] == [f"{i:05d}.png" for i in (*calibration_ids, 0, 8)] and views.images_note == ""
    full = read_image(views.images[0], dataclasses.replace(views.calibration[0], width=80, height=60))
    rgb, alpha = images[calibration_ids[0]][:3], images[calibration_ids[0]][3:]
    torch.testing.assert_close(full, rgb * alpha, atol=1e-6, rtol=0)  # same size: no resampling, alpha over black

    spec = adapter.calib_spec(n_samples=3, options={"calib_size": 16, "calib_target": "ground-truth"})
    for b in adapter.calibration_batches(loaded, spec):
        (i,) = b["camera_index"].tolist()
        camera = fit_camera(views.calibration[i], 16)
        assert b["target"].shape == (1, 3, 12, 16) and torch.equal(b["target"][0], read_image(views.images[i], camera))

    out = tmp_path / "q"
    main(["quantize", "--model", str(ply), "--method", "pq", "--bits", "2", "--preset", "none", "--out", str(out), "--option", "eval_size=16",
          "--option", "prune=0.5", "--option", "prune_steps=5", "--option", "prune_size=16", "--option", "prune_target=ground-truth", "--json"])
    after = json.loads(capsys.readouterr().out)["report"]["metrics"]["after"]
    assert after["psnr_drop_db"] == pytest.approx(after["psnr_gt_original"] - after["psnr_gt"]) and 0 < after["psnr_gt"] < 100
    main(["eval", str(out), "--option", "eval_size=16", "--json"])  # the directory keeps where the images are
    assert json.loads(capsys.readouterr().out)["metrics"]["psnr_drop_db"] == pytest.approx(after["psnr_drop_db"], abs=1e-4)


@pytest.mark.parametrize("damage, note", [
    ("missing", "no image 00003.* in"),
    ("white", "trained on a white background"),
    ("no-source", "names no source_path"),
])
def test_a_dataset_without_usable_images_is_one_clear_error(ply, tmp_path, damage, note, capsys):
    write_dataset(ply, white=damage == "white")
    if damage == "missing":
        (ply.parent / "dataset" / "images" / "00003.png").unlink()
    if damage == "no-source":
        (ply.parent / "cfg_args").write_text("Namespace(eval=True)")
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    assert loaded.extras["views"].images == () and note in loaded.extras["views"].images_note
    with pytest.raises(CompressKitError, match="calib_target=ground-truth: this scene has no ground-truth images"):
        adapter.calibration_batches(loaded, adapter.calib_spec(n_samples=2, options={"calib_target": "ground-truth"}))
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", str(ply), "--method", "rtn", "--bits", "4", "--preset", "none", "--out", str(out),
              "--option", "prune=0.5", "--option", "prune_target=ground-truth", "--option", "prune_size=16"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and note in errors[0] and not out.exists()
    assert "psnr_drop_db" not in adapter.evaluate(loaded, adapter.eval_spec(options=EVAL))


def test_cli_quantize_eval_render_and_decompress(ply, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", "--model", str(ply), "--method", "vq", "--bits", "2", "--preset", "none", "--out", str(out), "--option", "eval_size=16", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] == "gaussians" and len(result["report"]["layers"]) == 6
    main(["render", str(out), "--compare", "--views", "2", "--size", "16", "--out", str(tmp_path / "v.png"), "--json"])
    rendered = json.loads(capsys.readouterr().out)
    assert rendered["views"] == 2 and all(10 < p < 100 for p in rendered["psnr_db"])
    main(["decompress", str(out), "--out", str(tmp_path / "d.ply")])
    decoded = read_ply(tmp_path / "d.ply")
    loaded, _ = compresskit.io.load_compressed(out)
    assert (decoded.f_rest == loaded.model.gaussians.f_rest.detach().numpy()).all()
    with pytest.raises(SystemExit) as exit_info:
        main(["decompress", str(out), "--out", str(tmp_path / "d.ply")])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err


def test_cli_overrides_give_each_attribute_its_own_codebook_shape(ply, tmp_path, capsys):
    """The compact layout from the CLI: one whole-vector codebook per attribute, d given per target."""
    out = tmp_path / "q"
    main(["quantize", "--model", str(ply), "--method", "pq", "--bits", "1", "--preset", "none", "--no-eval", "--out", str(out), "--json",
          "--override", "gaussians.f_rest=pq:1,d=45,k=16", "--override", "gaussians.quats=pq:1,d=4,k=16"])
    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["report"]["layers"]}
    loaded, _ = compresskit.io.load_compressed(out)
    tensors = {name: qt.quantizer for name, (_, _, qt) in compresskit.nn.quantized_tensors(loaded.model).items()}
    assert (tensors["gaussians.f_rest"].d, tensors["gaussians.f_rest"].k) == (45, 16)
    assert (tensors["gaussians.quats"].d, tensors["gaussians.quats"].k) == (4, 16)
    assert tensors["gaussians.f_dc"].k == 256  # the others keep the method's layout
    assert layers["gaussians.f_rest"]["method"] == "pq"


@pytest.mark.parametrize("argv, message", [
    (["render", "{bad}", "--out", "{tmp}/v.png"], "not a readable .ply"),
    (["quantize", "--model", "{bad}", "--preset", "none", "--out", "{tmp}/o"], "not a readable .ply"),
    (["render", "{ply}", "--views", "0", "--out", "{tmp}/v.png"], "--views must be"),
    (["decompress", "{ply}", "--out", "{tmp}/x.txt"], "written as a .ply file"),
    (["quantize", "--model", "{ply}", "--override", "gaussians.f_rest=pq:1,width=45", "--preset", "none", "--out", "{tmp}/o"], "unknown parameter(s) width"),
])
def test_cli_errors_are_one_line_with_exit_2_and_nothing_written(ply, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.ply"
    bad.write_text("this is not a ply\n")
    argv = [a.format(bad=bad, ply=ply, tmp=tmp_path) for a in argv]
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # after any progress lines
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0]
    assert set(tmp_path.iterdir()) == before


def test_too_many_calibration_views_is_one_clear_error(ply):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    with pytest.raises(CompressKitError, match="calibration cameras"):
        adapter.calibration_batches(loaded, adapter.calib_spec(n_samples=500))


def test_pq_runs_without_the_pool_unless_asked(ply):
    adapter = GaussianSplatAdapter()
    pq_params = lambda report: {r.name: r.params.get("pool") for r in report.layers if r.method == "pq"}  # noqa: E731
    plain = pq_params(compresskit.compress(adapter.load(str(ply)), CompressConfig(method="pq", bits=1), adapter=adapter))
    assert plain and set(plain.values()) == {False}  # the family's default: no pool on the narrow attributes
    asked = compresskit.compress(adapter.load(str(ply)), CompressConfig(method="pq", bits=1, method_defaults={"pq": {"pool": True}}), adapter=adapter)
    assert set(pq_params(asked).values()) == {True}  # --param pool=true wins
