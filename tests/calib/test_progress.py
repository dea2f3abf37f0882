"""What the calibrator tells its progress callback: each block's output error, each M-step's loss."""
import re

import pytest
import torch

import compresskit
from compresskit import CompressConfig
from compresskit.calib import Calibrator, CalibrationConfig

from toy_models import Residual


def _walk(bits, config, task_loss=None, width=24, depth=3):
    torch.manual_seed(0)
    base = Residual(width, depth).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(64, width, generator=g)} for _ in range(3)]
    model = Residual(width, depth).eval()
    model.load_state_dict(base.state_dict())
    seen = []
    cal = Calibrator([f"blocks.{i}" for i in range(depth)], batches, task_loss, config)
    compresskit.compress(
        model, CompressConfig(method="pq", bits=bits, params={"pool": False, "k": 16}), calibration=cal,
        progress=lambda *a: seen.append(a),
    )
    return base, model, batches, cal, seen


def _block_outputs(model, x):
    outs = []
    handles = [b.register_forward_hook(lambda _m, _a, out: outs.append(out)) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def test_each_block_reports_its_output_error_against_the_original_model():
    base, model, batches, cal, seen = _walk(2, CalibrationConfig(asymmetric=True))
    assert cal.asymmetric and sorted(cal.block_errors) == ["blocks.0", "blocks.1", "blocks.2"]
    num = {i: 0.0 for i in range(3)}
    den = {i: 0.0 for i in range(3)}
    for b in batches:  # the finished model, block by block, against the original on the same batches
        for i, (q, f) in enumerate(zip(_block_outputs(model, b["x"]), _block_outputs(base, b["x"]))):
            num[i] += float((q - f).pow(2).sum())
            den[i] += float(f.pow(2).sum())
    for i in range(3):
        assert cal.block_errors[f"blocks.{i}"] == pytest.approx(num[i] / den[i], rel=1e-4)
    # the layer after a block is announced with that block's error
    descriptions = [d for d, *_ in seen]
    assert descriptions[1] == f"blocks.1.fc  (blocks.0 output error {cal.block_errors['blocks.0']:.3g})"
    assert descriptions[2].endswith(f"(blocks.1 output error {cal.block_errors['blocks.1']:.3g})")


def test_block_errors_fall_with_more_bits_and_need_a_reference():
    _, _, _, two, _ = _walk(2, CalibrationConfig(asymmetric=True))
    _, _, _, four, _ = _walk(4, CalibrationConfig(asymmetric=True))
    assert all(four.block_errors[b] < two.block_errors[b] for b in two.block_errors)
    # symmetric walk without a block M-step: no reference output is kept, so nothing is claimed
    _, _, _, sym, seen = _walk(2, CalibrationConfig(asymmetric=False))
    assert sym.block_errors == {} and not any("output error" in d for d, *_ in seen)


def test_each_m_step_reports_its_loss():
    def task_loss(model, batch):
        return model(batch["x"]).pow(2).mean()

    _, _, _, _, seen = _walk(2, CalibrationConfig(m_objective="task", em_rounds=1, m_steps=4, lr=1e-3), task_loss)
    steps = [(d, i, n) for d, i, n in seen if "M-step loss" in d]
    assert [(i, n) for _, i, n in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(re.fullmatch(r"EM round 1/1: M-step loss [0-9.e+-]+", d) for d, _, _ in steps)
    assert any(d == "EM round 1/1: re-init and E-step" for d, *_ in seen)
