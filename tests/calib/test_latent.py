"""Quantization in the loop (``latent_steps``): float latents under straight-through estimates at the
start of each EM round's M-step, codes following them every ``reassign_every`` steps."""
import pytest
import torch

import compresskit
from compresskit import CompressConfig
from compresskit.calib import Calibrator, CalibrationConfig
from compresskit.calib.objectives import LatentPhase
from compresskit.errors import CompressKitError
from compresskit.nn import quantized_tensors

from toy_models import Residual

WIDTH, DEPTH = 16, 2


def _setup(method="pq", bits=2, seed=0, **settings):
    """A toy chained model, compressed with a task-loss EM round; the task: the uncompressed model's
    outputs on fixed inputs. Returns (model, calibrator, task loss, batches)."""
    torch.manual_seed(seed)
    base = Residual(WIDTH, DEPTH).eval()
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(32, WIDTH, generator=g) for _ in range(3)]
    with torch.no_grad():
        batches = [{"x": x, "y": base(x)} for x in xs]
    model = Residual(WIDTH, DEPTH).eval()
    model.load_state_dict(base.state_dict())

    def task_loss(m, b):
        return (m(b["x"]) - b["y"]).pow(2).mean()

    if settings.get("latent_steps"):
        settings.setdefault("latent_lr", 1e-3)
    config = CalibrationConfig(m_objective="task", em_rounds=1, m_steps=2, m_batch=1, lr=1e-3, **settings)
    cal = Calibrator([f"blocks.{i}" for i in range(DEPTH)], batches, task_loss, config, loss_keys=("y",))
    params = {"pool": False, "k": 16} if method == "pq" else {}
    compresskit.compress(model, CompressConfig(method=method, bits=bits, params=params), calibration=cal)
    return model, cal, task_loss, batches


def _loss(model, task_loss, batches):
    with torch.no_grad():
        return sum(float(task_loss(model, b)) for b in batches) / len(batches)


def _state(model):
    return {name: (qt.codes.clone(), {k: t.detach().clone() for k, t in qt.state_tensors().items()})
            for name, (_, _, qt) in quantized_tensors(model).items()}


def test_the_phase_records_the_tensors_before_compression_and_moves_the_codes():
    plain, _, _, _ = _setup(latent_steps=0)
    model, cal, _, _ = _setup(latent_steps=40, reassign_every=5)
    # every target's tensor before compression was recorded, in the quantizer's row shape
    assert sorted(cal.initial) == [f"blocks.{i}.fc" for i in range(DEPTH)]
    torch.manual_seed(0)
    base = Residual(WIDTH, DEPTH)
    assert torch.equal(cal.initial["blocks.0.fc"], base.blocks[0].fc.weight.detach())
    mine, theirs = quantized_tensors(model), quantized_tensors(plain)
    assert any(not torch.equal(mine[name][2].codes, theirs[name][2].codes) for name in mine)
    assert all(qt.override is None for _, _, qt in mine.values())


def test_a_phase_that_raises_the_calibration_loss_is_undone():
    model, cal, task_loss, batches = _setup(latent_steps=10, reassign_every=1)
    state = _state(model)
    # a loss that pushes the latents away from the task: the calibration loss rises, so the guard restores
    cal.model_objective.latent_phase(model, lambda step: -task_loss(model, batches[step % len(batches)]))
    for name, (codes, tensors) in _state(model).items():
        assert torch.equal(codes, state[name][0])
        assert all(torch.equal(t, state[name][1][k]) for k, t in tensors.items())


def test_scalar_targets_take_the_codes_of_their_latents():
    """rtn has no codebook: its codes follow the latent through transform() under the fitted scales."""
    model, cal, task_loss, batches = _setup(method="rtn", bits=3, latent_steps=1, reassign_every=1)
    phase = LatentPhase(cal.config, cal.initial, {}, None)
    name, (_, _, qt) = next(iter(quantized_tensors(model).items()))
    target = cal.initial[name] + 0.05
    phase._reencode(name, qt, target)
    q = qt.bind()
    assert torch.equal(qt.codes, q.transform(target))


def test_a_codebook_follows_its_latent_with_a_lloyd_update():
    """With H = I (a bare tensor), re-encoding gives nearest codes and centroids at most as far from the
    latent as before."""
    model, cal, task_loss, batches = _setup(latent_steps=1, reassign_every=1)
    name, (_, _, qt) = next(iter(quantized_tensors(model).items()))
    latent = cal.initial[name] + 0.1 * torch.randn_like(cal.initial[name])
    before = float((qt.dequantize() - latent).pow(2).sum())
    LatentPhase(cal.config, cal.initial, {}, None)._reencode(name, qt, latent)
    after = float((qt.dequantize() - latent).pow(2).sum())
    assert after < before


def test_overrides_are_removed_when_the_loss_fails():
    model, cal, task_loss, batches = _setup(latent_steps=3, reassign_every=1)

    def broken(step):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cal.model_objective.latent.run(model, broken)
    assert all(qt.override is None for _, _, qt in quantized_tensors(model).values())


def test_the_compressed_model_runs_the_phase_in_its_em_round():
    """End to end through compress: with latent_steps, the EM round ends lower than the same round without."""
    plain, _, task_loss, batches = _setup(latent_steps=0)
    looped, _, _, _ = _setup(latent_steps=60, reassign_every=5)
    assert _loss(looped, task_loss, batches) < _loss(plain, task_loss, batches)


@pytest.mark.parametrize("settings, message", [
    ({"latent_steps": 5}, "latent_steps train in the whole-model EM rounds"),
    ({"latent_steps": 5, "m_objective": "block", "m_steps": 2}, "latent_steps train in the whole-model EM rounds"),
    ({"reassign_every": 5}, "reassign_every would do nothing"),
    ({"latent_lr": 1e-4}, "latent_lr would do nothing"),
    ({"latent_steps": 5, "reassign_every": 0, "m_objective": "task", "em_rounds": 1, "m_steps": 1}, "reassign_every must be >= 1"),
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(CompressKitError, match=message):
        CalibrationConfig(**settings).validated()
