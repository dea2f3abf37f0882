import pytest
import torch

import compresskit.quantizers.gptq as gptq_mod
from compresskit.calib import HessianAccumulator
from compresskit.errors import CompressKitError
from compresskit.quantizers.base import load_quantizer
from compresskit.quantizers.gptq import GPTQ
from compresskit.quantizers.rtn import RTN
from compresskit.registry import get_quantizer


def correlated_layer(n_in=64, n_out=32, n_rows=1024, seed=0):
    """Inputs X = Z A (correlated features) and a random weight: [n_rows, n_in], [n_out, n_in]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_rows, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    W = torch.randn(n_out, n_in, generator=g)
    return X, W


def output_error(X, W, W_hat):
    return ((X @ W.T - X @ W_hat.T) ** 2).sum().item()


def hessian_of(X):
    return HessianAccumulator(X.shape[1]).add_batch(X).hessian


def test_registered_as_gptq():
    assert get_quantizer("gptq") is GPTQ
    assert GPTQ().get_params() == dict(bits=4, group_size=None, symmetric=False, act_order=False, damp=0.01, block_size=128)


@pytest.mark.parametrize("group_size", [None, 16, 24])  # 24: last group padded
@pytest.mark.parametrize("symmetric", [False, True])
def test_identity_hessian_is_rtn_exactly(group_size, symmetric):
    _, W = correlated_layer()
    ref = RTN(3, group_size, symmetric).fit(W)
    for q in (
        GPTQ(3, group_size, symmetric, block_size=8).fit(W, hessian=torch.eye(64)),  # through the sweep
        GPTQ(3, group_size, symmetric).fit(W),  # hessian=None
    ):
        assert torch.equal(q.codes_, ref.codes_)
        assert torch.equal(q.scales_, ref.scales_) and torch.equal(q.zeros_, ref.zeros_)
        assert q.pad_ == ref.pad_
        assert torch.equal(q.inverse_transform(), ref.inverse_transform())
        assert q.size_report() == ref.size_report()


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("group_size", [None, 16])
def test_beats_rtn_on_correlated_inputs(bits, group_size):
    X, W = correlated_layer()
    rtn = output_error(X, W, RTN(bits, group_size).fit(W).inverse_transform())
    gptq = output_error(X, W, GPTQ(bits, group_size).fit(W, hessian=hessian_of(X)).inverse_transform())
    assert gptq < 0.8 * rtn, (gptq / rtn)


@pytest.mark.parametrize("group_size", [None, 16, 24])
@pytest.mark.parametrize("act_order", [False, True])
def test_codes_are_what_the_sweep_chose(monkeypatch, group_size, act_order):
    """inverse_transform() equals the sweep's Q bitwise, and W = Q + E U (the GPTQ identity)."""
    seen = {}
    sweep = gptq_mod._gptq_columns

    def spy(q, W, U, group_of, g, dynamic):
        W0 = W.clone()
        codes, Q, E = sweep(q, W, U, group_of, g, dynamic)
        seen.update(W0=W0, U=U, Q=Q, E=E)
        return codes, Q, E

    monkeypatch.setattr(gptq_mod, "_gptq_columns", spy)
    X, W = correlated_layer()
    H = hessian_of(X)
    q = GPTQ(3, group_size, act_order=act_order, block_size=16).fit(W, hessian=H)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(64)
    Q = seen["Q"][:, :64]  # padding columns are last in the sweep
    assert torch.equal(q.inverse_transform()[:, order], Q)
    assert torch.equal(q.transform(q.inverse_transform()), q.codes_)  # codes_ decode to grid points
    torch.testing.assert_close(seen["Q"] + seen["E"] @ seen["U"], seen["W0"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size", [None, 24])
def test_block_size_does_not_change_the_result(group_size):
    """Groups starting inside a block see every pending lazy update."""
    X, W = correlated_layer()
    H = hessian_of(X)
    a = GPTQ(3, group_size, block_size=128).fit(W, hessian=H)
    b = GPTQ(3, group_size, block_size=5).fit(W, hessian=H)
    assert (a.codes_ == b.codes_).float().mean() > 0.99
    torch.testing.assert_close(a.scales_, b.scales_, rtol=1e-3, atol=1e-3)


def unequal_scales_layer():
    X, W = correlated_layer(seed=3)
    g = torch.Generator().manual_seed(4)
    col_scale = torch.exp(torch.linspace(-3, 3, 64))[torch.randperm(64, generator=g)]
    return X * col_scale, W


@pytest.mark.parametrize("group_size", [None, 16])
def test_act_order_helps_with_unequal_input_scales(group_size):
    X, W = unequal_scales_layer()
    H = hessian_of(X)
    plain = GPTQ(3, group_size).fit(W, hessian=H)
    ordered = GPTQ(3, group_size, act_order=True).fit(W, hessian=H)
    rtn = RTN(3, group_size).fit(W)
    err_plain = output_error(X, W, plain.inverse_transform())
    err_ordered = output_error(X, W, ordered.inverse_transform())
    assert err_ordered <= err_plain
    assert err_ordered < 0.8 * output_error(X, W, rtn.inverse_transform())
    # static groups: RTN's layout, and the grid is RTN's on the original W
    assert ordered.scales_.shape == rtn.scales_.shape and ordered.codes_.shape == rtn.codes_.shape
    assert torch.equal(ordered.scales_, rtn.scales_) and torch.equal(ordered.zeros_, rtn.zeros_)


def test_dead_inputs():
    X, W = correlated_layer()
    dead = [3, 40]
    X[:, dead] = 0.0
    H = hessian_of(X)
    assert (torch.diagonal(H)[dead] == 0).all()
    q = GPTQ(3, 16).fit(W, hessian=H)
    W_hat = q.inverse_transform()
    assert torch.isfinite(W_hat).all()
    # a dead column is quantized as zero: the grid point nearest 0 in its group
    scale = q.scales_.float()[:, [d // 16 for d in dead]]
    assert (W_hat[:, dead].abs() <= scale / 2 + 1e-6).all()
    assert output_error(X, W, W_hat) < 0.8 * output_error(X, W, RTN(3, 16).fit(W).inverse_transform())


def test_conv_kernel_uses_the_flattened_width():
    torch.manual_seed(0)
    W = torch.randn(4, 3, 2, 2)
    q = GPTQ(2).fit(W, hessian=torch.eye(12) + 0.1)
    assert q.inverse_transform().shape == (4, 3, 2, 2)
    with pytest.raises(CompressKitError, match=r"\[12, 12\]"):
        GPTQ(2).fit(W, hessian=torch.eye(3))


@pytest.mark.parametrize(
    "hessian, match",
    [
        (torch.eye(63), "must be"),
        (torch.eye(64)[None], "must be"),
        (torch.full((64, 64), float("nan")), "NaN"),
        (torch.eye(64).tolist(), "float tensor"),
        (-torch.eye(64), "positive definite"),
    ],
)
def test_bad_hessian(hessian, match):
    _, W = correlated_layer()
    with pytest.raises(CompressKitError, match=match) as info:
        GPTQ(3).fit(W, hessian=hessian)
    assert "\n" not in str(info.value)


def test_singular_hessian_needs_damping():
    X, W = correlated_layer(n_rows=16)  # rank 16 < 64
    H = hessian_of(X)
    with pytest.raises(CompressKitError, match="raise damp"):
        GPTQ(3, damp=0.0).fit(W, hessian=H)
    GPTQ(3).fit(W, hessian=H)  # default damping copes


@pytest.mark.parametrize("params", [dict(act_order=1), dict(damp=-0.1), dict(damp="x"), dict(block_size=0)])
def test_bad_params(params):
    with pytest.raises(CompressKitError):
        GPTQ(**params).fit(torch.randn(4, 8), hessian=torch.eye(8))


def test_deterministic_and_accepts_an_accumulator():
    X, W = correlated_layer()
    acc = HessianAccumulator(64).add_batch(X)
    a = GPTQ(2, 16, act_order=True).fit(W, hessian=acc)
    b = GPTQ(2, 16, act_order=True).fit(W, hessian=acc.hessian.float())
    assert torch.equal(a.codes_, b.codes_) and torch.equal(a.scales_, b.scales_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    X, W = correlated_layer()
    q = GPTQ(3, 24, symmetric=True, act_order=True, damp=0.05, block_size=32).fit(W.to(dtype), hessian=hessian_of(X))
    q.save(tmp_path / "q.safetensors")
    r = load_quantizer(tmp_path / "q.safetensors")
    assert type(r) is GPTQ and r.get_params() == q.get_params()
    assert torch.equal(r.codes_, q.codes_)
    assert torch.equal(r.inverse_transform(), q.inverse_transform()) and r.inverse_transform().dtype == dtype
    assert r.size_report() == q.size_report()
