"""The ``gaussians`` family's preparation step: prune the least important Gaussians, then fine-tune the rest.

Why: a 3DGS scene's bytes grow with its Gaussians, and a trained scene holds many that barely show. The
issue-14 study (``bench/gs_study``, ``docs/LAB_LOG.md`` 2026-12-07) dropped half of the reference scene's
Gaussians and fine-tuned the rest, at a cost of 0.08-0.21 dB training on ground truth; the product does
the same. By default it **distils** the uncompressed scene, training against its renders from the
calibration cameras, which every scene has; ``target="ground-truth"`` trains on the cameras' true images
where the adapter has them (0.18-0.22 dB better on the reference scene, ``docs/BENCHMARKS.md``).

1. **Importance** of a Gaussian: its blend weight ``a_i T_i`` summed over every pixel of every calibration
   view (Mini-Splatting's and LightGaussian's measure of what a Gaussian adds to the pictures). It is read
   as a gradient: with every SH coefficient set to 0 each colour is ``0.5`` (no clamp), so
   ``d sum(image) / d f_dc[i, c] = SH_C0 * sum_pixels a_i T_i``. The study took the gradient on the scene's
   own colours, which is zero where a colour is clamped at 0 (a dark Gaussian that still hides what is
   behind it); this one is not.
2. **Pruning** keeps the ``round((1 - fraction) N)`` most important (ties: the lower index), in their order.
3. **Fine-tuning**: every attribute of the kept Gaussians, ``steps`` steps of one calibration view each (a
   fresh seeded permutation of the views every epoch), 3DGS's loss ``0.8 L1 + 0.2 D-SSIM`` against the
   uncompressed scene's render (or the ground-truth image), Adam (0.9, 0.999, eps 1e-15) with 3DGS's per-attribute learning rates
   times ``lr_scale``; positions at the end of 3DGS's schedule (1.6e-5 -> 1.6e-6 times the cameras'
   extent, log-linear), as the study did.

Deterministic: same scene, cameras and settings, same result (seed 0; CPU, one thread for bit equality).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import torch

from compresskit.adapters.gaussians.camera import Camera
from compresskit.adapters.gaussians.image_metrics import render_loss
from compresskit.adapters.gaussians.ply import ATTRIBUTES
from compresskit.adapters.gaussians.project import SH_C0
from compresskit.adapters.gaussians.render import render
from compresskit.adapters.gaussians.scene import GaussianScene
from compresskit.errors import CompressKitError

# 3DGS's learning rates (arguments/__init__.py), as bench/make_ref_scene.py fitted the reference scene
LR = {"f_dc": 2.5e-3, "f_rest": 2.5e-3 / 20, "opacities": 0.05, "scales": 5e-3, "quats": 1e-3}
LR_MEANS = (1.6e-5, 1.6e-6)  # times the extent; the late part of 3DGS's schedule (the study's fine-tune)
TILE_PX = 8  # the tile side changes only the work, never the image; 8 is faster on CPU (docs/BENCHMARKS.md)
SEED = 0
TARGETS = ("renders", "ground-truth")  # what fine-tuning and calibration train towards (the adapter supplies the images)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PruneSettings:
    """``fraction`` of the Gaussians to drop, in [0, 1); ``steps`` fine-tuning steps (0: prune only);
    ``lr_scale`` times 3DGS's learning rates; ``size`` the longest image side in pixels of the renders
    importance and fine-tuning use; ``target`` what the fine-tuning trains towards: ``"renders"`` of the
    uncompressed scene (distillation) or the ``"ground-truth"`` images of the calibration cameras."""

    fraction: float = 0.0
    steps: int = 2000
    lr_scale: float = 1.0
    size: int = 96
    target: str = "renders"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "PruneSettings":
        """The settings of the adapter's ``prune*`` options (types already checked), range-checked."""
        s = cls(options["prune"], options["prune_steps"], options["prune_lr"], options["prune_size"], options["prune_target"])
        if not 0.0 <= s.fraction < 1.0 or math.isnan(s.fraction):
            raise CompressKitError(f"option prune must be a fraction of the Gaussians to drop in [0, 1), e.g. prune=0.5; got {s.fraction}")
        if s.steps < 0:
            raise CompressKitError(f"option prune_steps must be >= 0 (fine-tuning steps after pruning; 0: none), got {s.steps}")
        if not s.lr_scale > 0 or math.isinf(s.lr_scale):
            raise CompressKitError(f"option prune_lr must be a positive factor on 3DGS's learning rates, got {s.lr_scale}")
        if s.size < 1:
            raise CompressKitError(f"option prune_size must be a positive number of pixels, got {s.size}")
        if s.target not in TARGETS:
            raise CompressKitError(f"option prune_target must be one of {', '.join(TARGETS)} (what the fine-tuning trains towards), got {s.target!r}")
        default = cls()
        if s.fraction == 0.0:
            idle = [f"prune_{k}" if k != "lr_scale" else "prune_lr" for k in ("steps", "lr_scale", "size", "target") if getattr(s, k) != getattr(default, k)]
            if idle:
                raise CompressKitError(f"{', '.join(idle)} would do nothing: nothing is pruned; set --option prune=FRACTION (e.g. 0.5)")
        elif s.steps == 0 and (s.lr_scale != default.lr_scale or s.target != default.target):
            idle = [k for k, same in (("prune_lr", s.lr_scale == default.lr_scale), ("prune_target", s.target == default.target)) if not same]
            raise CompressKitError(f"{', '.join(idle)} would do nothing: prune_steps is 0 (no fine-tuning)")
        return s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def importance(scene: GaussianScene, cameras: Sequence[Camera]) -> torch.Tensor:
    """Each Gaussian's blend weight ``a_i T_i`` summed over the pixels of ``cameras``: ``[N]`` float32 >= 0."""
    probe = SimpleNamespace(**{a: getattr(scene, a).detach() for a in ATTRIBUTES})
    probe.f_rest = torch.zeros_like(probe.f_rest)
    total = torch.zeros(scene.num_gaussians, dtype=torch.float32)  # [N]
    for camera in cameras:
        f_dc = torch.zeros_like(probe.f_dc, requires_grad=True)  # [N, 3]: every colour 0.5, never clamped
        probe.f_dc = f_dc
        with torch.enable_grad():
            render(probe, camera, tile_size=TILE_PX).image.sum().backward()
        total += f_dc.grad.sum(dim=1).cpu() / (3 * SH_C0)
    return total


