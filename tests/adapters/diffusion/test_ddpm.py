"""The Gaussian diffusion (schedule, q_sample, DDPM loss, guidance, respaced sampling, calibration inputs)
and the Fashion-MNIST data (the data tests skip when the Debian package is absent)."""
from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from compresskit.adapters.diffusion import data
from compresskit.adapters.diffusion.ddpm import (
    GaussianDiffusion,
    batch_loss,
    drop_labels,
    eps_mse,
    guided_output,
    noise_batches,
    trajectory_batches,
)
from compresskit.errors import CompressKitError

FULL = GaussianDiffusion.linear()


# ---- schedule ---------------------------------------------------------------------------------------
def test_linear_schedule_is_ddpms():
    assert FULL.num_steps == 1000 and FULL.betas.dtype == torch.float64
    assert FULL.betas[0].item() == pytest.approx(1e-4) and FULL.betas[-1].item() == pytest.approx(0.02)
    assert torch.all(FULL.betas[1:] > FULL.betas[:-1])
    assert FULL.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # x_T is almost pure noise


@pytest.mark.parametrize("steps", [50, 100, 250])
def test_respacing_keeps_the_cumulative_alphas_of_the_kept_timesteps(steps):
    sub = FULL.respaced(steps)
    assert sub.num_steps == steps
    assert sub.timesteps[0] == 0 and sub.timesteps[-1] == 999
    assert torch.all(sub.timesteps[1:] > sub.timesteps[:-1])
    torch.testing.assert_close(sub.alphas_cumprod, FULL.alphas_cumprod[sub.timesteps], rtol=1e-12, atol=0)
    assert sub.betas[0].item() == pytest.approx(1e-4) and torch.all(sub.betas[1:] > FULL.betas[sub.timesteps[1:]])  # later steps jump further


def test_respacing_to_every_step_is_the_identity_and_bad_counts_are_refused():
    same = FULL.respaced(1000)
    torch.testing.assert_close(same.betas, FULL.betas, rtol=1e-12, atol=1e-15)
    assert torch.equal(same.timesteps, FULL.timesteps)
    with pytest.raises(CompressKitError, match="1 <= steps <= 1000"):
        FULL.respaced(0)


# ---- forward process and loss -------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_has_the_forward_process_moments(t):
    n = 40000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
    x_t = FULL.q_sample(x0, torch.full((n,), t), noise)
    abar = FULL.alphas_cumprod[t].item()
    sd = math.sqrt(1 - abar)
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5 * sd / math.sqrt(n))
    assert x_t.std().item() == pytest.approx(sd, rel=0.02)
    zero = FULL.q_sample(x0[:2], torch.full((2,), t), torch.zeros(2, 1, 1, 1))
    torch.testing.assert_close(zero, torch.full_like(zero, math.sqrt(abar) * 0.7))


class Recorder(torch.nn.Module):
    """``out = scale * x`` (C channels), with ``junk`` variance channels when ``learned``; keeps its inputs."""

    def __init__(self, learned=False):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.learned = learned
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x, t, y))
        out = self.scale * x
        return torch.cat([out, torch.full_like(x, 1e6)], 1) if self.learned else out


@pytest.mark.parametrize("learned", [False, True])
def test_ddpm_loss_is_exactly_the_mse_between_noise_and_the_eps_channels(learned):
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    y = torch.arange(6)
    model = Recorder(learned)
    loss = FULL.loss(model, x0, y, null_class=99, generator=torch.Generator().manual_seed(3))
    x_t, t, y_seen = model.calls[0]
    abar = FULL.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    noise = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise is recovered from the known x0
    assert loss.item() == pytest.approx(torch.mean((0.5 * x_t - noise) ** 2).item(), rel=1e-5)
    assert t.dtype == torch.long and t.shape == (6,) and 0 <= t.min() and t.max() < 1000
    assert torch.all((y_seen == y) | (y_seen == 99))
    loss.backward()
    assert model.scale.grad is not None and model.scale.grad != 0


def test_eps_mse_reads_the_first_c_channels_and_refuses_other_shapes():
    noise = torch.randn(2, 3, 4, 4)
    out = torch.cat([noise + 1, torch.randn(2, 3, 4, 4) * 100], 1)
    assert eps_mse(out, noise).item() == pytest.approx(1.0)
    with pytest.raises(CompressKitError, match="C or 2C"):
        eps_mse(torch.zeros(2, 4, 4, 4), noise)


