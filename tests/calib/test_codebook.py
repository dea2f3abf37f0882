"""The layer-wise M-step: output-error-optimal centroids and row scales for fixed codes."""
import copy

import pytest
import torch

from codebook_cases import CASES, IDS, fitted
from compresskit.calib.codebook import refine_layer, update_codebooks, update_row_scales
from compresskit.calib.estep import centroid_layout, e_step, output_error
from compresskit.errors import CompressKitError
from compresskit.quantizers.pq import PQ


def hessian(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, n, generator=gen) @ (torch.randn(n, n, generator=gen) + torch.eye(n))
    return X.T @ X / X.shape[0]


def table_of(q) -> torch.Tensor:
    return (q.pool_ if getattr(q, "pooled_", False) else q.codebooks_).clone()


def optimum(q, W, H) -> float:
    """Brute force: the least output error over all tables for the current codes and row scales,
    from a dense least-squares problem (the matrix maps every table entry to every weight)."""
    table, book = centroid_layout(q)
    n_books, k, d = table.shape
    m, n_sub = q.codes_.shape
    state = table_of(q).float().reshape(-1, d)
    slot = book * k + q.codes_.long()
    entry = q.projection_.long().reshape(-1)[slot] if getattr(q, "pooled_", False) else slot
    s = q.scale_.float() if getattr(q, "scale_", None) is not None else torch.ones(m)
    W2 = W.reshape(m, -1).double()
    n = W2.shape[1]
    L = torch.linalg.cholesky(H.double() + 1e-9 * torch.eye(n, dtype=torch.float64))  # error = ||R L||^2
    E = state.shape[0]
    A = torch.zeros(m, n, E * d, dtype=torch.float64)  # W_hat[i, col] = sum_p A[i, col, p] * P_flat[p]
    for i in range(m):
        for g in range(n_sub):
            for c in range(d):
                col = g * d + c
                if col < n:
                    A[i, col, entry[i, g] * d + c] = s[i]
    lhs = torch.einsum("icp,cj->ijp", A, L).reshape(m * n, -1)
    rhs = (W2 @ L).reshape(-1)
    p = torch.linalg.lstsq(lhs, rhs[:, None], driver="gelsd").solution[:, 0]
    return float(((lhs @ p - rhs) ** 2).sum())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_centroid_update_reaches_the_least_squares_optimum(case):
    q, W = fitted(case)
    H = hessian(W[0].numel())
    before = output_error(W, q.inverse_transform(), H)
    b, a = update_codebooks(q, W, H, iters=200, damp=0.0)
    after = output_error(W, q.inverse_transform(), H)
    assert b == pytest.approx(before, rel=1e-4) and a == pytest.approx(after, rel=1e-4)
    best = optimum(q, W, H)
    assert after < before
    assert after <= best * 1.01 + 1e-6  # float16 storage of the table costs a little


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unused_centroids_stay_and_damping_never_raises_the_true_error(case):
    q, W = fitted(case)
    H = hessian(W[0].numel(), seed=1)
    old = table_of(q).float()
    d = old.shape[-1]
    # force everything onto a few table entries: the rest are unused and must not move
    q.set_codes(q.codes_ % 3)
    table, book = centroid_layout(q)
    slot = book * table.shape[1] + q.codes_.long()
    entry = q.projection_.long().reshape(-1)[slot] if getattr(q, "pooled_", False) else slot
    used = torch.zeros(old.reshape(-1, d).shape[0], dtype=torch.bool)
    used[entry.reshape(-1)] = True
    before = output_error(W, q.inverse_transform(), H)
    b, a = update_codebooks(q, W, H, iters=10, damp=0.5)
    assert a <= b and output_error(W, q.inverse_transform(), H) <= before * (1 + 1e-6)
    assert torch.equal(table_of(q).float().reshape(-1, d)[~used], old.reshape(-1, d)[~used])


def test_row_scales_are_optimal_per_row():
    q = PQ(bits=2, k=16, share=2, pool=False, row_scale=True)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(40, 16, generator=gen) * torch.rand(40, 1, generator=gen).mul(4)
    q.fit(W)
    H = hessian(16)
    b, a = update_row_scales(q, W, H, damp=0.0)
    assert a < b and a == pytest.approx(output_error(W, q.inverse_transform(), H), rel=1e-4)
    # nudging any scale up or down (beyond float16 rounding) does not help
    base = output_error(W, q.inverse_transform(), H)
    for factor in (0.99, 1.01):
        q2 = copy.deepcopy(q)
        q2.set_row_scales(q2.scale_.float() * factor)
        assert output_error(W, q2.inverse_transform(), H) > base
    # a quantizer without row scales is left alone
    plain = PQ(bits=2, k=16, share=2, pool=False).fit(W)
    assert update_row_scales(plain, W, H) != update_row_scales(plain, W, H)  # (nan, nan): nothing to do


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_refine_beats_the_e_step_alone_and_never_rises(case):
    q, W = fitted(case)
    H = hessian(W[0].numel(), seed=2)
    q.set_codes(e_step(q, W, H, n_sweeps=2))
    after_e = output_error(W, q.inverse_transform(), H)
    errors = refine_layer(q, W, H, rounds=3)
    assert errors[0] == pytest.approx(after_e, rel=1e-4)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.97 * after_e
    assert output_error(W, q.inverse_transform(), H) == pytest.approx(errors[-1], rel=1e-4)


def test_bad_input_is_refused():
    q, W = fitted(CASES[0])
    H = hessian(W[0].numel())
    with pytest.raises(CompressKitError, match="iters"):
        update_codebooks(q, W, H, iters=-1)
    with pytest.raises(CompressKitError, match="rounds"):
        refine_layer(q, W, H, rounds=-2)
    with pytest.raises(CompressKitError, match="do not match"):
        update_codebooks(q, W, hessian(W[0].numel() + 1))
    with pytest.raises(CompressKitError, match="not fitted"):
        update_codebooks(PQ(bits=2), W, H)
