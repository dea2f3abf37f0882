"""Image metrics and the 3DGS training loss: PSNR, SSIM and ``(1 - l) L1 + l (1 - SSIM)``.

Images are ``[3, H, W]`` or batches ``[B, 3, H, W]`` of floats in ``[0, max_val]`` (1 by default); per-image
results are a scalar or ``[B]``. SSIM is the one of 3DGS's ``utils/loss_utils.py`` (Wang et al. 2004 with an
11x11 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 for data range 1, each channel filtered with zero
"same" padding and the map averaged over channels and pixels). The zero padding makes border pixels differ
from scikit-image's ``structural_similarity`` (which crops them), so numbers compare with 3DGS papers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compresskit.errors import CompressKitError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def _pair(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check two images or batches of one shape; return them as ``[B, C, H, W]`` and whether they were batched."""
    if a.shape != b.shape or a.dim() not in (3, 4):
        raise CompressKitError(
            f"{what} needs two images [C, H, W] or batches [B, C, H, W] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    batched = a.dim() == 4
    return (a, b, True) if batched else (a[None], b[None], False)


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(max_val^2 / MSE)`` per image; ``inf`` for identical images."""
    a4, b4, batched = _pair(a, b, "psnr")
    mse = (a4 - b4).double().pow(2).flatten(1).mean(1)  # [B]; float64 so tiny errors do not round to 0
    out = (10.0 * torch.log10(max_val**2 / mse)).to(a.dtype)
    return out if batched else out[0]


def _window(channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-x * x / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()  # [C, 1, 11, 11]


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel, per-channel SSIM, same shape as the inputs (see the module docstring for the variant)."""
    a4, b4, batched = _pair(a, b, "ssim")
    c = a4.shape[1]
    w = _window(c, a4.dtype, a4.device)
    blur = lambda x: F.conv2d(x, w, padding=SSIM_WINDOW // 2, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a4), blur(b4)
    var_a = blur(a4 * a4) - mu_a * mu_a
    var_b = blur(b4 * b4) - mu_b * mu_b
    cov = blur(a4 * b4) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    out = num / den
    return out if batched else out[0]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image (scalar, or ``[B]`` for batches); 1 for identical images."""
    m = ssim_map(a, b)
    return m.flatten(-3).mean(-1)


def render_loss(pred: torch.Tensor, target: torch.Tensor, lambda_dssim: float = 0.2) -> torch.Tensor:
    """The 3DGS photometric loss ``(1 - l) * L1 + l * (1 - SSIM)``, a scalar averaged over the batch."""
    if not 0.0 <= lambda_dssim <= 1.0 or math.isnan(lambda_dssim):
        raise CompressKitError(f"render_loss needs 0 <= lambda_dssim <= 1, got {lambda_dssim}")
    _pair(pred, target, "render_loss")
    l1 = (pred - target).abs().mean()
    if lambda_dssim == 0.0:
        return l1  # skip the SSIM convolutions
    return (1.0 - lambda_dssim) * l1 + lambda_dssim * (1.0 - ssim(pred, target).mean())