def test_class_dropout_drops_at_its_rate_to_the_null_class_only():
    y = torch.randint(0, 10, (100000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 10, 0.1, torch.Generator().manual_seed(1))
    is_null = dropped == 10
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.004)  # 4 standard errors
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(dropped, drop_labels(y, 10, 0.1, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_labels(y, 10, 0.0, torch.Generator()), y)
    assert torch.all(drop_labels(y, 10, 1.0, torch.Generator()) == 10)


# ---- guidance and sampling ---------------------------------------------------------------------------
def test_guidance_mixes_the_eps_channels_only():
    calls = []

    def model(x, t, y):  # eps depends on the class, and so do the variance channels
        calls.append(y.clone())
        c = y.float().view(-1, 1, 1, 1)
        return torch.cat([x + c, torch.zeros_like(x) + 10 * c], 1)

    x = torch.randn(3, 2, 2, 2)
    t = torch.zeros(3, dtype=torch.long)
    y = torch.tensor([1, 2, 3])
    out = guided_output(model, x, t, y, null_class=0, scale=1.5)
    assert torch.equal(calls[0], torch.tensor([1, 2, 3, 0, 0, 0]))  # one doubled call
    cond, uncond = model(x, t, y), model(x, t, torch.zeros_like(y))
    torch.testing.assert_close(out[:, :2], uncond[:, :2] + 1.5 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])  # the conditional call's variance, unguided
    calls.clear()
    torch.testing.assert_close(guided_output(model, x, t, y, null_class=0, scale=1.0), cond)
    assert len(calls) == 1 and calls[0].shape == (3,)


MEANS, SD = (-0.5, 0.5), 0.1  # class k: every pixel ~ N(MEANS[k], SD^2); the null class: each pixel from either


def perfect_eps():
    """The exact E[eps | x_t, y] for the distribution above (the best possible eps-predictor)."""

    def model(x, t, y):
        a = FULL.alphas_cumprod[t].view(-1, 1, 1, 1).to(x)
        var = a * SD**2 + 1 - a
        means = torch.tensor(MEANS).view(1, -1, 1, 1, 1).to(x)  # [1, K, 1, 1, 1]
        log_w = -((x[:, None] - a.sqrt()[:, None] * means) ** 2) / (2 * var[:, None])  # [B, K, C, H, W]
        w = torch.softmax(log_w, dim=1)
        onehot = torch.nn.functional.one_hot(y.clamp(max=1), 2).float().view(-1, 2, 1, 1, 1)
        w = torch.where((y == 2).view(-1, 1, 1, 1, 1), w, onehot)
        mean_x0 = (w * (means + (a.sqrt() * SD**2 / var)[:, None] * (x[:, None] - a.sqrt()[:, None] * means))).sum(1)
        return (x - a.sqrt() * mean_x0) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("steps, tol", [(50, 0.35), (100, 0.22), (250, 0.12)])
def test_respaced_sampling_with_the_perfect_eps_predictor_recovers_the_distribution(steps, tol):
    """Means exactly, spreads within the discretisation error of ``steps`` steps: the posterior variance
    (fixed_small) samples too narrow and beta (fixed_large) too wide, both closing in as steps grow."""
    sub = FULL.respaced(steps)
    n = 1000
    y = torch.tensor([0, 2]).repeat_interleave(n)  # class 0, then the null class (the mixture)
    spreads = {}
    for variance in ("fixed_small", "fixed_large"):
        x = sub.sample(perfect_eps(), y, (1, 2, 2), null_class=2, cfg_scale=1.0, seed=0, variance=variance, clip_denoised=False)
        cls0, null = x[:n], x[n:]
        assert cls0.mean().item() == pytest.approx(MEANS[0], abs=0.01)
        assert (null > 0).float().mean().item() == pytest.approx(0.5, abs=0.04)
        assert null[null > 0].mean().item() == pytest.approx(MEANS[1], abs=0.015)
        spreads[variance] = cls0.std().item()
        assert spreads[variance] == pytest.approx(SD, rel=tol)
    assert spreads["fixed_small"] < SD < spreads["fixed_large"]
    # control: keeping the original betas of the kept timesteps (no respacing) misses the mean
    unrespaced = GaussianDiffusion(FULL.betas[sub.timesteps], sub.timesteps)
    wrong = unrespaced.sample(perfect_eps(), y[:n], (1, 2, 2), null_class=2, cfg_scale=1.0, seed=0, clip_denoised=False)
    assert abs(wrong.mean().item() - MEANS[0]) > 0.03


