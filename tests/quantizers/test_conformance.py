"""One conformance suite over every registered quantizer (scikit-learn's parametrize_with_checks idea)."""
import math

import pytest
import torch

from compresskit import available_quantizers
from compresskit.errors import CompressKitError
from compresskit.quantizers import load_quantizer

# tiny-shape parameters per family; a quantizer registered later falls back to {}
SMALL: dict = {}
# options that change the stored state get the whole suite too: "name+option" -> (name, params)
VARIANTS = {"pq+row_scale": ("pq", {"row_scale": True, "pool": False}), "pq+pool+row_scale": ("pq", {"row_scale": True}),
            "vq+row_scale": ("vq", {"row_scale": True})}
ALL = sorted(available_quantizers()) + sorted(VARIANTS)


def cls_of(name):
    return available_quantizers()[VARIANTS.get(name, (name, {}))[0]]


def make(name, **params):
    base, variant = VARIANTS.get(name, (name, {}))
    return cls_of(name)(**{**SMALL.get(base, {}), **variant, **params})


def weight(rows=128, cols=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


def rel_err(a, b):
    return float(((a.float() - b.float()) ** 2).sum() / (b.float() ** 2).sum())


@pytest.mark.parametrize("name", ALL)
def test_fit_returns_self_and_shapes(name):
    W = weight()
    q = make(name)
    assert q.fit(W) is q
    codes = q.transform(W)
    assert codes.dtype in (torch.uint8, torch.int16, torch.int32) and codes.dim() == 2
    assert q.inverse_transform(codes).shape == W.shape
    # transform re-encodes against the learned (for PQ: pooled) centroids: never worse than fit's codes
    assert rel_err(q.inverse_transform(codes), W) <= rel_err(q.inverse_transform(), W) + 1e-6


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_round_trip(name, dtype):
    W = weight(dtype=dtype)
    W_hat = make(name).fit(W).inverse_transform()
    assert W_hat.dtype == dtype and W_hat.shape == W.shape
    assert rel_err(W_hat, W) < 0.6


@pytest.mark.parametrize("name", ALL)
def test_conv_kernel_shape(name):
    W = torch.randn(32, 8, 3, 3)
    q = make(name).fit(W)
    assert q.inverse_transform().shape == W.shape


@pytest.mark.parametrize("name", ALL)
def test_deterministic_with_seed(name):
    W = weight()
    a = make(name).fit(W).inverse_transform()
    b = make(name).fit(W).inverse_transform()
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_error_falls_as_bits_rise(name):
    W = weight(rows=256, cols=64)
    errors = [rel_err(make(name, bits=b).fit(W).inverse_transform(), W) for b in (1, 2, 3, 4)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name, tmp_path):
    W = weight()
    q = make(name).fit(W)
    path = tmp_path / "q.safetensors"
    q.save(path)
    q2 = load_quantizer(path)
    assert type(q2) is type(q) and q2.get_params() == q.get_params()
    assert torch.equal(q2.codes_, q.codes_)
    assert torch.equal(q2.inverse_transform(), q.inverse_transform())
    assert q2.size_report() == q.size_report()


@pytest.mark.parametrize("name", ALL)
def test_stored_bytes_match_size_accounting(name, tmp_path):
    q = make(name).fit(weight())
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in q.state_tensors().values())
    # codes are packed to whole bytes; everything else is stored at the accounted width
    assert abs(stored_bits - q.size_report().total_bits) < 8


@pytest.mark.parametrize("name", ALL)
def test_clone_via_get_params(name):
    q = make(name, seed=3) if "seed" in cls_of(name).param_defaults() else make(name)
    c = q.clone()
    assert c is not q and c.get_params() == q.get_params() and not hasattr(c, "codes_")
    W = weight()
    assert torch.equal(q.fit(W).inverse_transform(), c.fit(W).inverse_transform())


@pytest.mark.parametrize("name", ALL)
def test_estimate_matches_fitted_report(name):
    W = weight(rows=256, cols=64)
    q = make(name).fit(W)
    est = type(q).estimate(tuple(W.shape), **q.get_params())
    assert est.n_weights == W.numel()
    # the pool may end up smaller than N' when centroids merge; everything else is exact
    assert est.total_bits >= q.size_report().total_bits
    assert math.isclose(est.parts_bits["codes"], q.size_report().parts_bits["codes"])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]).repeat(64, 32), "NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]).repeat(64, 32), "NaN or infinite"),
        (torch.empty(0, 16), "empty"),
        (torch.randn(64), "at least 2 dimensions"),
        (torch.randint(0, 3, (64, 64)), "float32, float16 or bfloat16"),
    ],
)
def test_bad_weights_raise_clear_errors(name, bad, match):
    with pytest.raises(CompressKitError, match=match):
        make(name).fit(bad)


@pytest.mark.parametrize("name", ALL)
def test_bits_out_of_range(name):
    for bits in (0, 9, 2.5, "2"):
        with pytest.raises(CompressKitError, match="bits"):
            make(name, bits=bits).fit(weight())


@pytest.mark.parametrize("name", ALL)
def test_transform_before_fit(name):
    with pytest.raises(CompressKitError, match="not fitted"):
        make(name).transform(weight())
