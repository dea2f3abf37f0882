"""Bit packing of integer codes, so that stored size equals the size accounting exactly.

A code of ``nbits`` bits costs ``nbits`` bits on disk: ``pack_codes`` writes the low ``nbits`` of
every code little-endian into a flat uint8 stream; ``unpack_codes`` reads them back.
"""
from __future__ import annotations

import numpy as np
import torch


def code_dtype(nbits: int) -> torch.dtype:
    """The smallest torch integer dtype that holds codes of ``nbits`` bits in memory."""
    if nbits <= 8:
        return torch.uint8
    if nbits <= 15:
        return torch.int16
    return torch.int32


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape) into ``ceil(numel * nbits / 8)`` bytes, uint8 1-D."""
    flat = codes.reshape(-1).to(torch.int64).numpy()
    if nbits == 8:
        return torch.from_numpy(flat.astype(np.uint8))
    shifts = np.arange(nbits, dtype=np.int64)
    bits = ((flat[:, None] >> shifts) & 1).astype(np.uint8)  # [numel, nbits]
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, nbits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: returns codes of ``shape`` in :func:`code_dtype` (nbits)."""
    numel = int(np.prod(shape)) if shape else 1
    raw = packed.reshape(-1).numpy()
    if nbits == 8:
        values = raw[:numel].astype(np.int64)
    else:
        bits = np.unpackbits(raw, bitorder="little")[: numel * nbits].reshape(numel, nbits)
        values = (bits.astype(np.int64) << np.arange(nbits, dtype=np.int64)).sum(axis=1)
    return torch.from_numpy(values).to(code_dtype(nbits)).reshape(shape)
