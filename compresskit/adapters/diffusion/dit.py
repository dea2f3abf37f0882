"""DiT, the Diffusion Transformer, in one readable file, with the original checkpoints' parameter names.

A DiT denoises a latent image: the latent ``[N, C, H, W]`` is cut into ``p x p`` patches that become
tokens (``x_embedder``, a strided convolution), a fixed 2-D sin-cos table is added (``pos_embed``),
and ``depth`` transformer blocks run with adaLN-Zero conditioning: the timestep embedding
(``t_embedder``) plus the class embedding (``y_embedder``) is turned by each block's
``adaLN_modulation`` into six vectors (shift, scale, gate for attention and for the MLP). A final
adaLN layer (``final_layer``) maps tokens back to patches: ``C`` noise (epsilon) channels, plus ``C``
variance channels when ``learn_sigma`` (the improved-DDPM learned variance).

The layout and every parameter name are those of the original implementation, so its released
checkpoints (``DiT-XL-2-256x256.pt``) load with ``load_state_dict(strict=True)`` and a state dict
written here loads there: ``x_embedder.proj``, ``t_embedder.mlp.0/2``, ``y_embedder.embedding_table``
(``num_classes + 1`` rows when ``class_dropout_prob > 0``: the extra row is the "no class" label that
classifier-free guidance needs), ``pos_embed`` (a persistent buffer here, a frozen parameter there:
the same state-dict entry; it is fixed, never trained), ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.mlp.fc1/fc2``, ``blocks.N.adaLN_modulation.1``, ``final_layer.linear``,
``final_layer.adaLN_modulation.1``. timm's ``PatchEmbed``, ``Attention`` and ``Mlp``, which the
original imports, are written out here (same parameters, no timm dependency).

Configurations are small JSON files in ``configs/`` (``dit-xl-2-256.json``: the layout of the
released DiT-XL/2 at 256 px, also published as ``facebook/DiT-XL-2-256`` in diffusers' layout).

References:
    W. Peebles and S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023, arXiv:2212.09748;
    code: github.com/facebookresearch/DiT (``models.py``).
    A. Nichol and P. Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021 (learned sigma).
    GLIDE (timestep embedding) and MAE (2-D sin-cos positional embedding), as cited by DiT.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from compresskit.errors import CompressKitError

CONFIG_DIR = "configs"  # JSON package data next to this file


@dataclass(frozen=True)
class DiTConfig:
    """A DiT architecture. ``input_size`` is the latent's side (256 px / 8 for the SD VAE = 32)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise CompressKitError(f"DiT input_size {self.input_size} is not a multiple of patch_size {self.patch_size}; fix the config")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise CompressKitError(f"DiT hidden_size {self.hidden_size} must be a multiple of 4 and of num_heads {self.num_heads}; fix the config")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CompressKitError(f"unknown DiT config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)


def shipped_configs() -> dict[str, dict]:
    """The JSON files of ``configs/`` by alias (the file name without ``.json``): ``{"name",
    "architecture", ...}`` (``hub_id`` and ``checkpoint`` where a released model has this layout)."""
    out = {}
    for entry in resources.files(__package__).joinpath(CONFIG_DIR).iterdir():
        if entry.name.endswith(".json"):
            out[entry.name.removesuffix(".json")] = json.loads(entry.read_text(encoding="utf-8"))
    return dict(sorted(out.items()))


