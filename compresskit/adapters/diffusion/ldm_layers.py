"""The layers of the LDM / guided-diffusion ``UNetModel`` (:mod:`.ldm`), with the original parameter names.

Written from the structure of ``openaimodel.py`` (openai/guided-diffusion, CompVis/latent-diffusion)
and LDM's ``attention.py``; every submodule sits at the index the original gives it, so a state dict
of the original loads here with ``strict=True``:

* :class:`ResBlock`: ``in_layers`` (0 GroupNorm, 1 SiLU, 2 conv 3x3), ``emb_layers`` (0 SiLU,
  1 linear to C or 2C with scale-shift norm), ``out_layers`` (0 GroupNorm, 1 SiLU, 2 dropout, 3 conv
  3x3), ``skip_connection`` (identity, or a 1x1 conv when the channels change);
* :class:`AttentionBlock`: ``norm``, ``qkv`` and ``proj_out`` 1x1 Conv1d over the flattened pixels;
* :class:`SpatialTransformer`: ``norm``, ``proj_in`` 1x1 conv, ``transformer_blocks.N`` (``attn1``
  self-attention, ``attn2`` cross-attention on the context, ``ff`` GEGLU MLP, ``norm1..3``), ``proj_out``;
* :class:`Downsample` (``op``: a stride-2 conv, or average pooling) and :class:`Upsample` (``conv``).

The original's GroupNorm32 computes in float32 with 32 groups; here the groups are a config value
(32 by default) so tests can use 16 channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TimestepBlock(nn.Module):
    """A layer that also reads the timestep (and class) embedding ``emb [N, E]``."""


class ContextBlock(nn.Module):
    """A layer that also reads the cross-attention context ``[N, L, context_dim]``."""


class TimestepEmbedSequential(nn.Sequential):
    """``input_blocks.N`` / ``middle_block`` / ``output_blocks.N``: children called in order, each given
    what it reads (``emb`` for :class:`TimestepBlock`, ``context`` for :class:`ContextBlock`)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


class Downsample(nn.Module):
    """Halve H and W: ``op`` is a 3x3 stride-2 conv (``conv_resample``) or a 2x2 average pool (no weights)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W (nearest), then ``conv`` 3x3 when ``conv_resample``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    """``[N, C, H, W]`` -> ``[N, C_out, H', W']``: two 3x3 convs, the embedding added between them (or,
    with ``use_scale_shift_norm``, applied FiLM-like as ``norm(h) * (1 + scale) + shift``); ``up`` /
    ``down`` resample both paths inside the block (``resblock_updown``)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None, *,
                 use_scale_shift_norm: bool = False, groups: int = 32, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the norm/SiLU and the conv, as the original does
            h = self.in_layers[2](self.h_upd(self.in_layers[:2](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # [N, C_out or 2 C_out, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W pixels: ``qkv`` (Conv1d C -> 3C, kernel 1), ``heads`` heads, ``proj_out``.

    The channels of ``qkv`` are ordered per head ``[q_h, k_h, v_h]`` (the original's legacy order), or
    ``[q, k, v]`` each split into heads with ``new_order`` (``use_new_attention_order``)."""

    def __init__(self, channels: int, heads: int, groups: int = 32, new_order: bool = False):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # [N, C, T]
        qkv = self.qkv(self.norm(x))  # [N, 3C, T]
        length, ch = qkv.shape[-1], c // self.heads
        if self.new_order:
            q, k, v = (part.reshape(n * self.heads, ch, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(n * self.heads, 3 * ch, length).split(ch, dim=1)  # [N*heads, ch, T] each
        scale = 1 / math.sqrt(math.sqrt(ch))  # on q and k both: steadier in fp16 than dividing afterwards
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).to(q.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(n, c, length)
        return (x + self.proj_out(h)).reshape(n, c, *spatial)


class CrossAttention(nn.Module):
    """``x [N, T, D]`` attends to ``context [N, L, D_c]`` (itself when None): ``to_q/k/v`` without bias, ``to_out.0``."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        n, h = x.shape[0], self.heads
        q, k, v = (t.reshape(n, t.shape[1], h, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, dim_head]; scale dim_head^-1/2 as the original
        return self.to_out(out.transpose(1, 2).reshape(n, x.shape[1], -1))


class GEGLU(nn.Module):
    """``proj`` to 2 * inner, then ``value * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net``: 0 GEGLU (D -> 4D), 1 dropout, 2 linear (4D -> D), LDM's gated feed-forward."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, and the GEGLU MLP, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ContextBlock):
    """``[N, C, H, W]`` -> same: ``norm``, ``proj_in`` (1x1 conv to heads * dim_head), ``depth``
    transformer blocks over the H*W tokens, ``proj_out`` (1x1 conv back), residual. LDM v1's layout."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int | None,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        n, c, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # [N, H*W, inner]
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(n, -1, height, width)
        return x + self.proj_out(h)
