"""The project's own reference diffusion models: ``fmnist-dit`` and ``fmnist-unet``.

No pretrained DiT or U-Net DDPM can be had offline, so the project trains two small class-conditional
models on Fashion-MNIST itself (``bench/train_fmnist_reference.py``, fixed seeds, resumable) and ships
their EMA weights in ``weights/``: ``fmnist_<model>.safetensors`` with the training script's JSON
beside it (``{"architecture": "dit" | "unet2d", "model": <constructor config>, "training": {...}}``).
The ``dit`` and ``unet`` adapters resolve the aliases here; nothing else knows the file names.
"""
from __future__ import annotations

import json
from pathlib import Path

from compresskit.errors import CompressKitError

WEIGHTS_DIR = Path(__file__).parent / "weights"
# alias -> (file in weights/, the training script's --model, what the JSON's "architecture" says)
REFERENCES = {
    "fmnist-dit": ("fmnist_dit.safetensors", "dit", "dit"),
    "fmnist-unet": ("fmnist_unet.safetensors", "unet", "unet2d"),
}


def is_reference(spec: str | None, architecture: str) -> bool:
    """Whether ``spec`` names the reference model of ``architecture`` (``"dit"`` or ``"unet2d"``)."""
    entry = REFERENCES.get(str(spec).lower()) if spec is not None else None
    return entry is not None and entry[2] == architecture


def reference_files(alias: str) -> tuple[Path, dict]:
    """``(weights file, its JSON)`` of a reference model; one clear error when it was not trained here."""
    name, trainer_model, architecture = REFERENCES[alias.lower()]
    weights = WEIGHTS_DIR / name
    sidecar = weights.with_suffix(".json")
    if not weights.is_file() or not sidecar.is_file():
        raise CompressKitError(
            f"the reference model {alias} is not in this installation ({weights} or its .json is missing); train it with "
            f"`PYTHONPATH=. python bench/train_fmnist_reference.py --model {trainer_model}` from the source tree"
        )
    try:
        config = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError:
        raise CompressKitError(f"{sidecar} is not valid JSON; re-run bench/train_fmnist_reference.py --model {trainer_model}") from None
    if not isinstance(config, dict) or config.get("architecture") != architecture or not isinstance(config.get("model"), dict):
        raise CompressKitError(f"{sidecar} does not describe a {architecture} reference model; re-run bench/train_fmnist_reference.py --model {trainer_model}")
    return weights, config
