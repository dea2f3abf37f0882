"""Front-to-back alpha compositing of one chunk of tiles, with a hand-written backward that recomputes.

Why not plain autograd: it keeps about ten ``[tiles, 256, K]`` tensors per chunk alive until backward (the
exponent, the opacity product, masks, ``1 - alpha``, the cumprod and its shift, ...), so memory grows with
splat-tile intersections x 256, and the cumprod backward alone is ~8 passes. Like 3DGS's CUDA kernel, this
backward saves only the chunk's *inputs* and recomputes alpha and transmittance, so memory stays at one
chunk's worth whatever the scene; it also fuses the maths into fewer passes. ``composite_reference`` is the
same forward in autograd-able torch, used by the tests to check the gradients.

Per pixel, splats front to back ``k = 0..K-1``: ``alpha_k = min(o_k G_k, 0.99)`` with ``G = exp(coef . feat)``,
zeroed below 1/255; ``B_k = prod_{j<k} (1 - alpha_j)``, ``w_k = alpha_k B_k``, colour ``sum_k w_k c_k``,
``T = prod_k (1 - alpha_k)``. For a loss with ``v_k = dL/dw_k = c_k . dL/dcolour`` and ``g_T = dL/dT``:
``dL/dalpha_k = B_k v_k - (sum_{j>k} w_j v_j + T g_T) / (1 - alpha_k)``, safe because ``1 - alpha >= 0.01``.

CPU speed notes (1 thread, measured): the exponent is clamped to ``[-6, 0]`` before ``exp`` because exp of
inputs below ~-87 (far pixels) takes a slow underflow path, ~20x slower; anything below -6 has
``o e^-6 < 1/255`` and is skipped anyway, and above 0 is float32 rounding at a splat's centre (it would let
alpha exceed the opacity). Masks are fused ops (``threshold``, ``hardtanh_backward``): boolean tensors and
``masked_fill`` / ``where`` are several times slower than arithmetic here. The layout is ``[T, P, K]`` so
the cumulative products and sums run over contiguous memory (~3x faster than over a strided axis).
"""
from __future__ import annotations

import torch

from compresskit.adapters.gaussians.project import ALPHA_MAX, ALPHA_MIN

EXP_FLOOR = -6.0  # o * exp(-6) < 1/255 for every o <= 1: below this the splat is skipped anyway


def _alpha_min(dtype: torch.dtype) -> float:
    """The largest float below ``1/255`` in ``dtype``: ``x > it`` is exactly ``x >= 1/255`` (3DGS keeps equality)."""
    one = torch.tensor(ALPHA_MIN, dtype=dtype)
    return float(torch.nextafter(one, torch.zeros_like(one)))


def _alpha(coefs, opacities, feats_t):
    """``raw = o G`` and ``alpha`` (capped at 0.99, zero at or below 1/255), both ``[T, P, K]``."""
    raw = torch.matmul(feats_t, coefs.transpose(1, 2))  # [P, 6] @ [T, 6, K]: the exponent, [T, P, K]
    raw.clamp_(min=EXP_FLOOR, max=0.0).exp_().mul_(opacities[:, None, :])
    alpha = torch.nn.functional.threshold(raw.clamp(max=ALPHA_MAX), _alpha_min(raw.dtype), 0.0)
    return raw, alpha


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefs, opacities, rgb, feats_t):
        with torch.no_grad():
            _, alpha = _alpha(coefs, opacities, feats_t)
            keep = torch.rsub(alpha, 1.0)  # 1 - alpha >= 0.01
            trans = torch.cumprod(keep, dim=2)  # inclusive: light left after splat k
            w = alpha.div_(keep).mul_(trans)  # alpha_k B_k, B_k = trans_k / (1 - alpha_k)
            color = torch.bmm(w, rgb)  # [T, P, 3]
        ctx.save_for_backward(coefs, opacities, rgb, feats_t)
        return color, trans[..., -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_color, g_trans):
        coefs, opacities, rgb, feats_t = ctx.saved_tensors
        t, p = coefs.shape[0], feats_t.shape[0]
        if g_color is None:
            g_color = rgb.new_zeros(t, p, 3)
        if g_trans is None:
            g_trans = rgb.new_zeros(t, p)
        raw, alpha = _alpha(coefs, opacities, feats_t)
        keep = torch.rsub(alpha, 1.0)
        before = torch.cumprod(keep, dim=2)
        final = before[..., -1:].clone()  # [T, P, 1]
        before.div_(keep)  # B_k
        w = alpha * before
        g_rgb = torch.bmm(w.transpose(1, 2), g_color)  # [T, K, 3]
        v = torch.bmm(g_color, rgb.transpose(1, 2))  # [T, P, K]: dL/dw_k
        behind = torch.cumsum(w.mul_(v), dim=2)  # inclusive sum of w v
        total = behind[..., -1:].clone()
        behind.neg_().add_(total)  # total - inclusive = sum_{j>k} w_j v_j
        behind.add_(final * g_trans[..., None]).div_(keep)
        g_alpha = v.mul_(before).sub_(behind)  # [T, P, K]: dL/dalpha
        # alpha = raw only where 1/255 <= raw < 0.99; elsewhere it is 0 or the cap and passes no gradient.
        g_raw = torch.ops.aten.hardtanh_backward(g_alpha, raw, _alpha_min(raw.dtype), ALPHA_MAX)
        g_exp = g_raw.mul_(raw)  # dL/d(exponent), since d raw / d exponent = raw
        g_opac = g_exp.sum(1) / opacities.clamp(min=1e-30)  # d raw / d o = G = raw / o; padding has o = 0
        g_coefs = torch.matmul(g_exp.transpose(1, 2), feats_t)  # [T, K, 6]
        return g_coefs, g_opac, g_rgb, None


def composite(coefs: torch.Tensor, opacities: torch.Tensor, rgb: torch.Tensor, feats_t: torch.Tensor):
    """Composite one chunk: ``coefs [T, K, 6]``, ``opacities [T, K]`` (0 = padding), ``rgb [T, K, 3]``,
    ``feats_t [P, 6]``. Returns colour ``[T, P, 3]`` (no background) and final transmittance ``[T, P]``."""
    return _Composite.apply(coefs, opacities, rgb, feats_t)


def composite_reference(coefs, opacities, rgb, feats_t):
    """The same forward in plain differentiable torch ops (autograd keeps every intermediate); for tests."""
    g = torch.exp(torch.clamp(feats_t @ coefs.transpose(1, 2), max=0.0))  # [T, P, K]
    alpha = torch.clamp(opacities[:, None, :] * g, max=ALPHA_MAX)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1.0 - alpha, dim=2)
    before = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=2)
    return (alpha * before) @ rgb, trans[..., -1]
