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
from torch import nn

from compresskit.files import save_tensors

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


def save_with_sidecar(state: dict[str, torch.Tensor], path: Path, architecture: dict) -> Path:
    """``state`` as safetensors at ``path`` and ``{"architecture": architecture}`` as the ``.json``
    beside it (the sidecar the dit and ldm-unet adapters read); returns ``path``."""
    save_tensors({k: v.contiguous() for k, v in state.items()}, path)
    path.with_suffix(".json").write_text(json.dumps({"architecture": architecture}, indent=2))
    return path


def save_original_dit(compressed: nn.Module, directory: Path) -> Path:
    """``dit.safetensors`` (the original layout's key names) and ``dit.json`` (``{"architecture": DiTConfig}``)
    of a dense copy of ``compressed``, an original-layout :class:`~.dit.DiT`; returns the weights' path."""
    fresh = dense_copy(compressed, type(compressed)(compressed.config))
    return save_with_sidecar(fresh.state_dict(), Path(directory) / ORIGINAL_WEIGHTS, compressed.config.to_dict())
