import pytest
import torch

from compresskit.calib.config import CalibrationConfig
from compresskit.calib.estep import _e_step, centroid_layout, centroid_target, e_step, feedback_codes, output_error
from compresskit.calib.objectives import fit_layer
from compresskit.errors import CompressKitError
from compresskit.quantizers.pq import PQ
from compresskit.quantizers.vq import VQ

# (name, quantizer factory, weight shape): pooled PQ, unpooled PQ (share 1 and > 1 with a short last
# book and padded columns), a conv kernel, and VQ with one and two row groups (odd width, padded)
CASES = [
    ("pq-pool", lambda: PQ(bits=2, k=16, share=1, pool=True, pool_size=32), (64, 24)),
    ("pq-share1", lambda: PQ(bits=2, k=16, share=1, pool=False), (64, 24)),
    ("pq-share4-pad", lambda: PQ(bits=2, k=16, share=4, pool=False), (32, 22)),
    ("pq-conv-pad", lambda: PQ(bits=2, k=8, share=2, pool=False), (16, 3, 3, 3)),
    ("vq", lambda: VQ(bits=2, d=2, k=16), (48, 24)),
    ("vq-groups-pad", lambda: VQ(bits=2, d=2, k=16, row_groups=2), (48, 23)),
    ("pq-rowscale", lambda: PQ(bits=2, k=16, share=2, pool=False, row_scale=True), (64, 24)),
    ("vq-rowscale-pad", lambda: VQ(bits=2, d=2, k=16, row_scale=True), (48, 23)),
]


def correlated_hessian(n: int, seed: int = 0) -> torch.Tensor:
    """H = X^T X / N for strongly correlated inputs X = Z A (float64, as the accumulator gives)."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(512, n, generator=gen, dtype=torch.float64)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64) + 0.5 * torch.eye(n, dtype=torch.float64)
    X = Z @ A
    return X.T @ X / X.shape[0]


def fitted(case, seed: int = 0):
    _, make, shape = case
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return make().fit(W), W


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lowers_output_error_vs_kmeans_codes_and_is_monotone(case):
    q, W = fitted(case)
    H = correlated_hessian(W[0].numel())
    codes, errors = _e_step(q, W, H, n_sweeps=4, damp=0.0)
    assert errors[0] == pytest.approx(output_error(W, q.inverse_transform(), H), rel=1e-4)
    for before, after in zip(errors, errors[1:]):  # exact block coordinate descent: never up
        assert after <= before * (1 + 1e-5)
    assert errors[-1] < 0.9 * errors[0], errors
    assert codes.dtype == q.codes_.dtype and codes.shape == q.codes_.shape
    q.set_codes(codes)
    assert output_error(W, q.inverse_transform(), H) == pytest.approx(min(errors), rel=1e-4)


@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_damped_sweeps_never_raise_either_objective(case):
    q, W = fitted(case)
    H = correlated_hessian(W[0].numel(), seed=3)
    damp = 0.05
    H_damped = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    errs = [output_error(W, q.inverse_transform(), H)]
    damped = [output_error(W, q.inverse_transform(), H_damped)]
    for _ in range(3):
        q.set_codes(e_step(q, W, H, n_sweeps=1, damp=damp))
        errs.append(output_error(W, q.inverse_transform(), H))
        damped.append(output_error(W, q.inverse_transform(), H_damped))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:])), errs
    assert all(b <= a * (1 + 1e-5) for a, b in zip(damped, damped[1:])), damped
    assert errs[-1] < errs[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_identity_hessian_gives_nearest_centroid_codes(case):
    q, W = fitted(case)
    table, _ = centroid_layout(q)
    gen = torch.Generator().manual_seed(5)
    q.set_codes(torch.randint(0, table.shape[1], q.codes_.shape, generator=gen))  # a bad start
    n = W[0].numel()
    codes = e_step(q, W, torch.eye(n), n_sweeps=1)
    # with H = I the output error is the weight error, so each subvector goes to its nearest centroid,
    # measured on the real columns only (padded coordinates are not part of the weight); compare
    # reconstructions, since a pool can map two codes to the same centroid
    assert torch.equal(q.inverse_transform(codes), q.inverse_transform(nearest_codes(q, W)))
    if not getattr(q, "pooled_", False) and q.pad_ == 0:
        assert torch.equal(codes, q.transform(W))


def nearest_codes(q, W):
    """Reference: brute-force nearest centroid of every subvector over its real (unpadded) columns."""
    table, book = centroid_layout(q)  # [B, k, d], [m, n_sub]
    m, n_sub = book.shape
    d = table.shape[2]
    W2, _ = centroid_target(q, W)  # centroids live in the space of W / row scale
    sub = torch.nn.functional.pad(W2, (0, n_sub * d - W2.shape[1])).reshape(m, n_sub, 1, d)
    real = (torch.arange(n_sub * d) < W2.shape[1]).float().reshape(n_sub, 1, d)
    dist = ((sub - table[book]) ** 2 * real).sum(-1)  # [m, n_sub, k]
    return dist.argmin(-1).to(q.codes_.dtype)


def test_converged_codes_are_locally_optimal_by_brute_force():
    """After the sweeps converge, no single code change lowers tr(R H R^T) (checked exhaustively)."""
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(7))
    q = PQ(bits=4, k=4, share=1, pool=False).fit(W)  # d = 2, 4 subspaces of 4 centroids
    H = correlated_hessian(8, seed=8)
    q.set_codes(e_step(q, W, H, n_sweeps=20, damp=0.0))
    best = output_error(W, q.inverse_transform(), H)
    for i in range(8):
        for g in range(4):
            for c in range(4):
                trial = q.codes_.clone()
                trial[i, g] = c
                assert output_error(W, q.inverse_transform(trial), H) >= best * (1 - 1e-6)


def test_zero_sweeps_returns_the_start_and_bad_inputs_raise():
    q, W = fitted(CASES[1])
    H = correlated_hessian(24)
    assert torch.equal(e_step(q, W, H, n_sweeps=0), q.codes_)
    with pytest.raises(CompressKitError, match="H must be"):
        e_step(q, W, torch.eye(23))
    with pytest.raises(CompressKitError, match="does not match"):
        e_step(q, W[:, :16], torch.eye(16))
    with pytest.raises(CompressKitError, match="not fitted"):
        e_step(PQ(), W, H)


def test_padded_hessians_share_an_unpadded_float32_h_and_pad_otherwise():
    from compresskit.calib.estep import padded_hessians

    A = torch.randn(8, 8)
    H = A @ A.T
    damped, true = padded_hessians(H, 8, 0.1)
    assert true is H  # nothing to pad: read in place
    assert torch.equal(damped - torch.diag(damped.diagonal() - H.diagonal()), H)
    torch.testing.assert_close(damped.diagonal(), H.diagonal() + 0.1 * H.diagonal().mean())
    damped, true = padded_hessians(H, 10, 0.1)
    assert true.shape == (10, 10) and torch.equal(true[:8, :8], H) and not true[8:].any() and not true[:, 8:].any()
    assert not damped[8:].any() and torch.equal(damped[:8, :8].diagonal(), torch.diag(padded_hessians(H, 8, 0.1)[0]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_feedback_codes_are_nearest_codes_under_identity_h(case):
    """With H = I nothing couples the columns: the fed-back error is zero and each subvector takes
    its nearest centroid over its real columns (padded coordinates carry no weight)."""
    q, W = fitted(case)
    codes = feedback_codes(q, W, torch.eye(W[0].numel()), damp=0.01)
    assert codes.dtype == q.codes_.dtype and codes.shape == q.codes_.shape
    assert torch.equal(q.inverse_transform(codes), q.inverse_transform(nearest_codes(q, W)))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_feedback_codes_lower_the_output_error_of_kmeans_codes(case):
    q, W = fitted(case)
    H = correlated_hessian(W[0].numel(), seed=2)
    before = output_error(W, q.inverse_transform(), H)
    after = output_error(W, q.inverse_transform(feedback_codes(q, W, H, damp=0.01)), H)
    assert after < 0.98 * before, (before, after)  # 0.57-0.97 of it here; the E-step sweeps go further


def test_feedback_codes_use_block_deferred_updates_exactly():
    """The deferred block update is GPTQ's lazy batching: any block width gives the same codes."""
    q, W = fitted(CASES[1])
    H = correlated_hessian(24, seed=4)
    ref = feedback_codes(q, W, H, block=2)  # one subspace per block: every update immediate
    for block in (4, 8, 128):
        assert torch.equal(feedback_codes(q, W, H, block=block), ref)


