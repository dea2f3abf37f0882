"""Files as a plain ``open`` would make them: permissions from the umask, whatever wrote them.

safetensors' writer creates its files 0o600, and ``tempfile.mkdtemp`` / ``mkstemp`` make 0o700 / 0o600:
right for scratch space, wrong for a compressed model a user will share or serve. What compresskit hands
to users goes through :func:`save_tensors` or :func:`write_atomically`, or is chmod-ed with :func:`umask`
after a temporary name.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

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


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(stream)`` into a temporary file beside ``path``, synced, then ``os.replace``-d onto it: a
    reader never sees half a file and a failure leaves nothing behind. The file gets the umask's
    permissions (``os.open`` with 0o666, as a plain ``open`` would; mkstemp would leave 0o600).
    ``OSError`` propagates for the caller to word."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
