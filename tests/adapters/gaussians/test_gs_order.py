"""``--option order=morton``: the Gaussians stored along a Morton curve, and the ``morton`` quantizer on
positions coding them as key gaps. Tiny random scenes and 16-pixel renders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("plyfile", reason="3DGS .ply files need plyfile (pip install 'compresskit[gaussians]')")

from compresskit.adapters.gaussians.adapter import GaussianSplatAdapter  # noqa: E402
from compresskit.adapters.gaussians.ply import ATTRIBUTES  # noqa: E402
from compresskit.adapters.gaussians.render import render_views  # noqa: E402
from compresskit.adapters.gaussians.scene import GaussianScene  # noqa: E402
from compresskit.adapters.gaussians.views import fit_camera  # noqa: E402
from compresskit.cli.main import main  # noqa: E402
from compresskit.quantizers.morton import ORDER_BITS, grid, grid_codes, morton_keys, morton_order  # noqa: E402

from test_gs_adapter import random_scene  # noqa: E402  (pytest puts this folder on sys.path)

SIZE = 16


@pytest.fixture()
def ply(tmp_path):
    path = tmp_path / "scene.ply"
    random_scene().save(path)
    return path


def rows(scene: GaussianScene) -> torch.Tensor:
    """Every attribute of each Gaussian in one row, rows sorted: the scene as a set."""
    flat = torch.cat([getattr(scene, name).detach().reshape(scene.num_gaussians, -1) for name in ATTRIBUTES], 1)
    return flat[np.lexsort(flat.T.numpy()[::-1])]


def test_morton_order_keeps_the_gaussians_and_the_pictures_and_sorts_the_positions(ply):
    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    before = loaded.model.gaussians
    record = adapter.prepare(loaded, adapter.prepare_settings({"order": "morton"}))
    after = loaded.model.gaussians
    assert record == {"order": "morton"} and loaded.extras["preparation"] == record
    assert torch.equal(rows(after), rows(before)) and not torch.equal(after.means, before.means)
    assert not any(p.requires_grad for p in after.parameters())
    W = after.means.detach().T
    keys = morton_keys(grid_codes(W, *grid(W, ORDER_BITS), ORDER_BITS), ORDER_BITS)
    assert (np.diff(keys) >= 0).all()
    cams = [fit_camera(c, SIZE) for c in loaded.extras["views"].evaluation]
    assert torch.allclose(render_views(after, cams), render_views(before, cams), atol=1e-5)
    assert adapter.prepare(adapter.load(str(ply)), adapter.prepare_settings({})) == {}  # the default keeps the .ply's order


def quantize(ply, out, capsys, *extra):
    main(["quantize", "--model", str(ply), "--method", "pq", "--bits", "2", "--preset", "none", "--out", str(out),
          "--override", "gaussians.means=morton:12", "--option", f"eval_size={SIZE}", "--json", *extra])
    return json.loads(capsys.readouterr().out)


def test_positions_in_morton_order_cost_less_and_round_trip_through_the_cli(ply, tmp_path, capsys):
    plain = quantize(ply, tmp_path / "plain", capsys)
    ordered = quantize(ply, tmp_path / "ordered", capsys, "--option", "order=morton")
    bits = {name: {layer["name"]: layer for layer in result["report"]["layers"]}["gaussians.means"]["size"]["total_bits"]
            for name, result in (("plain", plain), ("ordered", ordered))}
    assert bits["ordered"] < bits["plain"] - 300 * 4  # a gap costs about log2(300) - 2 bits less than 36
    assert (tmp_path / "ordered" / "model.safetensors").stat().st_size < (tmp_path / "plain" / "model.safetensors").stat().st_size
    after = ordered["report"]["metrics"]["after"]
    main(["eval", str(tmp_path / "ordered"), "--option", f"eval_size={SIZE}", "--json"])
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["psnr"] == pytest.approx(after["psnr"], abs=1e-4) and metrics["bits_per_gaussian"] == pytest.approx(after["bits_per_gaussian"])
    main(["decompress", str(tmp_path / "ordered"), "--out", str(tmp_path / "d.ply")])
    original, decoded = GaussianScene.load(ply).means.detach(), GaussianScene.load(tmp_path / "d.ply").means.detach()
    cell = (original.amax(0) - original.amin(0)) / 2**12
    assert ((decoded - original[morton_order(original)]).abs() <= cell / 2 + 1e-6).all()  # the .ply's points, in Morton order, to half a cell


def test_reports_after_calibration_give_the_size_the_codes_now_have(ply):
    """An EM round may move points across cells; a report then counts the stream those codes make."""
    import compresskit
    from compresskit import CompressConfig
    from compresskit.calib.calibrator import sized_as_stored
    from compresskit.nn import quantized_tensors

    adapter = GaussianSplatAdapter()
    loaded = adapter.load(str(ply))
    config = CompressConfig(method="pq", bits=2, overrides=(("gaussians.means", {"method": "morton", "bits": 12}),), prepare={"order": "morton"})
    report = compresskit.compress(loaded, config, adapter=adapter)
    quantizer = quantized_tensors(loaded.model)["gaussians.means"][2].quantizer
    layer = {r.name: r for r in report.layers}["gaussians.means"]
    assert layer.extra["coding_"] == "rice" and layer.size == quantizer.size_report()
    quantizer.codes_.copy_(quantizer.codes_.flip(1))  # the same points, backwards: every gap negative
    after = {r.name: r for r in sized_as_stored(loaded.model, report.layers)}
    assert after["gaussians.means"].extra["coding_"] != "rice"
    assert after["gaussians.means"].size == quantizer.size_report() and after["gaussians.means"].size.total_bits > layer.size.total_bits
    assert after["gaussians.f_rest"].size == {r.name: r for r in report.layers}["gaussians.f_rest"].size


def test_quantization_in_the_loop_keeps_the_sorted_positions_codes(ply):
    """``morton`` declares ``trains_in_loop = False``: the latent phase trains the other attributes and
    leaves the positions' codes as fitted, so the stream stays in Morton order."""
    import compresskit
    from compresskit import CalibrationConfig, CompressConfig
    from compresskit.nn import quantized_tensors

    adapter = GaussianSplatAdapter()
    config = CompressConfig(method="pq", bits=1, overrides=(("gaussians.means", {"method": "morton", "bits": 12}),), prepare={"order": "morton"})
    plain, looped = adapter.load(str(ply)), adapter.load(str(ply))
    compresskit.compress(plain, config, adapter=adapter)
    calibration = CalibrationConfig(n_samples=4, batch_size=2, m_objective="task", em_rounds=1, m_steps=1, lr=3e-3, m_batch=1,
                                    latent_steps=6, reassign_every=2, latent_lr=0.05, options={"calib_size": SIZE})
    report = compresskit.compress(looped, config, adapter=adapter, calibration=calibration)
    before, after = quantized_tensors(plain.model), quantized_tensors(looped.model)
    assert torch.equal(after["gaussians.means"][2].quantizer.codes_, before["gaussians.means"][2].quantizer.codes_)
    assert not torch.equal(after["gaussians.opacities"][2].quantizer.codes_, before["gaussians.opacities"][2].quantizer.codes_)
    assert {r.name: r for r in report.layers}["gaussians.means"].extra["escaped_"] == 0