def test_feedback_codes_refuse_bad_input():
    q, W = fitted(CASES[1])
    with pytest.raises(CompressKitError, match="H must be"):
        feedback_codes(q, W, torch.eye(23))
    H = correlated_hessian(24)
    H[0, 0] = float("nan")
    with pytest.raises(CompressKitError, match="NaN"):
        feedback_codes(q, W, H)
    with pytest.raises(CompressKitError, match="not fitted"):
        feedback_codes(PQ(), W, torch.eye(24))


def test_fit_layer_starts_the_e_step_from_feedback_codes_when_asked():
    W = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    H = correlated_hessian(24, seed=6)
    config = CalibrationConfig(e_init="feedback", e_sweeps=2, local_rounds=0)
    q = PQ(bits=2, k=16, share=1, pool=False)
    fit_layer(q, W, H, config)
    ref = PQ(bits=2, k=16, share=1, pool=False).fit(W)
    ref.set_codes(feedback_codes(ref, W, H, damp=config.damp))
    ref.set_codes(e_step(ref, W, H, n_sweeps=2, damp=config.damp))
    assert torch.equal(q.codes_, ref.codes_)
    plain = PQ(bits=2, k=16, share=1, pool=False)
    fit_layer(plain, W, H, CalibrationConfig(e_sweeps=2, local_rounds=0))
    assert not torch.equal(plain.codes_, q.codes_)  # the start matters: the default path is not this one


def test_e_init_is_validated():
    with pytest.raises(CompressKitError, match="e_init must be one of nearest, feedback"):
        CalibrationConfig(e_init="gptq").validated()
    with pytest.raises(CompressKitError, match="e_init would do nothing: it picks the codes the E-step starts from, and e_sweeps is 0"):
        CalibrationConfig(e_init="feedback", e_sweeps=0).validated()
