"""Compressed tensors through parametrize: exact rebuild, any owner type, layouts, ties, autograd."""
import copy

import pytest
import torch
from torch import nn

from compresskit.errors import CompressKitError
from compresskit.nn import densify, is_quantized, quantize_tensor, quantized_of, quantized_tensors, share_tensor
from compresskit.quantizers import PQ, RTN, VQ
from compresskit.targets import Layout

QUANTIZERS = [lambda: PQ(bits=2), lambda: VQ(bits=2), lambda: RTN(bits=3, group_size=16)]


def put(module, quantizer, attr="weight", layout=Layout()):
    quantizer.fit(layout.to_rows(getattr(module, attr)).detach())
    return quantize_tensor(module, attr, quantizer, layout)


@pytest.mark.parametrize("make_q", QUANTIZERS)
def test_linear_weight_is_exactly_inverse_transform_and_the_class_is_kept(make_q):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = make_q()
    put(lin, q)
    assert isinstance(lin, nn.Linear) and is_quantized(lin, "weight")
    assert torch.equal(lin.weight, q.inverse_transform())
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, q.inverse_transform(), lin.bias))
    assert lin.parametrizations.weight.original.numel() == 0  # the dense weight is gone


def test_conv_embedding_and_a_subclass_keep_their_own_forward():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 32, 3, stride=2, padding=1)
    q = RTN(bits=4)
    put(conv, q)
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, q.inverse_transform(), conv.bias, stride=2, padding=1))
    emb = nn.Embedding(300, 16)
    qe = VQ(bits=2)
    put(emb, qe)
    ids = torch.tensor([[1, 2, 299]])
    torch.testing.assert_close(emb(ids), qe.inverse_transform()[ids])

    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    sub = Doubling(16, 8)
    qs = RTN(bits=4)
    put(sub, qs)
    x = torch.randn(3, 16)
    assert isinstance(sub, Doubling)
    torch.testing.assert_close(sub(x), 2 * nn.functional.linear(x, qs.inverse_transform(), sub.bias))


def test_a_transposed_layout_and_a_bare_tensor():
    class Conv1DLike(nn.Module):  # transformers' GPT-2 Conv1D: weight stored [in, out]
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))

        def forward(self, x):
            return x @ self.weight

    layer = Conv1DLike(32, 48)
    q = PQ(bits=2, pool=False)
    put(layer, q, layout=Layout(out_axis=1))
    assert q.shape_ == (48, 32) and layer.weight.shape == (32, 48)
    torch.testing.assert_close(layer.weight, q.inverse_transform().T)

    holder = nn.Module()
    holder.register_buffer("sh", torch.randn(512, 12))
    qb = PQ(bits=2, pool=False)
    put(holder, qb, attr="sh", layout=Layout(inputs="none"))
    assert torch.equal(holder.sh, qb.inverse_transform())
    assert list(quantized_tensors(holder)) == ["sh"]


def test_a_tied_tensor_is_one_compressed_tensor_and_densify_keeps_the_tie():
    emb = nn.Embedding(256, 16)
    head = nn.Linear(16, 256, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    qt = put(emb, VQ(bits=2))
    share_tensor(head, "weight", qt)
    assert quantized_of(head, "weight") is qt and list(quantized_tensors(model)) == ["emb"]
    assert torch.equal(head.weight, emb.weight)
    densify(model)
    assert head.weight is emb.weight and type(emb) is nn.Embedding and not is_quantized(head, "weight")


def test_half_deepcopy_and_assignment():
    lin = nn.Linear(32, 64)
    put(lin, PQ(bits=2))
    x = torch.randn(3, 32)
    y32 = lin(x)
    twin = copy.deepcopy(lin)
    torch.testing.assert_close(twin(x), y32)
    lin.to(torch.bfloat16)
    y16 = lin(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)
    with pytest.raises(CompressKitError, match="cannot be assigned"):
        twin.weight = torch.zeros(64, 32)


def test_autograd_reaches_the_pool_and_the_cache_is_refreshed():
    torch.manual_seed(0)
    lin = nn.Linear(32, 64)
    qt = put(lin, PQ(bits=2))
    lin.float()
    with torch.no_grad():
        before = lin(torch.ones(1, 32)).clone()
    qt.pool.requires_grad_(True)
    lin(torch.randn(4, 32)).pow(2).sum().backward()
    assert qt.pool.grad is not None and qt.pool.grad.abs().sum() > 0
    with torch.no_grad():
        qt.pool.add_(0.1)
        after = lin(torch.ones(1, 32))
    assert not torch.allclose(before, after)  # the cached weight was rebuilt after the update


def test_torch_compile_does_not_break():
    lin = nn.Linear(16, 32)
    put(lin, RTN(bits=4))
    compiled = torch.compile(lin, backend="aot_eager")
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lin(x))


def test_shape_mismatch_is_one_clear_error():
    lin = nn.Linear(16, 32)
    q = RTN(bits=4).fit(torch.randn(8, 8))
    with pytest.raises(CompressKitError, match="fitted on shape"):
        quantize_tensor(lin, "weight", q)
