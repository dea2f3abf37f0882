"""The LUT forward (compresskit.nn.lut): the same output as x @ W_hat.T, which layers it serves, and
that it leaves the dense path (and its cache) alone."""
import pytest
import torch
from torch import nn

from compresskit.nn import disable_lut, enable_lut, quantize_tensor, quantized_of
from compresskit.nn import _lut_kernels, lut
from compresskit.quantizers import GPTQ, PQ, RTN, VQ
from compresskit.targets import Layout

CODEBOOKS = {
    "pq-pooled": lambda: PQ(bits=2, n_iter=3, seed=0),
    "pq-plain": lambda: PQ(bits=2, pool=False, n_iter=3, seed=0),
    "pq-plain-rowscale": lambda: PQ(bits=2, pool=False, row_scale=True, n_iter=3, seed=0),
    "pq-pooled-rowscale": lambda: PQ(bits=2, row_scale=True, n_iter=3, seed=0),
    "vq": lambda: VQ(bits=2, n_iter=3, seed=0),
    # two codebooks, one per half of the rows: two runs of rows, two LUTs (the LUT path needs rows >= runs * k)
    "vq-rowgroups-rowscale": lambda: VQ(bits=2, row_groups=2, row_scale=True, n_iter=3, seed=0),
    "vq-3bit-int16-codes": lambda: VQ(bits=3, n_iter=3, seed=0),  # k=512: codes wider than a byte
}


def compressed_linear(make_q, n_in=90, n_out=67, bias=True, seed=0):
    """A Linear with a compressed weight; 90 inputs pad to 92 (23 subspaces: two 8-code words and 7
    left over), 67 rows (eight-row groups and 3 left over)."""
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 3.0, n_out)[:, None])  # unequal rows: row scales matter
    q = make_q().fit(layer.weight.detach())
    quantize_tensor(layer, "weight", q)
    return layer, q


def reference(layer, q, x):
    """x @ W_hat.T + b in float64, the quantizer's own rebuild."""
    y = x.double() @ q.inverse_transform().double().T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("name", list(CODEBOOKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_matches_x_at_w_hat_and_builds_no_dense_weight(name, dtype):
    n_out = 522 if "rowgroups" in name else 67  # 261 rows a group: a run ends inside an eight-row group
    layer, q = compressed_linear(CODEBOOKS[name], n_out=n_out)
    if name.startswith("pq-pooled"):
        assert q.pooled_
    report = enable_lut(layer)
    assert report.switched == [""] and isinstance(layer, nn.Linear)
    x = torch.randn(1, 90).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (1, n_out)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), reference(layer, q, x), **tol)
    assert quantized_of(layer, "weight")._cache is None  # the dense weight was never rebuilt


