"""RTN beyond the conformance suite: more than 8 bits."""
import pytest
import torch

from compresskit.quantizers.rtn import RTN


@pytest.mark.parametrize("bits", [12, 16])
def test_rtn_above_8_bits_keeps_every_value_within_half_a_step(bits, tmp_path):
    # 3DGS positions: one row of many values, where a float16 scale would be too coarse for 2^16 levels
    W = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 3 + 10
    q = RTN(bits=bits).fit(W)
    step = (W.amax(1) - W.amin(1)) / (2**bits - 1)
    err = (q.inverse_transform() - W).abs().amax(1)
    assert (err <= step * 0.5 + 1e-6 * W.abs().amax()).all(), (err, step)
    assert q.scales_.dtype == torch.float32 and q.size_report().bits_per_weight < bits + 0.1