def test_sampling_is_fixed_by_the_seed_and_clipped():
    sub = FULL.respaced(50)
    y = torch.tensor([0, 1, 2, 2])
    a = sub.sample(perfect_eps(), y, (1, 2, 2), null_class=2, seed=7)
    assert torch.equal(a, sub.sample(perfect_eps(), y, (1, 2, 2), null_class=2, seed=7))
    assert not torch.equal(a, sub.sample(perfect_eps(), y, (1, 2, 2), null_class=2, seed=8))
    assert a.shape == (4, 1, 2, 2) and a.dtype == torch.float32 and a.abs().max() <= 1


def test_learned_variance_interpolates_between_the_posterior_variance_and_beta():
    sub = FULL.respaced(50)
    x = torch.zeros(1, 1, 1, 1)
    i = 10
    post = sub.betas[i] * (1 - sub.alphas_cumprod[i - 1]) / (1 - sub.alphas_cumprod[i])
    for v, want in ((1.0, sub.betas[i].log()), (-1.0, post.log()), (0.0, (sub.betas[i].log() + post.log()) / 2)):
        out = torch.cat([x, torch.full_like(x, v)], 1)
        _, logvar = sub.p_mean_logvar(out, x, i, "learned", False)
        assert logvar.item() == pytest.approx(want.item(), rel=1e-5)
    _, small = sub.p_mean_logvar(x, x, i, "fixed_small", False)
    _, large = sub.p_mean_logvar(x, x, i, "fixed_large", False)
    assert small.item() == pytest.approx(post.log().item(), rel=1e-5) and large.item() == pytest.approx(sub.betas[i].log().item(), rel=1e-5)
    with pytest.raises(CompressKitError, match="2C"):
        sub.p_mean_logvar(x, x, i, "learned", False)


