import copy

import pytest
import torch

from compresskit.calib.estep import e_step
from compresskit.calib.soft import SoftAssignment
from compresskit.nn import quantized_of
from codebook_cases import CASES, IDS, fitted



def inputs(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(256, n, generator=gen) @ (torch.randn(n, n, generator=gen) + torch.eye(n))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_starts_at_the_current_codes_even_when_they_are_not_the_nearest(case):
    q, W = fitted(case)
    X = inputs(W[0].numel())
    q.set_codes(e_step(q, W, X.T @ X / X.shape[0], n_sweeps=2))  # output-optimal, not weight-nearest
    assert not torch.equal(q.codes_, q.transform(W))
    soft = SoftAssignment(q, W, n_candidates=4)
    assert torch.equal(soft.harden(), q.codes_)
    assert soft.table.dtype == torch.float32 and soft.table.requires_grad
    soft.freeze_confident(threshold=0.0)  # everything hard: the soft weight is the quantizer's weight
    assert torch.equal(soft.weight(), q.inverse_transform().float())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adam_lowers_an_output_matching_loss_and_hardened_codes_are_consistent(case):
    q, W = fitted(case)
    X = inputs(W[0].numel())
    target = X @ W.reshape(W.shape[0], -1).T

    def loss_of(weight):
        return (X @ weight.reshape(weight.shape[0], -1).T - target).pow(2).mean()

    start = float(loss_of(q.inverse_transform()))
    soft = SoftAssignment(q, W, n_candidates=4)
    opt = torch.optim.Adam(soft.parameters(), lr=0.05)
    losses, n_steps = [], 100
    for step in range(n_steps):
        opt.zero_grad()
        loss = loss_of(soft.weight())
        # entropy weight ramped from 0 (same scale as the loss) so the assignments end up nearly hard
        (loss + 3.0 * step / n_steps * start * soft.entropy()).backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 9:
            soft.freeze_confident(0.99)
    assert min(losses) < 0.5 * losses[0], (losses[0], min(losses))
    assert soft.frozen.float().mean() > 0.5  # progressive freezing took most subvectors
    soft.freeze_confident(threshold=0.0)
    hard_loss = loss_of(soft.weight()).item()
    q2 = copy.deepcopy(q)
    soft.write_back(q2)
    assert q2.codes_.dtype == q.codes_.dtype and q2.codes_.shape == q.codes_.shape
    assert torch.equal(q2.codes_, soft.harden())
    # the quantizer now rebuilds the hardened soft weight (up to the float16 storage of the table)
    torch.testing.assert_close(q2.inverse_transform().float(), soft.weight().detach(), rtol=1e-2, atol=1e-2)
    # calibration improved the quantizer itself, not only the soft relaxation
    assert float(loss_of(q2.inverse_transform().float())) < 0.9 * start, (start, hard_loss)


def test_frozen_subvectors_get_no_logit_gradient_but_centroids_still_train():
    q, W = fitted(CASES[0])
    soft = SoftAssignment(q, W, n_candidates=3, temperature=1e-3)  # sharp: most start confident
    n_frozen = soft.freeze_confident(0.99)
    assert 0 < n_frozen < soft.frozen.numel()
    assert soft.freeze_confident(0.99) == 0  # nothing new: freezing is cumulative, not repeated
    soft.weight().pow(2).sum().backward()
    assert soft.logits.grad[soft.frozen].abs().max() == 0
    assert soft.logits.grad[~soft.frozen].abs().max() > 0
    assert soft.table.grad.abs().max() > 0


def test_candidates_are_the_nearest_centroids():
    q, W = fitted(CASES[1])
    soft = SoftAssignment(q, W, n_candidates=16)  # all of k: the candidates are a permutation
    assert torch.equal(soft.candidates.sort(-1).values, torch.arange(16).expand_as(soft.candidates))
    soft = SoftAssignment(q, W, n_candidates=2)
    # k-means codes are the nearest, so the 2nd candidate is the 2nd nearest: never the same code
    assert (soft.candidates[..., 0] != soft.candidates[..., 1]).all()


def test_soft_m_step_learning_rate_is_in_weight_units_for_row_scaled_centroids():
    """One soft block M-step moves the rebuilt weight about as far whether the rows are small or not
    (the table of a row-scaled layer lives in units of its row scales, so it steps lr / mean(scale))."""
    import compresskit
    from compresskit import CompressConfig
    from compresskit.calib import Calibrator, CalibrationConfig

    from toy_models import Residual

    def weight_step(weight_scale):
        deq = {}
        for steps in (0, 1):
            torch.manual_seed(0)
            model = Residual(16, 1).eval()
            with torch.no_grad():
                model.blocks[0].fc.weight.mul_(weight_scale)
            batches = [{"x": torch.randn(64, 16, generator=torch.Generator().manual_seed(1))}]
            soft = dict(m_steps=steps, m_objective="block", soft_candidates=2, lr=1e-2, logit_lr=0.0) if steps else {}
            cfg = CalibrationConfig(e_sweeps=0, **soft)
            cal = Calibrator(["blocks.0"], batches, config=cfg)
            params = {"pool": False, "k": 8, "row_scale": True}
            compresskit.compress(model, CompressConfig(method="pq", bits=2, params=params), calibration=cal)
            deq[steps] = quantized_of(model.blocks[0].fc, "weight").dequantize().float()
        return float((deq[1] - deq[0]).abs().max())

    small, plain = weight_step(0.05), weight_step(1.0)
    assert small > 0 and plain > 0
    assert 0.5 < small / plain < 2.0, (small, plain)
