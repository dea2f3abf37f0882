import pytest
import torch
from torch import nn

from compresskit.nn import QuantizedConv1d, QuantizedConv2d, QuantizedEmbedding, QuantizedLinear, qmodule_for
from compresskit.quantizers import PQ, RTN, VQ

QUANTIZERS = [lambda: PQ(bits=2), lambda: VQ(bits=2), lambda: RTN(bits=3, group_size=16)]


@pytest.mark.parametrize("make_q", QUANTIZERS)
def test_linear_weight_is_exactly_inverse_transform(make_q):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = make_q()
    qlin = QuantizedLinear.from_module(lin, q)
    assert torch.equal(qlin.weight, q.inverse_transform())
    x = torch.randn(5, 64)
    torch.testing.assert_close(qlin(x), nn.functional.linear(x, q.inverse_transform(), lin.bias))


def test_conv_and_embedding_forward_match_dense_reconstruction():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 32, 3, stride=2, padding=1)
    qconv = QuantizedConv2d.from_module(conv, RTN(bits=4))
    x = torch.randn(2, 8, 10, 10)
    ref = nn.functional.conv2d(x, qconv.quantizer.inverse_transform(), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(qconv(x), ref)
    conv1 = nn.Conv1d(4, 16, 5, padding=2)
    qconv1 = QuantizedConv1d.from_module(conv1, RTN(bits=4))
    x1 = torch.randn(2, 4, 12)
    torch.testing.assert_close(qconv1(x1), nn.functional.conv1d(x1, qconv1.quantizer.inverse_transform(), conv1.bias, padding=2))
    emb = nn.Embedding(300, 16)
    qemb = QuantizedEmbedding.from_module(emb, VQ(bits=2))
    ids = torch.tensor([[1, 2, 299]])
    torch.testing.assert_close(qemb(ids), qemb.quantizer.inverse_transform()[ids])


def test_registry_maps_source_types():
    assert qmodule_for(nn.Linear(2, 2)) is QuantizedLinear
    assert qmodule_for(nn.Conv2d(1, 1, 1)) is QuantizedConv2d
    assert qmodule_for(nn.LayerNorm(3)) is None


def test_state_dict_to_and_half():
    qlin = QuantizedLinear.from_module(nn.Linear(32, 64), PQ(bits=2))
    sd = qlin.state_dict()
    assert {"codes", "pool", "projection", "bias"} <= set(sd)
    assert sd["codes"].dtype == torch.uint8
    x = torch.randn(3, 32)
    y32 = qlin(x)
    y16 = qlin.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)


def test_autograd_reaches_the_pool_and_cache_is_refreshed():
    torch.manual_seed(0)
    qlin = QuantizedLinear.from_module(nn.Linear(32, 64), PQ(bits=2))
    qlin.float()
    with torch.no_grad():
        before = qlin(torch.ones(1, 32)).clone()
    qlin.pool.requires_grad_(True)
    loss = qlin(torch.randn(4, 32)).pow(2).sum()
    loss.backward()
    assert qlin.pool.grad is not None and qlin.pool.grad.abs().sum() > 0
    with torch.no_grad():
        qlin.pool.add_(0.1)
        after = qlin(torch.ones(1, 32))
    assert not torch.allclose(before, after)  # the cached weight was rebuilt after the update


def test_torch_compile_does_not_break():
    qlin = QuantizedLinear.from_module(nn.Linear(16, 32), RTN(bits=4))
    compiled = torch.compile(qlin, backend="aot_eager")
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), qlin(x))