def keep_most_important(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ``round((1 - fraction) N)`` largest ``scores`` (at least one; ties: lower index first)."""
    n_keep = max(1, round((1.0 - fraction) * scores.numel()))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:n_keep].sort().values


def camera_extent(cameras: Sequence[Camera]) -> float:
    """3DGS's ``cameras_extent``: 1.1 x the largest distance of a camera centre from their mean."""
    centres = torch.stack([c.center.float() for c in cameras])  # [V, 3]
    return 1.1 * max(float((centres - centres.mean(0)).norm(dim=1).max()), 1e-6)


def fine_tune(scene: GaussianScene, cameras: Sequence[Camera], targets: Sequence[torch.Tensor], settings: PruneSettings,
              progress: Progress | None = None) -> list[float]:
    """Train every attribute of ``scene`` in place towards ``targets`` (``[3, H, W]``, one per camera) for
    ``settings.steps`` steps (module docstring); returns the loss of each step."""
    params = {a: getattr(scene, a) for a in ATTRIBUTES}
    for p in params.values():
        p.requires_grad_(True)
    groups = [{"params": [params[a]], "lr": LR[a] * settings.lr_scale, "name": a} for a in LR]
    means_group = {"params": [params["means"]], "lr": 0.0, "name": "means"}
    optimizer = torch.optim.Adam([*groups, means_group], betas=(0.9, 0.999), eps=1e-15)
    extent = camera_extent(cameras)
    (lr0, lr1), steps, views = LR_MEANS, settings.steps, len(cameras)
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    losses = []
    for step in range(steps):
        if not order:
            order = torch.randperm(views, generator=generator).tolist()
        v = order.pop()
        s = step / max(steps, 1)
        means_group["lr"] = settings.lr_scale * extent * math.exp((1 - s) * math.log(lr0) + s * math.log(lr1))
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = render_loss(render(scene, cameras[v], tile_size=TILE_PX).image, targets[v])
            loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None and (step % 50 == 0 or step + 1 == steps):
            progress(f"pruned scene: fine-tuning, loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", step + 1, steps)
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return losses


def prune_scene(teacher: GaussianScene, cameras: Sequence[Camera], settings: PruneSettings,
                progress: Progress | None = None, truth: Sequence[torch.Tensor] | None = None) -> tuple[GaussianScene, dict[str, Any]]:
    """``(pruned and fine-tuned scene, record)``: ``teacher`` is left as it is; ``cameras`` are the
    calibration views at ``settings.size`` (the caller fits them); ``truth`` their ground-truth images
    (``[3, H, W]`` each), needed when ``settings.target`` is ``"ground-truth"``."""
    start = time.perf_counter()
    if progress is not None:
        progress("pruned scene: importance of each Gaussian", 0, max(settings.steps, 1))
    scores = importance(teacher, cameras)
    keep = keep_most_important(scores, settings.fraction)
    student = teacher.select(keep)
    record: dict[str, Any] = {
        "step": "prune", **settings.to_dict(), "num_gaussians_before": teacher.num_gaussians, "num_gaussians": student.num_gaussians,
        "importance": "blend weight a_i T_i summed over the calibration views' pixels",
        "importance_kept_share": float(scores[keep].sum() / scores.sum().clamp(min=1e-30)),
        "fine_tune_target": ("the ground-truth images of the calibration cameras" if settings.target == "ground-truth"
                             else "the uncompressed scene's renders from the calibration cameras (distillation)"),
        "views": len(cameras),
    }
    if settings.steps:
        if settings.target == "ground-truth":
            if truth is None:
                raise CompressKitError("prune_target=ground-truth: this scene has no ground-truth images to fine-tune towards")
            targets = list(truth)
        else:
            with torch.no_grad():  # unclamped, as calibration's targets; cameras may differ in size
                targets = [render(teacher, c, tile_size=TILE_PX).image for c in cameras]
        losses = fine_tune(student, cameras, targets, settings, progress)
        window = max(1, min(100, len(losses) // 4))
        record.update(loss_first=sum(losses[:window]) / window, loss_last=sum(losses[-window:]) / window)
    student.requires_grad_(False).eval()  # as the adapter loads a scene: nothing trains unless asked
    record["seconds"] = time.perf_counter() - start
    return student, record
