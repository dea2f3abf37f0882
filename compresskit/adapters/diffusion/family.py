"""What every adapter of the diffusion family shares: DDPM calibration data, loss, evaluation and sampling.

A family adapter (DiT, U-Net) says only how to find its model as ``model(x, t, y) -> out`` and the
shapes it takes; the data (Fashion-MNIST noised at uniform timesteps, carrying its noise), the DDPM
loss, the zero-data inputs, the Fréchet / IS-style evaluation and sampling pictures (``compresskit
sample``) are defined once, here.
"""
from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from compresskit.adapters.base import Adapter, Batch, DataSpec, EvalSpec, LoadedModel, Option
from compresskit.adapters.diffusion import data as fmnist
from compresskit.adapters.diffusion import ddpm
from compresskit.adapters.diffusion.ddpm import CFG_SCALE, CLASS_DROPOUT, GaussianDiffusion
from compresskit.adapters.diffusion.metrics import FID_SAMPLES, evaluate_sampler
from compresskit.errors import CompressKitError
from compresskit.io import MANIFEST, read_manifest

PICTURE_CHANNELS = (1, 3)  # grey or RGB pixels; other channel counts are latents, which need a VAE to be seen


class DiffusionAdapter(Adapter):
    """The DDPM side of a diffusion family's adapter. Subclasses implement :meth:`denoiser`,
    :meth:`fmnist_denoiser` and :meth:`input_shapes` (and may override :meth:`sampling_variance`)."""

    primary_metric = "fid"
    higher_is_better = False
    calib_options = {"class_dropout": Option(CLASS_DROPOUT, "probability a calibration label is replaced by the null class, as the model trains")}
    eval_options = {
        "steps": Option(50, "respaced DDPM sampling steps (DPQ reports 50, 100 and 250)"),
        "cfg_scale": Option(CFG_SCALE, "classifier-free guidance scale on the epsilon channels (a float, e.g. 1.5)"),
        "n_samples": Option(FID_SAMPLES, "generated images, scored against as many test images"),
        "effnet": Option(True, "also compute fid_effnet on EfficientNet-Lite0 features"),
        "vs_source": Option(False, "also sample the uncompressed model this one was compressed from (other seeds) and report "
                                   "fid_source / fid_effnet_source, the Fréchet distances to its images (evaluation takes twice as long)"),
    }
    sample_options = {"steps": eval_options["steps"], "cfg_scale": eval_options["cfg_scale"]}  # pictures are drawn as evaluation draws them
    method_defaults = {
        "pq": ({"pool": False, "row_scale": True},
               "on the reference models DPQ's pool and unscaled rows lost most of what the walk can keep: the 2-bit DiT's walk "
               "gave fid 101.5 with them and 62.8 with row scales and no pool, at 2.60 against 2.50 bits/weight "
               "(docs/BENCHMARKS.md); --param pool=true --param row_scale=false for the paper's layout"),
        "pq:1": ({"d": 4, "k": 16},
                 "at 1 bit the 256-entry tables of 8-wide subvectors outgrow the small reference models' layers (1.66 bits/weight "
                 "on fmnist-dit, 2.17 on fmnist-unet); 16 entries of 4-wide subvectors keep the codes at 1 bit and the model at "
                 "1.32 / 1.28, and with --preset best gave fid 2.32x FP on the DiT (median of 3 seeds; 2.43x before the walk "
                 "started from feedback codes) against 3.53x with the pool "
                 "(docs/BENCHMARKS.md); --param d=8 --param k=256 for the paper's 1-bit shape"),
    }
    preset_settings = {
        "fast": (
            {"n_samples": 64, "e_init": "feedback"},
            "the walk the results page measured: 64 noised training images (the shared recipe's 16 are sized for text), the "
            "E-step starting from error-feedback codes, which at 2 bits took the DiT's pq walk from fid 1.62x to 1.44x FP and "
            "its vq walk from 2.00x to 1.58x, the U-Net's vq walk from 1.45x to 1.26x, and left the U-Net's pq walk at 1.21-1.22x",
        ),
        "best": (
            {"n_samples": 64, "e_init": "feedback", "m_steps": 400, "m_samples": 512, "m_batch": 16, "lr": 3e-4},
            "the distillation M-step measured on fmnist-dit and fmnist-unet at 2 bits (docs/diffusion.md): 400 AdamW steps of "
            "16 noised images drawn from 512 at lr 3e-4, after a walk on 64 from error-feedback codes (at 1 bit: DiT 2.32x FP "
            "against 2.43x from the nearest codes, U-Net 1.66x against 2.72x; at 2 bits 1.19x / 1.11x against 1.23x / 1.12x); "
            "the shared recipe's 64 steps of 2 samples is sized for text",
        ),
    }
    loss_keys = ("noise",)  # a calibration batch's noise: read by the DDPM loss, never passed to the model

    # ---- loading: one builder, with and without weights -----------------------------------------
    def load(self, spec: str | None) -> LoadedModel:
        """The model of ``spec``, float32 and in eval mode (:meth:`_build` with weights)."""
        return self._build(spec, meta=False)

    def meta_model(self, spec: str | None) -> LoadedModel:
        """The architecture of ``spec`` on the meta device, no weights read (for ``compresskit estimate``)."""
        return self._build(spec, meta=True)

    @abstractmethod
    def _build(self, spec: str | None, meta: bool) -> LoadedModel:
        """The model of ``spec``: with its weights, or (``meta``) its architecture on the meta device."""

    # ---- what a family says about its model -----------------------------------------------------
    @abstractmethod
    def denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        """The model as ``model(x, t, y) -> out``; one clear error (naming ``what`` was asked) when it cannot be called so."""

    @abstractmethod
    def fmnist_denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        """:meth:`denoiser`, when it is a pixel-space Fashion-MNIST model (1 channel, 32 x 32, 10
        classes + the null class 10); one clear error otherwise."""

    @abstractmethod
    def input_shapes(self, model: nn.Module) -> tuple[tuple[int, int, int], int]:
        """``((channels, height, width), number of classes)`` the denoiser takes; the null class is that number."""

    def sampling_variance(self, model: nn.Module) -> str:
        """The reverse-process variance to sample with (``"fixed_small"``, or ``"learned"`` for 2C outputs)."""
        return "fixed_small"

    # ---- the shared DDPM side -------------------------------------------------------------------
    def calibration_batches(self, loaded: LoadedModel, data: DataSpec) -> list[Batch]:
        """``data.n_samples`` noised Fashion-MNIST training images (:func:`.data.calibration_batches`):
        ``{"x": x_t float32 [1, 1, 32, 32], "t": long [1], "y": long [1], "noise": float32 [1, 1, 32, 32]}``,
        labels dropped to the null class with probability ``class_dropout``; ``data.source`` is a
        directory of the IDX files (``None``: the Debian package's)."""
        self.fmnist_denoiser(loaded, "calibration data")
        return fmnist.calibration_batches(
            GaussianDiffusion.linear(), data.n_samples, seed=data.seed, class_dropout=self.option(data, "class_dropout"), source=data.source
        )

    def noise_batches(self, loaded: LoadedModel, data: DataSpec) -> list[Batch]:
        """Zero-data inputs (VQ4DiT, :func:`.ddpm.noise_batches`): Gaussian images of the model's own
        shapes at uniform timesteps, uniform classes, ``{"x", "t", "y"}``."""
        shape, classes = self.input_shapes(self.denoiser(loaded, "zero-data calibration"))
        return ddpm.noise_batches(
            data.n_samples, shape, classes, null_class=classes, seed=data.seed, class_dropout=self.option(data, "class_dropout"),
        )

    def task_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The DDPM loss: ``eps_mse(model(x, t, y), noise)``, exact and deterministic (the batch carries its noise)."""
        return ddpm.batch_loss(model, batch)

    def distill_targets(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The uncompressed model's epsilon prediction on ``batch`` (float32 ``[B, C, H, W]``; the
        variance channels of a learned-sigma model dropped): what ``m_objective="distill"`` trains the
        compressed model to reproduce, instead of the noise the DDPM loss compares with."""
        c = batch["x"].shape[1]
        return model(batch["x"], batch["t"], batch["y"])[:, :c].float()

    def distill_loss(self, model: nn.Module, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
        """``eps_mse`` of ``model``'s epsilon prediction on ``batch`` against the teacher's (0 when equal)."""
        return ddpm.eps_mse(model(batch["x"], batch["t"], batch["y"]), targets)

    def evaluate(self, loaded: LoadedModel, spec: EvalSpec) -> dict[str, float | str]:
        """``n_samples`` images sampled with ``steps`` respaced DDPM steps and guidance ``cfg_scale``
        (:func:`.metrics.evaluate_sampler`, seeded by ``spec.seed``), against as many test images:
        ``fid`` and ``is`` on the project's Fashion-MNIST classifier, ``fid_effnet`` on EfficientNet-Lite0
        (or ``fid_effnet_skipped``, the reason), plus the settings used. Option ``vs_source``: also
        ``fid_source`` / ``fid_effnet_source`` against the uncompressed model's images (:meth:`_uncompressed`)."""
        model = self.fmnist_denoiser(loaded, "evaluation")
        source_model = self.fmnist_denoiser(self._uncompressed(loaded), "evaluation against the source") if self.option(spec, "vs_source") else None
        with torch.no_grad():
            return evaluate_sampler(
                model, steps=self.option(spec, "steps"), n_samples=self.option(spec, "n_samples"), seed=spec.seed,
                cfg_scale=float(self.option(spec, "cfg_scale")), effnet=self.option(spec, "effnet"), source=spec.source,
                variance=self.sampling_variance(model), source_model=source_model,
            )

    def _uncompressed(self, loaded: LoadedModel) -> LoadedModel:
        """The model ``loaded`` was compressed from, loaded afresh: a compressed directory's recorded
        source, else ``loaded.source`` itself (the model being compressed in this process, or an
        uncompressed model, which then meets its own sampling floor)."""
        directory = Path(loaded.resolved)
        if (directory / MANIFEST).is_file():
            recorded = read_manifest(directory).get("source", {}).get("model")
            if not recorded:
                raise CompressKitError(f"{directory} records no source model to compare with (vs_source needs one)")
            return self.load(recorded)
        return self.load(loaded.source)


    def sample(self, loaded: LoadedModel, labels: torch.Tensor, seed: int = 0, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Pictures of classes ``labels`` (long ``[N]``) as :meth:`evaluate` samples them: ``steps``
        respaced DDPM steps, guidance ``cfg_scale``, start and step noise from ``seed``. Float
        ``[N, C, H, W]`` in [-1, 1]; pixel-space models only (1 or 3 channels)."""
        model = self.denoiser(loaded, "sampling")
        shape, classes = self.input_shapes(model)
        if shape[0] not in PICTURE_CHANNELS:
            raise CompressKitError(
                f"this model samples {shape[0]}-channel latents, not pictures; sampling needs a pixel-space model "
                "(1 or 3 channels): decoding latents with a VAE is not supported"
            )
        labels = torch.as_tensor(labels, dtype=torch.long)  # [N]
        if labels.dim() != 1 or not len(labels) or labels.min() < 0 or labels.max() >= classes:
            raise CompressKitError(f"labels must be a non-empty list of class ids in 0..{classes - 1}, got {labels.tolist()}")
        settings = self.sample_settings(options)
        diffusion = GaussianDiffusion.linear().respaced(settings["steps"])
        with torch.no_grad():
            x = diffusion.sample(
                model, labels, shape, null_class=classes, cfg_scale=float(settings["cfg_scale"]), seed=seed,
                variance=self.sampling_variance(model),
            )  # [N, C, H, W]
        return x.clamp(-1, 1)

    def class_names(self, loaded: LoadedModel) -> tuple[str, ...]:
        """Fashion-MNIST's names for a Fashion-MNIST-shaped model (1 x 32 x 32, 10 classes), else the class ids."""
        shape, classes = self.input_shapes(self.denoiser(loaded, "sampling"))
        if (shape, classes) == (fmnist.IMAGE_SHAPE, fmnist.NUM_CLASSES):
            return fmnist.CLASS_NAMES
        return tuple(str(i) for i in range(classes))
