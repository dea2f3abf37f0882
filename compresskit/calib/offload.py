"""Where the calibrator keeps one block's activations: in memory, or on disk for large models.

The block walk holds, per calibration batch, the current block's input (and, for the block M-step,
the uncompressed block's output). For SmolLM2-135M with 16 x 512 tokens that is 19 MB; for a 7B
model with 128 x 2048 tokens it is 4 GB per copy. With a directory, every tensor goes to its own
safetensors file there as soon as it is produced and is read back when a batch needs it, so memory
holds one batch's activation at a time. The files live in a fresh temporary folder inside the
directory, removed by :meth:`ActivationStore.close` (also on errors, via ``with``).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compresskit.errors import CompressKitError


@dataclass(frozen=True)
class Ref:
    """A stored tensor, by key (what the calibrator keeps in place of the tensor itself)."""

    key: str


class ActivationStore:
    """Tensors by key: a dict in memory (``directory=None``) or files in a temporary folder under ``directory``."""

    def __init__(self, directory: str | Path | None = None):
        self._memory: dict[str, torch.Tensor] = {}
        self.folder: Path | None = None
        if directory is not None:
            directory = Path(directory)
            if directory.exists() and not directory.is_dir():
                raise CompressKitError(f"activation offload: {directory} is not a directory")
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix="compresskit-activations-", dir=directory))
            except OSError as exc:
                raise CompressKitError(f"activation offload: cannot write to {directory} ({exc.strerror or exc})") from None

    def put(self, key: str, tensor: torch.Tensor) -> Ref:
        """Store ``tensor`` (detached) under ``key``, replacing what was there; returns its :class:`Ref`."""
        tensor = tensor.detach()
        if self.folder is None:
            self._memory[key] = tensor
        else:
            save_file({"t": tensor.contiguous().cpu()}, str(self.folder / f"{key}.safetensors"))
        return Ref(key)

    def get(self, ref: Ref) -> torch.Tensor:
        if self.folder is None:
            return self._memory[ref.key]
        return load_file(str(self.folder / f"{ref.key}.safetensors"))["t"]

    def resolve(self, value):
        """``value`` itself, or the stored tensor when it is a :class:`Ref`."""
        return self.get(value) if isinstance(value, Ref) else value

    def close(self) -> None:
        """Drop everything stored (and the temporary folder)."""
        self._memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
