"""A family's settings for a named preset (``Adapter.preset_settings``): shared recipe < family < user."""
from __future__ import annotations

import pytest

from compresskit import CalibrationConfig
from compresskit.adapters import get_adapter
from compresskit.adapters.base import Adapter
from compresskit.cli.run import QuantizeRequest, build_configs
from compresskit.errors import CompressKitError


class _Family(Adapter):
    """A family with settings for ``best`` only; it is never loaded, calibrated or evaluated."""

    name = "preset-family"
    preset_settings = {"best": ({"m_steps": 7, "lr": 3e-3}, "a family that trains longer")}

    def load(self, spec):
        raise NotImplementedError

    def calibration_batches(self, loaded, data):
        raise NotImplementedError

    def evaluate(self, loaded, spec):
        raise NotImplementedError


def test_family_settings_sit_between_the_shared_recipe_and_the_callers():
    family = _Family()
    shared = CalibrationConfig.preset("best")
    got = family.calibration_preset("best", lr=1e-5)
    assert (got.m_steps, got.lr) == (7, 1e-5)  # the family's m_steps, the caller's lr
    assert got.m_objective == shared.m_objective and got.m_samples == shared.m_samples  # the rest is the shared recipe
    assert family.calibration_preset("fast") == CalibrationConfig.preset("fast")  # no family settings for fast


def test_a_family_setting_that_makes_the_preset_invalid_is_refused():
    class Broken(_Family):
        preset_settings = {"fast": ({"lr": 1e-3}, "an M-step setting on a preset without an M-step")}

    with pytest.raises(CompressKitError, match="would do nothing"):
        Broken().calibration_preset("fast")


def test_a_family_setting_is_not_refused_as_the_callers_would_be():
    class Codes(_Family):
        preset_settings = {"fast": ({"e_init": "feedback"}, "a family whose codebook layers start from feedback codes")}

    fast = Codes().calibration_preset("fast")
    assert fast.e_init == "feedback" and fast.from_family == {"e_init"}
    assert "from_family" not in fast.to_dict()  # reports and resume checks see the settings only
    assert fast.with_settings({"e_sweeps": 0}).e_sweeps == 0  # the family's e_init is idle then, not the caller's mistake
    with pytest.raises(CompressKitError, match="e_init would do nothing"):  # given by the caller, it is refused again
        fast.with_settings({"e_init": "feedback", "e_sweeps": 0})
    with pytest.raises(CompressKitError, match="unknown calibration setting"):
        fast.with_settings({"from_family": frozenset()})


def test_the_cli_preset_of_a_diffusion_model_is_the_measured_distillation():
    adapter = get_adapter("dit")()
    _, best, _ = build_configs(QuantizeRequest(model="fmnist-dit", preset="best", evaluate=False), adapter)
    assert (best.m_objective, best.m_steps, best.m_samples, best.m_batch, best.n_samples) == ("distill", 400, 512, 16, 64)
    _, fast, _ = build_configs(QuantizeRequest(model="fmnist-dit", evaluate=False), adapter)
    assert fast.n_samples == 64 and fast.m_objective is None
    assert best.e_init == fast.e_init == "feedback" and "e_init" in fast.from_family  # codebook layers start from feedback codes
    _, plain, _ = build_configs(QuantizeRequest(model="fmnist-dit", calib_set={"e_init": "nearest"}, evaluate=False), adapter)
    assert plain.e_init == "nearest" and "e_init" not in plain.from_family  # the caller's choice wins, and is the caller's
    _, mine, _ = build_configs(
        QuantizeRequest(model="fmnist-dit", preset="best", calib_set={"m_steps": 10}, calib_samples=8, evaluate=False), adapter
    )
    assert (mine.m_steps, mine.n_samples, mine.m_samples) == (10, 8, 512)  # --calib-set and --calib-samples win


def test_families_without_settings_get_the_shared_presets():
    lm = get_adapter("lm")()
    assert lm.calibration_preset("best") == CalibrationConfig.preset("best")


def test_the_cli_preset_of_a_scene_is_render_loss_training_with_quantization_in_the_loop():
    pytest.importorskip("plyfile", reason="3DGS .ply files need plyfile (pip install 'compresskit[gaussians]')")
    adapter = get_adapter("gaussians")()
    _, best, _ = build_configs(QuantizeRequest(model="ref-scene", preset="best", evaluate=False), adapter)
    assert (best.m_objective, best.latent_steps, best.m_steps, best.m_batch, best.n_samples) == ("task", 1000, 1000, 1, 64)
    assert best.options == {"calib_size": 96}
    _, mine, _ = build_configs(
        QuantizeRequest(model="ref-scene", preset="best", calib_set={"latent_steps": 10}, calib_samples=8, options={"calib_size": 32}, evaluate=False),
        adapter,
    )
    assert (mine.latent_steps, mine.n_samples, mine.options) == (10, 8, {"calib_size": 32})  # the caller's settings win
    _, truth, _ = build_configs(QuantizeRequest(model="ref-scene", preset="best", options={"calib_target": "ground-truth"}, evaluate=False), adapter)
    assert truth.options == {"calib_size": 96, "calib_target": "ground-truth"}  # an --option adds to the preset's options, not instead of them
