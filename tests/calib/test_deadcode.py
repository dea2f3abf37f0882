import copy

import pytest
import torch

from compresskit.calib.deadcode import reinit_dead, usage_counts
from compresskit.calib.estep import centroid_layout, centroid_target, e_step
from compresskit.errors import CompressKitError
from compresskit.quantizers.vq import VQ
from codebook_cases import CASES, IDS, fitted



def state_of(q) -> torch.Tensor:
    return q.pool_ if getattr(q, "pooled_", False) else q.codebooks_


def correlated_hessian(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, n, generator=gen) @ (torch.randn(n, n, generator=gen) + 0.5 * torch.eye(n))
    return X.T @ X / X.shape[0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_usage_counts_match_a_plain_loop(case):
    q, _ = fitted(case)
    counts = usage_counts(q)
    m, n_sub = q.codes_.shape
    expected = torch.zeros_like(counts)
    for i in range(m):
        for g in range(n_sub):
            code = int(q.codes_[i, g])
            if isinstance(q, VQ):
                expected[i // (m // q.row_groups), code] += 1
            elif q.pooled_:
                expected[int(q.projection_[g // q.share_, code])] += 1
            else:
                expected[g // q.share_, code] += 1
    assert torch.equal(counts, expected)
    assert int(counts.sum()) == m * n_sub


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reinit_changes_exactly_the_dead_entries_and_the_next_estep_uses_them(case):
    q, W = fitted(case)
    usage = usage_counts(q) * 300  # as if accumulated over 300 passes: nothing is dead ...
    flat = usage.view(-1)
    dead_idx = torch.tensor([0, 3, 5])
    flat[dead_idx] = torch.tensor([0, 10, 255])  # ... except three entries, used fewer than 256 times
    before = state_of(q).clone()
    H = correlated_hessian(W[0].numel())
    n = reinit_dead(q, W, usage, tau_dead=256, seed=0)
    assert n == 3
    after = state_of(q)
    changed = (after != before).reshape(flat.numel(), -1).any(-1)
    assert changed.nonzero(as_tuple=True)[0].tolist() == dead_idx.tolist()
    assert after.dtype == torch.float16
    q.set_codes(e_step(q, W, H, n_sweeps=2))
    assert (usage_counts(q).view(-1)[dead_idx] > 0).any()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reseeds_come_from_the_worst_reconstructed_subvectors_and_are_seeded(case):
    q, W = fitted(case)
    q2 = copy.deepcopy(q)
    usage = torch.zeros_like(usage_counts(q))
    usage.view(-1)[1:] = 1000  # only entry 0 is dead
    # the hardest candidate: largest squared error among all subvectors (pool) or book 0's (codebooks)
    table, book = centroid_layout(q)
    m, n_sub = q.codes_.shape
    d = table.shape[2]
    W2, _ = centroid_target(q, W)  # centroids live in the space of W / row scale
    sub = torch.nn.functional.pad(W2, (0, n_sub * d - W2.shape[1])).reshape(m, n_sub, d)
    err = (sub - table.reshape(-1, d)[book * table.shape[1] + q.codes_.long()]).pow(2).sum(-1)
    if not getattr(q, "pooled_", False):
        err[book != 0] = -1
    worst = sub.reshape(-1, d)[err.reshape(-1).argmax()]
    reinit_dead(q, W, usage, seed=3, noise=0.0)
    reinit_dead(q2, W, usage, seed=3, noise=0.0)
    assert torch.equal(state_of(q), state_of(q2))
    new = state_of(q).reshape(-1, d)[0]
    assert torch.equal(new, worst.half())  # noise=0: exactly the worst subvector, in float16
    q3 = copy.deepcopy(q2)
    reinit_dead(q2, W, usage, seed=3)
    reinit_dead(q3, W, usage, seed=4)
    assert not torch.equal(state_of(q2), state_of(q3))  # the noise follows the seed


def test_nothing_dead_changes_nothing_and_bad_usage_raises():
    q, W = fitted(CASES[0])
    before = q.pool_.clone()
    assert reinit_dead(q, W, torch.full((q.pool_.shape[0],), 1000)) == 0
    assert torch.equal(q.pool_, before)
    with pytest.raises(CompressKitError, match="usage must have shape"):
        reinit_dead(q, W, torch.zeros(3))
