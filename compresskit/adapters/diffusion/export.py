"""Dense export for the diffusion family: a compressed model written as the plain checkpoint it came from.

The compressed model is left untouched. A fresh, uncompressed model of the same architecture is built
and filled with the compressed model's rebuilt (dequantized) values, read name by name through the
parametrizations. Because every name is read, tensors that the compressed model holds once (diffusers'
DiT embedder copies tied to block 0's, see ``adapter.tie_copied_embedders``) come out as the separate
copies the family's library expects, and the fresh model loads them with ``strict=True``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ORIGINAL_WEIGHTS = "dit.safetensors"  # the sidecar is the same name with .json, as the dit adapter reads it


def dense_copy(compressed: nn.Module, fresh: nn.Module) -> nn.Module:
    """Fill ``fresh`` (an uncompressed model of ``compressed``'s architecture) with the values
    ``compressed`` computes with, its parametrized tensors rebuilt; returns ``fresh`` in eval mode."""
    state = {}
    with torch.no_grad():
        for key in fresh.state_dict():
            owner, _, attr = key.rpartition(".")
            value = getattr(compressed.get_submodule(owner), attr)  # a parametrized tensor is rebuilt here
            state[key] = value.detach().to("cpu")
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def save_diffusers(compressed: nn.Module, directory: Path) -> None:
    """``save_pretrained`` (safetensors) of a dense copy of the diffusers model ``compressed``."""
    fresh = type(compressed).from_config(compressed.config)
    dense_copy(compressed, fresh).save_pretrained(str(directory), safe_serialization=True)


def save_original_dit(compressed: nn.Module, directory: Path) -> Path:
    """``dit.safetensors`` (the original layout's key names) and ``dit.json`` (``{"architecture": DiTConfig}``)
    of a dense copy of ``compressed``, an original-layout :class:`~.dit.DiT`; returns the weights' path."""
    fresh = dense_copy(compressed, type(compressed)(compressed.config))
    path = Path(directory) / ORIGINAL_WEIGHTS
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": compressed.config.to_dict()}, indent=2))
    return path


def save_ldm_unet(compressed: nn.Module, directory: Path, prefix: str, class_table: dict[str, str]) -> Path:
    """``unet.safetensors`` and its ``unet.json`` sidecar (``{"architecture": LDMConfig}``) of a dense
    copy of ``compressed``, an :class:`~.ldm.LDMUNet`; returns the weights' path.

    A model that reads an LDM conditioning (a ClassEmbedder table or cross-attention) is written as an
    LDM checkpoint writes it: every ``UNetModel`` key under ``prefix`` (``model.diffusion_model.``),
    the class table under LDM's own name (``class_table``: LDM's key -> ours), so a LatentDiffusion
    ``load_state_dict(..., strict=False)`` takes it. Any other (guided-diffusion's ``label_emb`` or
    unconditional) is the bare ``UNetModel`` state dict that guided-diffusion loads."""
    fresh = dense_copy(compressed, type(compressed)(compressed.config))
    state = {k: v.contiguous() for k, v in fresh.state_dict().items()}
    config = compressed.config
    if config.context_classes is not None or config.context_dim is not None:
        ours_to_ldm = {ours: theirs for theirs, ours in class_table.items()}
        state = {ours_to_ldm.get(k, prefix + k): v for k, v in state.items()}
    path = Path(directory) / "unet.safetensors"
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": config.to_dict()}, indent=2))
    return path
