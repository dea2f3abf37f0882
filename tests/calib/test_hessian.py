import pytest
import torch

from compresskit.calib import HessianAccumulator, conv_inputs
from compresskit.errors import CompressKitError


def test_streaming_equals_one_shot_over_uneven_and_3d_batches():
    torch.manual_seed(0)
    batches = [torch.randn(1, 6), torch.randn(7, 6), torch.randn(2, 5, 6), torch.randn(3, 1, 4, 6)]
    acc = HessianAccumulator(6)
    for x in batches:
        acc.add_batch(x)
    X = torch.cat([x.reshape(-1, 6) for x in batches]).double()  # [N, 6]
    assert acc.n_samples_ == X.shape[0] == 1 + 7 + 10 + 12
    torch.testing.assert_close(acc.hessian, X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)


def test_split_does_not_change_the_result():
    torch.manual_seed(1)
    X = torch.randn(64, 5)
    one = HessianAccumulator(5).add_batch(X)
    many = HessianAccumulator(5)
    for chunk in X.split([3, 20, 1, 40]):
        many.add_batch(chunk)
    torch.testing.assert_close(one.hessian, many.hessian, rtol=1e-12, atol=1e-12)


def test_float32_option_and_half_inputs():
    torch.manual_seed(2)
    X = torch.randn(100, 4)
    acc = HessianAccumulator(4, dtype=torch.float32).add_batch(X.half())
    assert acc.hessian.dtype == torch.float32
    Xh = X.half().float()
    torch.testing.assert_close(acc.hessian, Xh.T @ Xh / 100, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda acc: acc.add_batch(torch.randn(3, 5)),  # wrong width
        lambda acc: acc.add_batch(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])),
        lambda acc: acc.add_batch(torch.ones(2, 4, dtype=torch.int64)),
        lambda acc: acc.hessian,  # nothing added
    ],
)
def test_errors_are_one_line(make):
    with pytest.raises(CompressKitError) as info:
        make(HessianAccumulator(4))
    assert "\n" not in str(info.value)


def test_nan_batch_leaves_state_unchanged():
    acc = HessianAccumulator(2).add_batch(torch.ones(3, 2))
    with pytest.raises(CompressKitError):
        acc.add_batch(torch.tensor([[float("inf"), 1.0]]))
    assert acc.n_samples_ == 3
    torch.testing.assert_close(acc.hessian, torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own note on even kernels
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=(3, 2), stride=2, padding=1),
        dict(kernel_size=3, dilation=2, padding=(2, 1)),
        dict(kernel_size=(2, 4), padding="same", dilation=(1, 2)),  # asymmetric 'same' padding
        dict(kernel_size=3, padding="valid"),
    ],
)
def test_conv_inputs_reproduce_the_conv(kwargs):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, **kwargs)
    x = torch.randn(2, 3, 9, 8)
    rows = conv_inputs(x, conv)  # [B * L, C * kh * kw]
    y = conv(x)  # [B, out, H', W']
    expect = y.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows @ conv.weight.flatten(1).T + conv.bias, expect, rtol=1e-5, atol=1e-5)


def test_add_conv_batch_accumulates_unfolded_patches():
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    acc = HessianAccumulator(2 * 9).add_conv_batch(x, conv).add_conv_batch(x[0], conv)  # unbatched too
    rows = torch.cat([conv_inputs(x, conv), conv_inputs(x[:1], conv)]).double()
    assert acc.n_samples_ == 3 * 25
    torch.testing.assert_close(acc.hessian, rows.T @ rows / rows.shape[0])


def test_grouped_conv_is_refused():
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(CompressKitError, match="groups=1"):
        conv_inputs(torch.randn(1, 4, 5, 5), conv)


def test_take_hessian_is_the_hessian_made_in_place():
    acc = HessianAccumulator(6, dtype=torch.float32).add_batch(torch.randn(40, 6)).add_batch(torch.randn(9, 6))
    expected = acc.hessian
    sum_ = acc.xtx_
    H = acc.take_hessian()
    assert torch.equal(H, expected) and H.data_ptr() == sum_.data_ptr()  # no second [n, n]
    assert acc.xtx_ is None and acc.n_samples_ == 0


def test_banded_sums_are_bitwise_those_of_partials_and_match_the_product(monkeypatch):
    """add_batch adds X^T X a band of rows at a time (no [n, n] temporary); a distributed walk adds
    partials made band by band in the same way: the two sums must be equal to the bit."""
    from compresskit.calib import hessian

    real = hessian.row_bands
    monkeypatch.setattr(hessian, "row_bands", lambda size, width: real(size, width, budget=2 * width))
    torch.manual_seed(3)
    batches = [torch.randn(50, 9), torch.randn(3, 4, 9), torch.randn(1, 9)]
    banded, parts = HessianAccumulator(9, dtype=torch.float32), HessianAccumulator(9, dtype=torch.float32)
    for x in batches:
        banded.add_batch(x)
        parts.add_partial(*parts.partial(x))
    assert torch.equal(banded.xtx_, parts.xtx_) and banded.n_samples_ == parts.n_samples_ == 63
    X = torch.cat([x.reshape(-1, 9) for x in batches])
    torch.testing.assert_close(banded.xtx_, X.T @ X, rtol=1e-5, atol=1e-5)
    cross = torch.zeros(9, 9)
    hessian.banded_product(X, 2 * X, into=cross)
    assert torch.equal(cross, hessian.banded_product(X, 2 * X))


def test_inputs_that_could_overflow_are_summed_whole_and_checked():
    acc = HessianAccumulator(2, dtype=torch.float32).add_batch(torch.tensor([[1e18, 1.0], [1e18, 0.0]]))
    assert torch.isfinite(acc.xtx_).all() and float(acc.xtx_[0, 0]) == pytest.approx(2e36, rel=1e-6)
    with pytest.raises(CompressKitError, match="NaN or infinite"):
        acc.add_batch(torch.tensor([[3e19, 1.0]]))  # finite inputs, but their product overflows float32
    assert acc.n_samples_ == 2
