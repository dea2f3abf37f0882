"""k-means kernels against a brute-force reference, on tiny shapes."""
import pytest
import torch

from compresskit.quantizers.kmeans import assign, kmeans


def _brute_force(X, C):
    """Reference nearest centroid and its squared distance: [G, N] int64, [G, N] float64."""
    dist = ((X.double()[:, :, None, :] - C.double()[:, None, :, :]) ** 2).sum(-1)  # [G, N, k]
    best, codes = dist.min(-1)
    return codes, best


def _sq_dist_of(X, C, codes):
    picked = torch.gather(C.double(), 1, codes[..., None].expand(-1, -1, C.shape[2]))
    return ((X.double() - picked) ** 2).sum(-1)  # [G, N]


def _rel_error(X, C, codes):
    return float(_sq_dist_of(X, C, codes).sum() / X.double().pow(2).sum())


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [4, 7, 37])
def test_assign_matches_brute_force(d, k):
    gen = torch.Generator().manual_seed(d * 100 + k)
    X = torch.randn(3, 301, d, generator=gen)  # 301: not a multiple of the kernel's block
    C = torch.randn(3, k, d, generator=gen)
    codes = assign(X, C)
    ref, ref_dist = _brute_force(X, C)
    assert codes.dtype == torch.int64 and codes.shape == (3, 301)
    # same code except on (near-)ties, where the distance must then be the same
    got_dist = _sq_dist_of(X, C, codes)
    assert torch.allclose(got_dist, ref_dist, rtol=1e-5, atol=1e-5)
    assert (codes == ref).float().mean() > 0.99


def test_assign_breaks_exact_ties_to_the_first_centroid():
    X = torch.zeros(1, 5, 2)
    C = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]])  # all at distance 1
    assert assign(X, C).tolist() == [[0, 0, 0, 0, 0]]


def test_assign_large_codebook_single_group():
    """pool.py's case: G = 1, many centroids; no distance matrix is formed."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(1, 3000, 4, generator=gen)
    C = torch.randn(1, 2501, 4, generator=gen)
    codes = assign(X, C)
    _, ref_dist = _brute_force(X, C)
    assert torch.allclose(_sq_dist_of(X, C, codes), ref_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d,k,N", [(1, 5, 40), (3, 7, 7), (4, 16, 300), (8, 10, 64)])
def test_kmeans_final_codes_are_nearest_and_counts_match(d, k, N):
    X = torch.randn(4, N, d, generator=torch.Generator().manual_seed(1))
    C, codes, counts = kmeans(X, k, n_iter=6, seed=3)
    assert C.shape == (4, k, d) and C.dtype == torch.float32
    assert codes.shape == (4, N) and codes.dtype == torch.int64
    assert counts.shape == (4, k) and counts.dtype == torch.float32
    _, ref_dist = _brute_force(X, C)
    assert torch.allclose(_sq_dist_of(X, C, codes), ref_dist, rtol=1e-5, atol=1e-5)
    expected = torch.zeros(4, k).scatter_add_(1, codes, torch.ones(4, N))
    assert torch.equal(counts, expected)


def test_pruned_lloyd_equals_plain_lloyd():
    """The bounded (Hamerly) iterations must give exactly what plain Lloyd steps give."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(3, 500, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    C0, _, _ = kmeans(X, 24, n_iter=0, seed=5)  # the k-means++ seeds
    C_fast, codes_fast, _ = kmeans(X, 24, n_iter=8, seed=5)
    C = C0.clone()
    for _ in range(8):  # reference Lloyd, brute force, in float64 sums
        codes, _ = _brute_force(X, C)
        for g in range(3):
            for j in range(24):
                members = X[g, codes[g] == j]
                if len(members):
                    C[g, j] = members.double().mean(0).float()
    assert torch.allclose(C_fast, C, atol=1e-5)
    ref_codes, _ = _brute_force(X, C)
    assert (codes_fast == ref_codes).float().mean() > 0.99


def test_kmeans_is_deterministic_for_a_seed():
    X = torch.randn(2, 200, 3, generator=torch.Generator().manual_seed(0))
    a = kmeans(X, 9, n_iter=5, seed=7, noise=0.3)
    b = kmeans(X, 9, n_iter=5, seed=7, noise=0.3)
    c = kmeans(X, 9, n_iter=5, seed=8, noise=0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_zero_weight_points_do_not_move_centroids():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(2, 120, 2, generator=gen)
    far = torch.full((2, 30, 2), 50.0)  # outliers that would grab centroids if they counted
    w = torch.cat([torch.ones(2, 120), torch.zeros(2, 30)], 1)
    C_w, _, counts = kmeans(torch.cat([X, far], 1), 6, n_iter=10, seed=1, weights=w)
    C_ref, _, _ = kmeans(X, 6, n_iter=10, seed=1)
    assert C_w.abs().max() < 10  # no centroid was seeded on, or pulled to, the outliers
    assert torch.allclose(counts.sum(1), torch.full((2,), 120.0))
    err_w = _rel_error(X, C_w, assign(X, C_w))
    err_ref = _rel_error(X, C_ref, assign(X, C_ref))
    assert err_w < 1.5 * err_ref


def test_empty_clusters_are_reseeded():
    """Random init on data with many duplicates leaves clusters empty; none may stay empty."""
    X = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.0, 9.0]).repeat(1, 5).reshape(1, 40, 1)
    X = X + 0.001 * torch.arange(40.0).reshape(1, 40, 1)  # 40 distinct points in a few clumps
    C, codes, counts = kmeans(X, 8, n_iter=15, init="random", seed=0)
    assert (counts > 0).all()
    assert C.unique().numel() == 8


def test_noise_still_converges_to_a_similar_error():
    X = torch.randn(4, 400, 4, generator=torch.Generator().manual_seed(5))
    C0, codes0, _ = kmeans(X, 16, n_iter=20, seed=0)
    C1, codes1, _ = kmeans(X, 16, n_iter=20, seed=0, noise=0.5)
    e0, e1 = _rel_error(X, C0, codes0), _rel_error(X, C1, codes1)
    assert e1 < 1.1 * e0
    _, ref_dist = _brute_force(X, C1)  # the last step is noise-free: codes are the nearest
    assert torch.allclose(_sq_dist_of(X, C1, codes1), ref_dist, rtol=1e-5, atol=1e-5)


def test_kmeans_with_n_barely_above_k_uses_every_point():
    X = torch.randn(2, 13, 3, generator=torch.Generator().manual_seed(6))
    C, codes, counts = kmeans(X, 13, n_iter=3, seed=0)
    assert _rel_error(X, C, codes) < 1e-10  # k-means++ puts one centroid on each point
    assert torch.equal(counts, torch.ones(2, 13))


def test_kmeanspp_error_is_lower_than_random_init():
    X = torch.randn(3, 600, 2, generator=torch.Generator().manual_seed(9)) ** 3  # heavy-tailed
    pp = kmeans(X, 20, n_iter=0, seed=0)
    rnd = kmeans(X, 20, n_iter=0, init="random", seed=0)
    assert _rel_error(X, pp[0], pp[1]) < _rel_error(X, rnd[0], rnd[1])