# ---- calibration inputs ------------------------------------------------------------------------------
def test_noise_batches_are_seeded_gaussians_with_random_classes_and_timesteps():
    batches = noise_batches(400, (1, 4, 4), 10, null_class=10, seed=1)
    assert len(batches) == 400 and set(batches[0]) == {"x", "t", "y"}
    assert batches[0]["x"].shape == (1, 1, 4, 4) and batches[0]["x"].dtype == torch.float32
    assert batches[0]["t"].dtype == torch.long and batches[0]["y"].dtype == torch.long
    x = torch.cat([b["x"] for b in batches])
    t = torch.cat([b["t"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    assert abs(x.mean().item()) < 0.05 and x.std().item() == pytest.approx(1, abs=0.05)
    assert t.min() >= 0 and t.max() < 1000 and t.unique().numel() > 300
    assert set(y.tolist()) == set(range(11))
    again = noise_batches(400, (1, 4, 4), 10, null_class=10, seed=1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)


def test_trajectory_batches_are_states_of_the_teachers_sampling_run():
    sub = FULL.respaced(10)
    model = perfect_eps()
    batches = trajectory_batches(model, sub, 20, (1, 2, 2), 2, null_class=2, n_runs=2, seed=3, cfg_scale=1.0)
    assert len(batches) == 20 and batches[0]["x"].shape == (1, 1, 2, 2)
    ts = [int(b["t"]) for b in batches]
    assert ts == sorted(ts, reverse=True) and ts[0] == 999 and ts[-1] == 0  # along the run, first to last step
    y = torch.randint(0, 2, (2,), generator=torch.Generator().manual_seed(3))
    states = list(sub.sample_states(model, y, (1, 2, 2), null_class=2, seed=3, cfg_scale=1.0))
    for k, b in enumerate(batches):  # 20 picks of 2 runs x 10 steps: every state, step-major
        x, t = states[k // 2]
        assert torch.equal(b["x"], x[k % 2 : k % 2 + 1]) and int(b["t"]) == int(t[0]) and int(b["y"]) == int(y[k % 2])
    with pytest.raises(CompressKitError, match="states"):
        trajectory_batches(model, sub, 21, (1, 2, 2), 2, null_class=2, n_runs=2)


def test_batch_loss_is_exact_on_regrouped_batches_and_asks_for_missing_noise():
    x0 = torch.rand(4, 1, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(4, 1, 2, 2)
    x_t = FULL.q_sample(x0, t, noise)
    singles = [
        {"x": x_t[i : i + 1], "t": t[i : i + 1], "y": torch.zeros(1, dtype=torch.long), "noise": noise[i : i + 1]} for i in range(4)
    ]
    grouped = {k: torch.cat([b[k] for b in singles[::-1]]) for k in singles[0]}  # as the core's batched() does
    model = Recorder()
    assert batch_loss(model, grouped).item() == pytest.approx(torch.mean((0.5 * x_t - noise) ** 2).item(), rel=1e-6)
    assert torch.equal(model.calls[-1][0], grouped["x"])  # the model saw x_t, never the noise
    with pytest.raises(CompressKitError, match="noise"):
        batch_loss(model, {k: v for k, v in grouped.items() if k != "noise"})


# ---- Fashion-MNIST --------------------------------------------------------------------------------------
def test_idx_files_parse_and_pixels_map_to_minus_one_one(tmp_path):
    pixels = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 256
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + pixels.astype(np.uint8).tobytes())
    read = data.read_idx(path)
    assert read.dtype == np.uint8 and np.array_equal(read, pixels)
    images = data.to_model_images(read)
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.float32
    assert images[0, 0, 2, 2].item() == -1.0 and images.max().item() == 1.0  # pixel 0 and pixel 255
    torch.testing.assert_close(images[:, 0, 2:30, 2:30], torch.from_numpy(pixels).float() / 127.5 - 1)
    assert torch.all(images[:, :, :2] == -1) and torch.all(images[:, :, :, -2:] == -1)  # background pad
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">HBB1I", 0, 8, 1, 5) + b"\0\0")
    with pytest.raises(CompressKitError, match="truncated"):
        data.read_idx(bad)


def test_a_missing_dataset_says_which_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda _: None)
    monkeypatch.setattr(data, "DEFAULT_DIR", tmp_path / "nowhere")
    data._package_dir.cache_clear()
    try:
        with pytest.raises(CompressKitError, match="apt-get install dataset-fashion-mnist") as err:
            data.data_dir()
        assert "\n" not in str(err.value)
    finally:
        data._package_dir.cache_clear()
    with pytest.raises(CompressKitError, match="four IDX files"):
        data.data_dir(tmp_path)


def test_calibration_batches_are_seeded_noised_training_images(fmnist_dir):
    batches = data.calibration_batches(FULL, 64, seed=5)
    assert len(batches) == 64
    b = batches[0]
    assert set(b) == {"x", "t", "y", "noise"} and b["x"].shape == (1, 1, 32, 32) and b["x"].dtype == torch.float32
    assert b["noise"].shape == (1, 1, 32, 32) and b["noise"].dtype == torch.float32
    assert b["t"].dtype == torch.long and b["y"].dtype == torch.long
    again = data.calibration_batches(FULL, 64, seed=5)
    assert all(torch.equal(p[k], q[k]) for p, q in zip(batches, again) for k in p)
    other = data.calibration_batches(FULL, 64, seed=6)
    assert not torch.equal(batches[0]["x"], other[0]["x"])
    # undo the noise: every clean image is a training image (and none is a test image)
    x_t = torch.cat([b["x"] for b in batches])
    t = torch.cat([b["t"] for b in batches])
    abar = FULL.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = ((x_t.double() - (1 - abar).sqrt() * torch.cat([b["noise"] for b in batches]).double()) / abar.sqrt()).float()
    pixels = ((x0[:, 0, 2:30, 2:30] + 1) * 127.5).round().to(torch.uint8).reshape(64, -1).numpy()
    train = data._split("train", fmnist_dir)[0].reshape(60000, -1)
    test = data._split("test", fmnist_dir)[0].reshape(10000, -1)
    train_rows = {row.tobytes() for row in train}
    test_rows = {row.tobytes() for row in test} - train_rows
    assert all(p.tobytes() in train_rows for p in pixels)
    assert not any(p.tobytes() in test_rows for p in pixels)
    y = torch.cat([b["y"] for b in batches])
    assert y.min() >= 0 and y.max() <= data.NULL_CLASS


def test_evaluation_images_are_the_test_split(fmnist_dir):
    images, labels = data.eval_images(100)
    assert images.shape == (100, 1, 32, 32) and labels.dtype == torch.long
    raw = data._split("test", fmnist_dir)
    torch.testing.assert_close(images, data.to_model_images(raw[0][:100]))
    assert torch.equal(labels, torch.from_numpy(raw[1][:100].astype(np.int64)))
    assert images.min() == -1 and images.max() <= 1
