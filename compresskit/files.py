"""Files as a plain ``open`` would make them: permissions from the umask, whatever wrote them.

safetensors' writer creates its files 0o600, and ``tempfile.mkdtemp`` / ``mkstemp`` make 0o700 / 0o600:
right for scratch space, wrong for a compressed model a user will share or serve. What compresskit hands
to users goes through :func:`save_tensors`, or is chmod-ed with :func:`umask` after a temporary name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the permissions a plain ``open`` would give (0o666 less the umask)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())
