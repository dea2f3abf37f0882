"""The ``morton`` quantizer: a per-row grid for point sets, stored as Rice-coded Morton-key gaps."""
import numpy as np
import pytest
import torch

from compresskit.quantizers import Morton, load_quantizer
from compresskit.quantizers.morton import ORDER_BITS, grid, grid_codes, morton_keys, morton_order, rice_decode, rice_encode


def points(n=4000, seed=0):
    """A surface-like point cloud: a noisy sphere shell, [n, 3]."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 3, generator=g)
    return p / p.norm(dim=1, keepdim=True) * (1 + 0.05 * torch.rand(n, 1, generator=g))


def saved(q, tmp_path):
    path = tmp_path / "q.safetensors"
    q.save(path)
    return load_quantizer(path), path.stat().st_size


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_sorted_points_cost_far_less_than_plain_and_round_trip(bits, tmp_path):
    P = points()
    W = P[morton_order(P)].T.contiguous()  # [3, N]: a row per coordinate, as the gaussians adapter lays means out
    q = Morton(bits=bits).fit(W)
    code_bits = q.size_report().parts_bits["codes"]
    plain_bits = W.numel() * bits
    n = W.shape[1]
    assert code_bits < plain_bits - 0.8 * n * np.log2(n)  # close to the ~log2 N bits a point's order is worth
    assert q.state_tensors()["codes_"][0] == 1  # the Rice mode
    q2, _ = saved(q, tmp_path)
    assert torch.equal(q2.codes_, q.codes_) and torch.equal(q2.inverse_transform(), q.inverse_transform())
    assert q2.size_report() == q.size_report()
    stored = sum(t.numel() * t.element_size() * 8 for t in q.state_tensors().values())
    assert stored == q.size_report().total_bits


def test_error_is_at_most_half_a_cell():
    W = points().T.contiguous()
    q = Morton(bits=10).fit(W)
    err = (q.inverse_transform() - W).abs()
    assert (err <= q.step_ / 2 + 1e-6).all()


def test_codes_at_fewer_bits_are_the_16_bit_codes_shifted():
    """Why 16-bit Morton order is Morton order at every b <= 16: the grids nest exactly."""
    W = points().T.contiguous()
    lo16, step16 = grid(W, ORDER_BITS)
    fine = grid_codes(W, lo16, step16, ORDER_BITS)
    for bits in (1, 5, 12, 15):
        lo, step = grid(W, bits)
        assert torch.equal(grid_codes(W, lo, step, bits), fine >> (ORDER_BITS - bits))
        W_sorted = W[:, morton_order(W.T)]
        keys = morton_keys(Morton(bits=bits).fit(W_sorted).codes_.long(), bits)
        assert (np.diff(keys) >= 0).all()


def test_unsorted_points_stay_lossless_and_never_cost_more_than_the_estimate(tmp_path):
    P = points(2000)
    W_sorted = P[morton_order(P)].T.contiguous()
    nearly = W_sorted.clone()
    nearly[:, [10, 11]] = nearly[:, [11, 10]]  # one pair out of order: a negative gap, escaped
    for W in (P.T.contiguous(), nearly):
        q = Morton(bits=12).fit(W)
        q2, _ = saved(q, tmp_path)
        assert torch.equal(q2.codes_, q.codes_)
        assert q.size_report().total_bits <= Morton.estimate(tuple(W.shape), bits=12).total_bits
    assert Morton(bits=12).fit(nearly).diagnostics()["escaped_"] >= 1
    assert Morton(bits=12).fit(P.T.contiguous()).state_tensors()["codes_"][0] == 0  # random order: plain packing is smaller


def test_points_moved_after_sorting_cost_a_raw_gap_each_not_a_unary_run():
    """Quantization in the loop moves positions after the scene was sorted: a point that crosses a
    coarse Morton boundary jumps far in key space. Each such gap costs about 130 bits, so a few
    percent of moved points cost a few bits a point, never the millions of ones a plain Rice code
    of that jump would take."""
    P = points(8000)
    W = P[morton_order(P)].T.contiguous()
    q = Morton(bits=12).fit(W)
    sorted_bits = q.size_report().parts_bits["codes"]
    g = torch.Generator().manual_seed(1)
    moved = torch.randperm(W.shape[1], generator=g)[:160]  # 2% of the points, a few cells each
    W2 = W.clone()
    W2[:, moved] += (torch.rand(3, 160, generator=g) - 0.5) * 8 * q.step_
    q.codes_ = q.transform(W2)
    d = q.diagnostics()
    assert d["coding_"] == "rice" and d["escaped_"] > 0
    assert q.size_report().parts_bits["codes"] < sorted_bits + 160 * 2 * 140
    q2 = Morton.from_state(q.state_tensors(), q.state_meta())
    assert torch.equal(q2.codes_, q.codes_)


@pytest.mark.parametrize("values", [[0, 0, 0], [5], [1, 2, 3, 1000, 7, 0], list(range(0, 5000, 7)), [2**40, 3, 2**41], [7, -3, 9, -(2**60), 4]])
def test_rice_round_trip(values):
    v = np.array(values, dtype=np.int64)
    k, stream = rice_encode(v)
    assert np.array_equal(rice_decode(stream, k, v.size), v)


def test_morton_order_is_a_permutation_and_deterministic():
    P = points(500)
    order = morton_order(P)
    assert torch.equal(torch.sort(order).values, torch.arange(500)) and torch.equal(order, morton_order(P.clone()))
