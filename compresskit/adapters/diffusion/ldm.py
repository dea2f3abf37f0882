"""The LDM / guided-diffusion ``UNetModel``, in one readable file, with the original parameter names.

This is the U-Net of openai/guided-diffusion (``unet.py``) as CompVis/latent-diffusion and Stable
Diffusion v1 (``ldm/modules/diffusionmodules/openaimodel.py``) use it, written here from its
structure (layers in :mod:`.ldm_layers`). Its state dict is the original's: the keys a training
checkpoint holds under ``model.diffusion_model.`` load with ``load_state_dict(strict=True)``.

Layout (``ds`` is the downsampling factor, 1 at the input)::

    time_embed.0/2            timestep MLP, model_channels -> 4 model_channels
    label_emb                 nn.Embedding(num_classes, 4 mc), added to it (class-conditional models)
    input_blocks.0.0          conv 3x3, in_channels -> model_channels
    input_blocks.N            per level, num_res_blocks x [ResBlock (+ attention when ds is in
                              attention_resolutions)], then a Downsample (or a down ResBlock)
    middle_block.0/1/2        ResBlock, attention, ResBlock
    output_blocks.N           per level, deepest first, num_res_blocks + 1 x [ResBlock on the
                              concatenated skip (+ attention)], the last one of a level + Upsample
    out.0 / out.2             GroupNorm, SiLU, conv 3x3 -> out_channels

The attention is an :class:`~.ldm_layers.AttentionBlock` (guided-diffusion) or, with
``use_spatial_transformer``, a :class:`~.ldm_layers.SpatialTransformer` cross-attending to
``context [N, L, context_dim]`` (text for Stable Diffusion, a class embedding for LDM's ImageNet models).

LDM's class-conditional ImageNet models (``cin256-v2``) do *not* use ``label_emb``: a separate
``ClassEmbedder`` (``cond_stage_model.embedding``, 1001 x 512, row 1000 the null class their
classifier-free guidance uses) turns the label into a one-token context. ``context_classes`` (a
compresskit field) carries that table along as ``context_embed``, so such a model is called
``model(x, t, y)`` like every model of the diffusion family.

The forward is ``forward(x, t, y=None, context=None)``: the family's ``(x, t, y)`` order (the
original's is ``(x, timesteps, context, y)``; pass ``context=`` by keyword).

References:
    P. Dhariwal and A. Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021 (guided-diffusion).
    R. Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources

import torch
from torch import nn

from compresskit.adapters.diffusion.dit import timestep_embedding
from compresskit.adapters.diffusion.ldm_layers import (
    AttentionBlock, Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, Upsample, group_norm,
)
from compresskit.errors import CompressKitError

CONFIG_DIR = "configs/ldm"  # JSON package data: one file per alias
# fields of the original's constructor that change nothing here (memory, precision, a head-size rounding
# that gives the same parameters): accepted in a config and dropped
RUNTIME_ONLY = ("use_checkpoint", "use_fp16", "legacy")


@dataclass(frozen=True)
class LDMConfig:
    """A ``UNetModel`` architecture, the original constructor's arguments (``-1``: unset, as there).

    ``attention_resolutions`` are downsampling factors ``ds`` (1, 2, 4, ...), not pixel sizes.
    Heads: ``num_head_channels`` channels per head when set, else ``num_heads`` heads.
    Ours, not the original's: ``num_groups`` (the original always normalises with 32 groups) and
    ``context_classes`` (see the module docstring)."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    context_classes: int | None = None
    num_groups: int = 32

    def __post_init__(self):
        for name in ("attention_resolutions", "channel_mult"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        bad = None
        if self.dims != 2:
            bad = f"dims={self.dims}: only 2-D U-Nets are supported"
        elif self.num_heads == -1 and self.num_head_channels == -1:
            bad = "set num_heads or num_head_channels"
        elif self.use_spatial_transformer != (self.context_dim is not None):
            bad = "use_spatial_transformer and context_dim go together (the transformer cross-attends to the context)"
        elif self.context_classes is not None and (self.context_dim is None or self.num_classes is not None):
            bad = "context_classes (a class table feeding the context) needs context_dim and no num_classes"
        elif self.channel_mult[0] != 1:
            bad = f"channel_mult must start at 1 (out.0 normalises model_channels), got {self.channel_mult}"
        else:
            for ch in (self.model_channels * m for m in self.channel_mult):
                if ch % self.num_groups or (self.num_head_channels > 0 and ch % self.num_head_channels) or (self.num_head_channels == -1 and ch % self.num_heads):
                    bad = f"{ch} channels do not divide into {self.num_groups} groups and the heads"
                    break
        if bad:
            raise CompressKitError(f"bad LDM UNet config: {bad}; fix the config")

    def heads(self, channels: int, upsample: bool = False) -> tuple[int, int]:
        """``(heads, channels per head)`` of an attention layer on ``channels`` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        heads = self.num_heads_upsample if upsample and self.num_heads_upsample != -1 and not self.use_spatial_transformer else self.num_heads
        return heads, channels // heads

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "LDMConfig":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in RUNTIME_ONLY}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CompressKitError(f"unknown LDM UNet config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in data)
        if missing:
            raise CompressKitError(f"LDM UNet config lacks {', '.join(missing)}; add them (the UNetModel arguments of the model's YAML)")
        return cls(**data)


def shipped_configs() -> dict[str, dict]:
    """The JSON files of ``configs/ldm/`` by alias: ``{"name", "source", "architecture", ...}``."""
    out = {}
    for entry in resources.files(__package__).joinpath(CONFIG_DIR).iterdir():
        if entry.name.endswith(".json"):
            out[entry.name.removesuffix(".json")] = json.loads(entry.read_text(encoding="utf-8"))
    return dict(sorted(out.items()))


class LDMUNet(nn.Module):
    """The ``UNetModel``: ``forward(x [N, C_in, H, W], t [N], y [N] | None, context [N, L, D] | None)
    -> [N, C_out, H, W]`` (H and W multiples of ``2 ** (len(channel_mult) - 1)``)."""

    def __init__(self, config: LDMConfig):
        super().__init__()
        self.config = c = config
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        if c.context_classes is not None:
            self.context_embed = nn.Embedding(c.context_classes, c.context_dim)

        def res(ch_in: int, ch_out: int | None = None, **updown) -> ResBlock:
            return ResBlock(ch_in, emb_dim, c.dropout, ch_out, use_scale_shift_norm=c.use_scale_shift_norm, groups=c.num_groups, **updown)

        def attention(ch: int, upsample: bool = False) -> nn.Module:
            heads, dim_head = c.heads(ch, upsample)
            if c.use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, c.transformer_depth, c.context_dim, c.dropout, c.num_groups)
            return AttentionBlock(ch, heads, c.num_groups, c.use_new_attention_order)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
        skips, ch, ds = [c.model_channels], c.model_channels, 1  # skips: the channels each input block leaves for the way up
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch), attention(ch), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions:
                    layers.append(attention(ch, upsample=True))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch, c.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch, c.num_groups), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if (y is not None) != (c.num_classes is not None or c.context_classes is not None):
            raise CompressKitError("pass class labels y exactly when the LDM UNet is class-conditional (num_classes or context_classes set)")
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(x.dtype))  # [N, 4 mc]
        if c.num_classes is not None:
            emb = emb + self.label_emb(y)
        if c.context_classes is not None:
            context = self.context_embed(y)[:, None, :]  # [N, 1, context_dim]: LDM's ClassEmbedder
        if c.use_spatial_transformer and context is None:
            raise CompressKitError("this LDM UNet cross-attends to a context: pass context=[N, L, context_dim]")
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


# ---- configs from a state dict's shapes ------------------------------------------------------------
def looks_like_ldm(keys) -> bool:
    """Keys of the ``UNetModel`` layout: ``input_blocks.0.0.weight`` and a ``middle_block`` entry."""
    keys = set(keys)
    return "input_blocks.0.0.weight" in keys and any(k.startswith("middle_block.") for k in keys)


def shape_fields(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The config fields a ``UNetModel`` state dict's shapes fix (not ``image_size``, not the heads).

    Down-sampling ResBlocks (``resblock_updown``) read as ordinary ones here: such a model needs its sidecar."""
    mc, c_in = shapes["time_embed.0.weight"][1], shapes["input_blocks.0.0.weight"][1]
    n_in = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks."))
    # a downsampler is a block with no ResBlock: a stride-2 conv (op) or average pooling (no keys at all)
    downs = [i for i in range(1, n_in) if f"input_blocks.{i}.0.in_layers.2.weight" not in shapes]
    per_level = downs[0] if downs else n_in  # num_res_blocks + 1 (with the downsampler)
    levels = len(downs) + 1
    if n_in != levels * per_level or any(d != (i + 1) * per_level for i, d in enumerate(downs)):
        raise CompressKitError("the input_blocks of this state dict are not regular; put a .json config next to the file")
    n_res = per_level - 1
    first = [1 + level * per_level for level in range(levels)]  # first ResBlock of each level
    mult = [shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] // mc for i in first]
    attn = [2 ** level for level, i in enumerate(first) if any(k.startswith(f"input_blocks.{i}.1.") for k in shapes)]
    spatial = any(".transformer_blocks." in k for k in shapes)
    found = {
        "in_channels": c_in, "model_channels": mc, "out_channels": shapes["out.2.weight"][0], "num_res_blocks": n_res,
        "attention_resolutions": attn, "channel_mult": mult, "conv_resample": not downs or f"input_blocks.{downs[0]}.0.op.weight" in shapes,
        "num_classes": shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None,
        "use_scale_shift_norm": shapes["input_blocks.1.0.emb_layers.1.weight"][0] == 2 * shapes["input_blocks.1.0.out_layers.3.weight"][0],
        "use_spatial_transformer": spatial, "context_dim": None, "transformer_depth": 1,
        "context_classes": shapes["context_embed.weight"][0] if "context_embed.weight" in shapes else None,
    }
    if spatial:
        found["context_dim"] = shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        found["transformer_depth"] = len({k.split(".")[3] for k in shapes if k.startswith("middle_block.1.transformer_blocks.")})
    return found


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[str, LDMConfig]:
    """``(alias, config)`` of the shipped config whose shapes these are (the heads and image size
    cannot be read from shapes); one error asking for a ``.json`` sidecar when none matches."""
    found = shape_fields(shapes)
    for alias, entry in shipped_configs().items():
        config = LDMConfig.from_dict(entry["architecture"])
        if all(_same_field(config, k, v) for k, v in found.items()):
            return alias, config
    raise CompressKitError(
        f"this UNetModel (model_channels {found['model_channels']}, channel_mult {found['channel_mult']}) matches no shipped "
        "config, and its heads and image size cannot be read from the weights; put a .json config (the UNetModel "
        "arguments, e.g. num_heads or num_head_channels, image_size) next to the file"
    )


def _same_field(config: LDMConfig, name: str, value) -> bool:
    if name == "attention_resolutions":  # a set of ds values; those deeper than the U-Net never apply
        reachable = {2 ** level for level in range(len(config.channel_mult))}
        return set(value) == set(config.attention_resolutions) & reachable
    return getattr(config, name) == (tuple(value) if isinstance(value, list) else value)
