"""PSNR, SSIM (3DGS's variant) and the render loss: identities, closed forms and ordering."""
from __future__ import annotations

import math

import pytest
import torch

from compresskit.adapters.gaussians.image_metrics import psnr, render_loss, ssim, ssim_map
from compresskit.errors import CompressKitError


def images(seed=0, shape=(3, 24, 20)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_identical_is_inf_and_known_mse_gives_known_db():
    a = images()
    assert math.isinf(float(psnr(a, a))) and float(psnr(a, a)) > 0
    b = (a + 0.1).clamp(max=2.0)  # MSE exactly 0.01 -> 20 dB
    assert abs(float(psnr(a, b)) - 20.0) < 1e-4
    assert abs(float(psnr(255 * a, 255 * b, max_val=255.0)) - 20.0) < 1e-4
    c = a.clone()
    c[0, 0, 0] += 1.0  # one pixel off by 1: MSE = 1 / (3 * 24 * 20)
    assert abs(float(psnr(a, c)) - 10 * math.log10(3 * 24 * 20)) < 1e-4


def test_psnr_and_ssim_are_per_image_on_batches():
    a = torch.stack([images(1), images(2)])
    b = torch.stack([images(1), images(3)])
    p, s = psnr(a, b), ssim(a, b)
    assert p.shape == (2,) and s.shape == (2,)
    assert math.isinf(float(p[0])) and abs(float(s[0]) - 1.0) < 1e-6
    assert abs(float(p[1]) - float(psnr(a[1], b[1]))) < 1e-4
    assert abs(float(s[1]) - float(ssim(a[1], b[1]))) < 1e-6


def test_ssim_identical_is_one_and_it_falls_with_noise():
    a = images()
    assert abs(float(ssim(a, a)) - 1.0) < 1e-6
    gen = torch.Generator().manual_seed(9)
    noise = torch.randn(a.shape, generator=gen)
    values = [float(ssim(a, a + s * noise)) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2] and values[0] < 1.0
    assert abs(float(ssim(a, a + 0.05 * noise)) - float(ssim(a + 0.05 * noise, a))) < 1e-6  # symmetric


def test_ssim_closed_form_on_constant_images():
    """Away from the zero-padded border, constant images have SSIM (2xy + C1) / (x^2 + y^2 + C1)."""
    x, y = 0.6, 0.3
    m = ssim_map(torch.full((3, 32, 32), x, dtype=torch.float64), torch.full((3, 32, 32), y, dtype=torch.float64))
    want = (2 * x * y + 0.01**2) / (x * x + y * y + 0.01**2)
    torch.testing.assert_close(m[:, 5:-5, 5:-5], torch.full((3, 22, 22), want, dtype=torch.float64))


def test_render_loss_mixes_l1_and_dssim_and_is_differentiable():
    a, b = images(4), images(5)
    l1 = float((a - b).abs().mean())
    torch.testing.assert_close(float(render_loss(a, b, lambda_dssim=0.0)), l1)
    want = 0.8 * l1 + 0.2 * (1 - float(ssim(a, b)))
    assert abs(float(render_loss(a, b)) - want) < 1e-6
    assert float(render_loss(a, a)) < 1e-6
    pred = a.clone().requires_grad_(True)
    render_loss(pred, b).backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad.abs().sum()) > 0


def test_bad_shapes_are_clear_errors():
    with pytest.raises(CompressKitError, match="one shape"):
        psnr(images(), images(shape=(3, 24, 21)))
    with pytest.raises(CompressKitError, match="lambda_dssim"):
        render_loss(images(), images(), lambda_dssim=1.5)