def test_the_code_tiles_add_up(monkeypatch):
    """A LUT larger than the tile is gathered in several calls that accumulate."""
    monkeypatch.setattr(_lut_kernels, "LUT_TILE_BYTES", 8 * 256 * 4)  # one word (8 subspaces) a tile
    layer, q = compressed_linear(CODEBOOKS["pq-plain"], n_in=200, n_out=40)
    x = torch.randn(3, 200)
    torch.testing.assert_close(lut.lut_linear(x, quantized_of(layer, "weight"), layer.bias).double(), reference(layer, q, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_rows_up_to_the_threshold_use_the_lut_and_more_use_the_cached_dense_weight(bias):
    layer, q = compressed_linear(CODEBOOKS["pq-pooled-rowscale"], bias=bias)
    enable_lut(layer, threshold=4)
    qt = quantized_of(layer, "weight")
    x = torch.randn(2, 2, 90)  # 4 rows: the LUT
    with torch.no_grad():
        y = layer(x)
    assert qt._cache is None
    torch.testing.assert_close(y.double(), reference(layer, q, x), rtol=1e-5, atol=1e-4)
    x = torch.randn(5, 90)  # 5 rows: the dense path, exactly as without the LUT
    with torch.no_grad():
        y = layer(x)
    assert qt._cache is not None
    assert torch.equal(y, nn.functional.linear(x, q.inverse_transform(), layer.bias))


def test_enable_disable_round_trip_and_the_layers_left_alone():
    torch.manual_seed(0)

    class OwnForward(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Conv1DLike(nn.Module):  # weight stored [in, out]
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 48))

        def forward(self, x):
            return x @ self.weight

    model = nn.ModuleDict({
        "pq": nn.Linear(64, 48), "vq": nn.Linear(64, 48), "rtn": nn.Linear(64, 48), "gptq": nn.Linear(64, 48),
        "own": OwnForward(64, 48), "conv1d": Conv1DLike(), "dense": nn.Linear(64, 48),
    })
    for name, q in {"pq": PQ(bits=2, n_iter=2), "vq": VQ(bits=2, n_iter=2), "rtn": RTN(bits=3), "gptq": GPTQ(bits=3), "own": PQ(bits=2, n_iter=2)}.items():
        quantize_tensor(model[name], "weight", q.fit(model[name].weight.detach()))
    q1d = PQ(bits=2, pool=False, n_iter=2).fit(model["conv1d"].weight.detach().T)
    quantize_tensor(model["conv1d"], "weight", q1d, Layout(out_axis=1))
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = {name: model[name](x) for name in model}
    report = enable_lut(model)
    assert report.switched == ["pq", "vq"]
    assert set(report.left_alone) == {"rtn", "gptq", "own", "conv1d"}
    assert "codebook" in report.left_alone["rtn"] and "overrides" in report.left_alone["own"]
    assert all(lut.lut_enabled(model[n]) == (n in ("pq", "vq")) for n in model)
    with torch.no_grad():
        during = {name: model[name](x) for name in model}
    for name in model:
        torch.testing.assert_close(during[name], before[name], rtol=1e-5, atol=1e-4)
    assert disable_lut(model) == ["pq", "vq"]
    assert not any("forward" in vars(m) for m in model.values())
    with torch.no_grad():
        assert torch.equal(model["pq"](x), before["pq"])


def test_gradients_and_changed_state_take_the_right_path():
    layer, q = compressed_linear(CODEBOOKS["pq-plain"])
    enable_lut(layer)
    qt = quantized_of(layer, "weight")
    x = torch.randn(1, 90, requires_grad=True)
    y = layer(x)  # autograd needed: the dense path, and a gradient reaches x
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        first = layer(x)
        q.set_centroids(q.codebook_layout().table.float() * 2)  # in place: the LUT plan must follow
        second = layer(x)
    torch.testing.assert_close(second - layer.bias, 2 * (first - layer.bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(second.double(), reference(layer, q, x.detach()), rtol=1e-5, atol=1e-4)
    assert qt._lut_plan.key == lut._state_key(qt)


def test_codebooks_that_change_along_many_rows_are_left_alone_with_the_reason():
    layer, _ = compressed_linear(lambda: VQ(bits=1, d=2, row_groups=4, n_iter=2), n_out=64)  # 4 runs of 4-entry books
    assert lut.why_not(layer) is None
    layer, _ = compressed_linear(CODEBOOKS["vq-rowgroups-rowscale"], n_out=66)  # 2 runs of 256 entries, 66 rows
    report = enable_lut(layer)
    assert report.switched == [] and "2 runs of rows" in report.left_alone[""]


def test_a_tied_head_is_served_and_its_embedding_left_alone():
    from compresskit.nn import share_tensor

    torch.manual_seed(0)
    emb = nn.Embedding(300, 16)
    head = nn.Linear(16, 300, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    q = VQ(bits=2, n_iter=2).fit(emb.weight.detach())
    qt = quantize_tensor(emb, "weight", q, Layout(inputs="none"))
    share_tensor(head, "weight", qt)
    report = enable_lut(model)
    assert report.switched == ["head"] and "not an nn.Linear" in report.left_alone["emb"]
    x = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x).double(), x.double() @ q.inverse_transform().double().T, rtol=1e-5, atol=1e-4)
