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
    flat = codes.reshape(-1).numpy()
    if nbits == 8:
        return torch.from_numpy(flat.astype(np.uint8))
    if 8 % nbits == 0:  # 1, 2, 4 bits: whole codes per byte, code j of a byte in bits nbits*j and up
        per = 8 // nbits
        lanes = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
        lanes[: flat.size] = flat & ((1 << nbits) - 1)
        lanes = lanes.reshape(-1, per)
        out = lanes[:, 0].copy()
        for j in range(1, per):
            out |= lanes[:, j] << np.uint8(nbits * j)
        return torch.from_numpy(out)
    bits = np.empty((flat.size, nbits), dtype=np.uint8)  # bit k of every code, one column at a time
    for k in range(nbits):
        bits[:, k] = (flat >> k) & 1
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, nbits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: returns codes of ``shape`` in :func:`code_dtype` (nbits)."""
    numel = int(np.prod(shape)) if shape else 1
    raw = packed.reshape(-1).numpy()
    if nbits == 8:
        return torch.from_numpy(raw[:numel].copy()).reshape(shape)
    if 8 % nbits == 0:
        per, mask = 8 // nbits, np.uint8((1 << nbits) - 1)
        lanes = np.empty((raw.size, per), dtype=np.uint8)
        for j in range(per):
            lanes[:, j] = (raw >> np.uint8(nbits * j)) & mask
        return torch.from_numpy(lanes.reshape(-1)[:numel].copy()).reshape(shape)
    bits = np.unpackbits(raw, bitorder="little")[: numel * nbits].reshape(numel, nbits)
    values = np.zeros(numel, dtype=np.int32)
    for k in range(nbits):
        values |= bits[:, k].astype(np.int32) << k
    return torch.from_numpy(values).to(code_dtype(nbits)).reshape(shape)