# ---- fixed embeddings ----------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE's sinusoidal embedding of (possibly fractional) timesteps ``t [N]`` -> ``[N, dim]``:
    ``[cos(t f), sin(t f)]`` for ``dim/2`` frequencies ``f`` from 1 down to ``1/max_period``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # [half]
    args = t[:, None].float() * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos [M]`` -> ``[M, dim]`` float64: ``[sin(pos w), cos(pos w)]``, ``w_i = 10000^(-2i/dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))  # [dim/2]
    out = pos.to(torch.float64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D table ``[grid * grid, dim]`` float32, token ``i * grid + j`` at row i, column j.

    As in the original (numpy's ``meshgrid(w, h)`` fed in that order), the first half of each row
    encodes the column ``j`` and the second half the row ``i``.
    """
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [grid, grid] each
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x [N, T, D] * (1 + scale [N, D]) + shift [N, D]``, per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---- layers --------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """``[N, C, H, W]`` -> ``[N, T, D]`` tokens, ``T = (H/p) (W/p)``: a ``p x p`` stride-``p`` convolution (timm's)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps ``[N]`` -> ``[N, D]``: the fixed 256-wide sinusoid, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels ``[N]`` -> ``[N, D]``. With ``dropout_prob > 0`` the table has one more row, label
    ``num_classes``, "no class": training drops labels to it at that rate, so the same network also
    predicts unconditionally, which classifier-free guidance needs."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (timm's layout: q, k, v stacked on the output axis)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, N, heads, T, hd]
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(hd)) v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """fc1 - GELU (tanh approximation, as DiT trains with) - fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero: ``adaLN_modulation(c)`` gives shift/scale/gate for the
    attention and for the MLP; the gates start at zero, so each block starts as the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # [N, D] each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from tokens to ``p * p * out_channels`` patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---- the model -----------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion model with a transformer backbone: ``forward(x [N, C, H, W], t [N], y [N] int64)``
    -> ``[N, out_channels, H, W]``: epsilon in channels ``[:C]``, the variance interpolation in
    ``[C:]`` when ``learn_sigma``."""

    def __init__(self, config: DiTConfig | None = None, **overrides):
        super().__init__()
        self.config = config = DiTConfig.from_dict({**(config or DiTConfig()).to_dict(), **overrides})
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # fixed, not trained: a buffer, persistent so that the state dict has the checkpoints' entry
        grid = config.input_size // config.patch_size
        self.register_buffer("pos_embed", sincos_2d(config.hidden_size, grid).unsqueeze(0))  # [1, T, D]
        self.blocks = nn.ModuleList(DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original initialisation: Xavier-uniform linears (and the patch convolution seen as
        one), N(0, 0.02) label table and timestep MLP, zero adaLN and output layers (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[N, h w, p p C']`` -> ``[N, C', h p, w p]``."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size  # from the input, so tracers see no int() of a size
        x = self.x_embedder(x) + self.pos_embed  # [N, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [N, D]
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c), h, w)  # [N, out_channels, H, W]

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched call, as the original sampler calls it.

        ``x [2N, ...]``: its first half is used for both halves; ``y``: the class labels in the first
        half and the "no class" label ``num_classes`` in the second. The first ``guided_channels``
        output channels (default: ``in_channels``, the epsilon channels) become
        ``uncond + cfg_scale * (cond - uncond)`` in both halves; the rest (the learned-sigma
        channels) are left as each half predicted them, so the first half's equal the conditional
        prediction. The original guides only 3 channels "for exact reproducibility" of its
        published samples: pass ``guided_channels=3`` to reproduce those bit for bit.
        """
        if self.y_embedder.dropout_prob <= 0:
            raise CompressKitError("this DiT was built with class_dropout_prob=0, so it has no 'no class' label for classifier-free guidance; sample with forward")
        guided = self.in_channels if guided_channels is None else guided_channels
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided_eps, guided_eps], dim=0), rest], dim=1)


# ---- checkpoints of the original layout ----------------------------------------------------------
KNOWN_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}  # DiT-XL, -L, -B, -S: heads are not in the weights


def looks_like_dit(keys) -> bool:
    """Do these state-dict keys have the original DiT layout?"""
    keys = set(keys)
    return {"x_embedder.proj.weight", "final_layer.linear.weight", "blocks.0.attn.qkv.weight"} <= keys


def config_from_shapes(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> DiTConfig:
    """The :class:`DiTConfig` of an original-layout state dict, read from its tensor shapes.

    The shapes fix everything but the number of heads, taken from ``num_heads`` or the published
    models' table (:data:`KNOWN_HEADS`), and whether the label table's last row is the "no class"
    label: assumed so (class dropout 0.1), as in every released DiT.
    """
    if not looks_like_dit(shapes):
        raise CompressKitError("these weights do not have the original DiT layout (x_embedder.proj, blocks.N.attn.qkv, final_layer.linear); pass a DiT checkpoint")
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    heads = num_heads or KNOWN_HEADS.get(hidden)
    if heads is None:
        raise CompressKitError(f"a DiT of hidden size {hidden} is no published model, so its number of heads is unknown; put a JSON config (num_heads, ...) next to the checkpoint")
    if "pos_embed" not in shapes:
        raise CompressKitError("this DiT checkpoint has no pos_embed, so its input size is unknown; put a JSON config (input_size, ...) next to it")
    grid = math.isqrt(shapes["pos_embed"][1])
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.endswith(".attn.qkv.weight"))
    table_rows = shapes["y_embedder.embedding_table.weight"][0]
    return DiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
        mlp_ratio=shapes["blocks.0.mlp.fc1.weight"][0] / hidden, class_dropout_prob=0.1, num_classes=table_rows - 1,
        learn_sigma=shapes["final_layer.linear.weight"][0] == 2 * in_channels * patch * patch,
    )
