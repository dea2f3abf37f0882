"""Bit packing: the fast paths write the very bytes of the plain bit-by-bit definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compresskit.quantizers.packing import code_dtype, pack_codes, unpack_codes


def reference_pack(codes: torch.Tensor, nbits: int) -> np.ndarray:
    """The format's definition: the low ``nbits`` of each code, little-endian, in one bit stream."""
    flat = codes.reshape(-1).to(torch.int64).numpy()
    bits = ((flat[:, None] >> np.arange(nbits)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_packing_is_the_bit_stream_and_round_trips(nbits, numel):
    g = torch.Generator().manual_seed(nbits * 1000 + numel)
    codes = torch.randint(0, 2**nbits, (numel,), generator=g).to(code_dtype(nbits))
    shape = (numel,) if numel % 7 else (7, numel // 7)
    codes = codes.reshape(shape)
    packed = pack_codes(codes, nbits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel * nbits // 8)
    assert np.array_equal(packed.numpy(), reference_pack(codes, nbits))
    back = unpack_codes(packed, nbits, shape)
    assert back.dtype == code_dtype(nbits) and back.shape == codes.shape and torch.equal(back, codes)
