"""PQ specifics: the paper's layout, the codebook pool, padding, sharing, bad input."""
import pytest
import torch

from compresskit.errors import CompressKitError
from compresskit.quantizers import PQ, VQ
from compresskit.quantizers.pool import pool_size_for


def rel(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_supplementary_worked_example_exactly():
    report = PQ.estimate((6912, 1152), bits=2)
    assert pool_size_for(6912, 1152, 4) == 31_104
    assert report.parts_bits == {"codes": 15_925_248, "pool": 1_990_656, "projection": 1_179_648}
    assert report.total_bits == 19_095_552


@pytest.mark.parametrize("bits, d", [(4, 2), (3, 3), (2, 4), (1, 8)])
def test_default_subvector_dimension_by_bits(bits, d):
    q = PQ(bits=bits, share=4).fit(torch.randn(256, 48))
    assert q.d_ == d and q.codes_.dtype == torch.uint8
    assert q.codes_.shape == (256, -(-48 // d))


def test_paper_layout_one_codebook_per_subspace():
    W = torch.randn(512, 32)
    q = PQ(bits=2, share=1, pool=False).fit(W)
    assert q.codebooks_.shape == (8, 256, 4) and q.codebooks_.dtype == torch.float16
    # each subspace's codes only index its own codebook: rebuild column group 3 by hand
    g = 3
    torch.testing.assert_close(q.inverse_transform()[:, 4 * g : 4 * g + 4], q.codebooks_[g][q.codes_[:, g].long()].float())


def test_pool_layout_and_reported_errors():
    W = torch.randn(1024, 64)
    q = PQ(bits=2, share=1, pool_iters=0).fit(W)
    assert q.pooled_ and q.pool_.shape[0] <= pool_size_for(1024, 64, 4) < 16 * 256
    assert q.projection_.shape == (16, 256) and q.projection_.dtype == torch.int16
    assert q.error_before_pool_ < q.error_after_pool_  # pooling costs something
    assert q.error_pooled_codes_unchanged_ == pytest.approx(q.error_after_pool_, rel=1e-4)  # pool_iters=0: codes unchanged
    codes_before = PQ(bits=2, share=1, pool=False).fit(W).codes_
    assert torch.equal(q.codes_, codes_before)  # the paper: pooling leaves codes alone
    # reconstruction is pool[projection[g, code]]
    g = 5
    manual = q.pool_[q.projection_[g, q.codes_[:, g].long()].long()].float()
    torch.testing.assert_close(q.inverse_transform()[:, 4 * g : 4 * g + 4], manual)


def test_pool_refinement_only_lowers_the_error():
    W = torch.randn(512, 96) * torch.logspace(0, -1, 96)
    errors = [PQ(bits=2, share=2, pool_iters=n).fit(W).error_after_pool_ for n in (0, 1, 3, 6)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.95 * errors[0]


def test_similar_centroids_are_merged_and_least_used_go_first():
    from compresskit.quantizers.pool import build_pool

    book = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    codebooks = torch.stack([book, book + 1e-3])  # book 1 is book 0 moved by far less than tau_c
    counts = torch.tensor([[10.0, 9.0, 8.0, 1.0], [10.0, 9.0, 8.0, 1.0]])
    pool, projection = build_pool(codebooks, counts, pool_size=100, tau_c=0.05, scale=1.0)
    assert pool.shape[0] == 4  # 8 centroids, 4 distinct within tau_c
    assert torch.equal(projection[0], projection[1])
    pool, projection = build_pool(codebooks, counts, pool_size=3, tau_c=0.05, scale=1.0, n_iter=0)
    kept = pool[projection[0]]
    assert torch.allclose(kept[:3], book[:3], atol=1e-2)  # the most used survive as they are
    assert not torch.allclose(kept[3], book[3])  # the least used one went first, mapped elsewhere


def test_padding_is_recorded_not_truncated():
    W = torch.randn(300, 10)  # d = 4 does not divide 10
    q = PQ(bits=2, share=3, pool=False).fit(W)
    assert q.pad_ == 2 and q.codes_.shape == (300, 3)
    assert q.inverse_transform().shape == (300, 10)


def test_auto_share_keeps_tables_within_a_quarter_of_the_codes():
    for shape in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        report = PQ.estimate(shape, bits=2)
        tables = report.total_bits - report.parts_bits["codes"]
        assert tables <= report.parts_bits["codes"] / 4, (shape, report.parts_bits)
    q = PQ(bits=2)
    q._validate_params()
    assert q._layout(6912, 1152)[0] == 1  # the paper's layer keeps one codebook per subspace


def test_k_larger_than_the_subvectors_is_a_clear_error():
    with pytest.raises(CompressKitError, match="k=256 centroids need at least 256 subvectors"):
        PQ(bits=2, share=1).fit(torch.randn(100, 16))
    with pytest.raises(CompressKitError, match="k=512 centroids need at least 512"):
        VQ(bits=3).fit(torch.randn(20, 30))


def test_stochastic_relaxation_is_seeded_and_not_worse_by_much():
    W = torch.randn(1024, 16)
    plain = PQ(bits=2, share=1, pool=False).fit(W)
    noisy_a = PQ(bits=2, share=1, pool=False, noise=0.3, seed=1).fit(W)
    noisy_b = PQ(bits=2, share=1, pool=False, noise=0.3, seed=1).fit(W)
    assert torch.equal(noisy_a.codes_, noisy_b.codes_)
    assert rel(noisy_a.inverse_transform(), W) < 1.1 * rel(plain.inverse_transform(), W)


@pytest.mark.parametrize("params, match", [({"d": 0}, "d must be"), ({"k": 1}, "k must be"), ({"init": "magic"}, "init"),
                                           ({"noise": -1}, "noise"), ({"share": 0}, "share"), ({"pool_iters": -1}, "pool_iters")])
def test_bad_parameters(params, match):
    with pytest.raises(CompressKitError, match=match):
        PQ(**params).fit(torch.randn(512, 16))


@pytest.mark.parametrize("cls", [PQ, VQ])
def test_row_scale_fits_rows_of_unequal_size_better_and_costs_16_bits_a_row(cls):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(256, 64, generator=gen) * torch.logspace(-2, 1, 256)[:, None]  # rows 0.01x to 10x
    W[3] = 0  # a zero row stays exactly zero
    kwargs = {"pool": False} if cls is PQ else {}
    plain, scaled = cls(bits=2, **kwargs).fit(W), cls(bits=2, row_scale=True, **kwargs).fit(W)
    assert torch.equal(scaled.inverse_transform()[3], torch.zeros(64))
    # relative error per row: without scales the small rows are lost to the large ones
    def per_row(q):
        return ((q.inverse_transform() - W).pow(2).sum(1) / W.pow(2).sum(1).clamp(min=1e-12))[W.abs().sum(1) > 0]
    assert per_row(scaled).median() < 0.5 * per_row(plain).median()
    extra = scaled.size_report().parts_bits["scales"]
    assert extra == 256 * 16 and scaled.size_report().total_bits == plain.size_report().total_bits + extra
    assert scaled.scale_.dtype == torch.float16 and scaled.scale_.shape == (256,)


def test_row_scale_is_trained_through_a_compressed_module():
    from compresskit.nn import quantize_tensor

    lin = torch.nn.Linear(32, 48)
    qm = quantize_tensor(lin, "weight", PQ(bits=2, k=16, pool=False, row_scale=True).fit(lin.weight.detach()))
    assert "scale" in dict(qm.named_parameters())
    qm.scale.requires_grad_(True)
    lin(torch.randn(4, 32)).pow(2).sum().backward()
    assert qm.scale.grad is not None and qm.scale.grad.abs().sum() > 0
