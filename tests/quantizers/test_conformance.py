"""One conformance suite over every registered quantizer (scikit-learn's parametrize_with_checks idea)."""
import math

import pytest
import torch

from compresskit import available_quantizers
from compresskit.errors import CompressKitError
from compresskit.quantizers import CodebookQuantizer, load_quantizer

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
    too_many = 17 if name in ("rtn", "gptq", "morton") else 9  # scalar quantizers go to 16 bits (3DGS positions), codebooks to 8
    for bits in (0, too_many, 2.5, "2"):
        with pytest.raises(CompressKitError, match="bits"):
            make(name, bits=bits).fit(weight())


@pytest.mark.parametrize("name", ALL)
def test_transform_before_fit(name):
    with pytest.raises(CompressKitError, match="not fitted"):
        make(name).transform(weight())


# ---- capabilities, shared state, shapes -----------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_capability_flags_are_declared_and_true(name):
    cls, W = cls_of(name), weight()
    assert isinstance(cls.uses_hessian, bool) and isinstance(cls.supports_codebook_update, bool) and isinstance(cls.trains_in_loop, bool)
    assert cls.supports_codebook_update == issubclass(cls, CodebookQuantizer)
    if cls.uses_hessian:  # fit takes the input statistics, and they change the result
        X = torch.randn(256, W.shape[1], generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, W.shape[1])
        with_h = make(name).fit(W, hessian=X.T @ X).inverse_transform()
        assert not torch.equal(with_h, make(name).fit(W).inverse_transform())
    if cls.supports_codebook_update:
        check_codebook_protocol(make(name).fit(W), W)


def check_codebook_protocol(q, W):
    """The layout rebuilds exactly what inverse_transform does, and the setters write in place."""
    layout = q.codebook_layout()
    m, n_sub = q.codes_.shape
    assert layout.book.shape == (m, n_sub) and layout.slot_rows.shape == (layout.n_books, layout.k)
    sub = layout.centroids()[layout.book, q.codes_.long()]  # [m, n_sub, d]
    rebuilt = sub.reshape(m, -1)[:, : W[0].numel()]
    if layout.row_scales is not None:
        rebuilt = rebuilt * layout.row_scales.float()[:, None]
    assert torch.equal(rebuilt.reshape(W.shape), q.inverse_transform().float())
    table, codes, ref = layout.table, q.codes_, q.inverse_transform()
    q.set_centroids(table.float() * 2)
    q.set_codes(torch.zeros_like(codes, dtype=torch.int64))
    after = q.codebook_layout()
    assert after.table is table and q.codes_ is codes  # same tensors: written in place
    assert (codes == 0).all() and not torch.equal(q.inverse_transform(), ref)
    with pytest.raises(CompressKitError, match="set_centroids"):
        q.set_centroids(table.float()[..., :1])
    with pytest.raises(CompressKitError, match=r"codes must lie in \[0"):
        q.set_codes(torch.full_like(codes, layout.k, dtype=torch.int64))
    if layout.row_scales is None:
        with pytest.raises(CompressKitError, match="no row scales"):
            q.set_row_scales(torch.ones(m))
    else:
        q.set_row_scales(torch.ones(m))
        assert q.codebook_layout().row_scales is layout.row_scales and (layout.row_scales == 1).all()


@pytest.mark.parametrize("name", ALL)
def test_bind_state_shares_the_given_tensors(name):
    W = weight()
    q = make(name).fit(W)
    ref = q.inverse_transform()
    tensors = {key: t.clone() for key, t in q.state_tensors().items() if key != "codes_"}
    codes = q.codes_.clone()
    q.bind_state(tensors, codes)
    assert torch.equal(q.inverse_transform(), ref) and q.codes_ is codes
    stored = q.state_tensors()
    assert all(stored[key].data_ptr() == t.data_ptr() for key, t in tensors.items())  # not copied
    floats = [t for t in tensors.values() if t.is_floating_point() and t.numel()]
    floats[0].mul_(2)  # a change made through the module's tensor is the quantizer's change
    assert not torch.equal(q.inverse_transform(), ref)
    key = next(iter(tensors))
    for bad, bad_codes in [
        ({k: v for k, v in tensors.items() if k != key}, codes),  # a tensor missing
        ({**tensors, "extra_": codes}, codes),  # one too many
        ({**tensors, key: tensors[key].reshape(-1)[:1]}, codes),  # wrong shape
        (tensors, codes.float()),  # codes must be integers
        (tensors, codes[:1]),
    ]:
        with pytest.raises(CompressKitError, match="bind_state"):
            q.bind_state(bad, bad_codes)
    with pytest.raises(CompressKitError, match="not fitted"):
        make(name).bind_state(tensors, codes)


TINY_SHAPES = [(128, 1), (1, 128), (1, 1), (2, 1), (1, 3), (3, 5), (6, 7), (16, 3, 1, 1), (1, 1, 3, 3)]


@pytest.mark.parametrize("name", ALL)
def test_adapt_to_shape_result_always_fits(name):
    bits_options = (1, 2, 3, 4) if "bits" in cls_of(name).param_defaults() else (None,)
    for bits in bits_options:
        q = make(name) if bits is None else make(name, bits=bits)
        params = q.get_params()
        assert q.adapt_to_shape(tuple(weight().shape)) == (q, None)  # a shape it fits is left alone
        for shape in TINY_SHAPES:
            adapted, note = q.adapt_to_shape(shape)
            assert q.get_params() == params  # the asked quantizer is never changed
            if adapted is None:  # stays dense: the reason is one sentence
                assert isinstance(note, str) and note and "\n" not in note
                continue
            assert (note is None) == (adapted is q)
            if adapted is not q:
                assert type(adapted) is type(q) and isinstance(note, str) and "\n" not in note
            W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            assert adapted.fit(W).inverse_transform().shape == W.shape, (bits, shape, note)
    assert q.adapt_to_shape((64,))[0] is None and q.adapt_to_shape((0, 16))[0] is None
