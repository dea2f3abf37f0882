"""The ``gaussians`` adapter: 3DGS scenes through the same front door as every other family.

What is compressed are the scene's attribute tensors, as bare-tensor targets (no fake layers), one
row per Gaussian: ``gaussians.f_rest`` (``[N, 45]`` at SH degree 3, coefficient-major, so a PQ
subvector of d = 3 is one coefficient's RGB), ``gaussians.f_dc``, ``gaussians.scales`` and
``gaussians.quats`` with the method asked for; ``gaussians.opacities`` always with a scalar
quantizer (one row of N logits, one scale); ``gaussians.means`` with a 16-bit scalar quantizer per
coordinate (finer than float16 inside a bounded scene), or kept float16 with ``--exclude
gaussians.means``. The user's ``--override`` wins over both.

Preparation (``--option prune=0.5``, ``prune.py``): before the targets are found, the least important
Gaussians are dropped and the rest fine-tuned against the uncompressed scene's renders (or, with
``prune_target=ground-truth``, its ground-truth images); evaluation and the ratios still compare with
the original, unpruned ``.ply``. With ``--option order=morton`` the Gaussians are then sorted along a
Morton curve of their positions, which the ``morton`` quantizer on ``gaussians.means`` stores as gaps
between keys (24.6 instead of 36 bits per Gaussian at 12 bits on the pruned reference scene).

Calibration renders: a batch is one calibration camera and the uncompressed scene's picture from
it (the unpruned scene's, when the scene was pruned), or with ``calib_target=ground-truth`` its
ground-truth image; the task loss is 3DGS's training loss, ``0.8 L1 + 0.2 D-SSIM``, of the render
against that picture, so the EM M-step trains the codebooks through the differentiable CPU renderer.
Evaluation renders the held-out cameras (``views.py``) and compares with the uncompressed scene's
renders (``psnr``, ``ssim``), with the ground truth where there is one (the reference scene's
procedural images, or a 3DGS output's training images: ``psnr_gt``, ``psnr_drop_db``), and reports
the compression ratios.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compresskit.adapters.base import Adapter, DataSpec, EvalSpec, LoadedModel, Option, register_adapter
from compresskit.adapters.gaussians.camera import Camera
from compresskit.adapters.gaussians.image_metrics import psnr, render_loss, ssim
from compresskit.adapters.gaussians.ply import ATTRIBUTES, write_ply
from compresskit.adapters.gaussians.prune import LR, LR_MEANS, TARGETS, PruneSettings, camera_extent, prune_scene
from compresskit.adapters.gaussians.render import render, render_views
from compresskit.adapters.gaussians.scene import GaussianScene
from compresskit.adapters.gaussians.views import Views, fit_camera, read_image, scene_views
from compresskit.errors import CompressKitError
from compresskit.io import TENSORS
from compresskit.quantizers.morton import morton_order
from compresskit.targets import Layout

DATA_DIR = Path(__file__).parent / "data"
REFERENCE = "ref-scene"
REFERENCE_PLY = DATA_DIR / "ref_scene.ply"
ARCH_FILE = "scene.json"
PSNR_CAP_DB = 100.0  # what identical renders report (their PSNR is infinite)
FLOAT32_BYTES = 4
ORDERS = ("keep", "morton")


class SplatModel(nn.Module):
    """A scene and the cameras it is seen from: ``model(camera_index [B] long, size) -> images [B, 3, H, W]``
    (each camera's image at most ``size`` pixels on a side, 0: its own size; all one size),
    differentiable with respect to every attribute."""

    def __init__(self, gaussians: GaussianScene, cameras: tuple[Camera, ...]):
        super().__init__()
        self.gaussians = gaussians
        self.cameras = cameras

    def forward(self, camera_index: torch.Tensor, size: int = 0) -> torch.Tensor:
        return torch.stack([render(self.gaussians, fit_camera(self.cameras[i], size)).image for i in camera_index.tolist()])


@register_adapter("gaussians")
class GaussianSplatAdapter(Adapter):
    name = "gaussians"
    primary_metric = "psnr"
    higher_is_better = True
    target_methods = (
        ("gaussians.opacities", {"method": "rtn", "bits": 8}, "opacity is one scalar per Gaussian: scalar quantization, 8 bits"),
        ("gaussians.means", {"method": "rtn", "bits": 16}, "positions: 16-bit uniform per coordinate (finer than float16 in a bounded scene)"),
    )
    method_defaults = {
        "pq": ({"pool": False}, "DPQ's shared pool is sized for wide weight matrices; on the 3- and 4-wide attributes of the reference "
               "scene it cost 2.8 dB more than per-subspace codebooks at 1 bit (docs/BENCHMARKS.md), so the family keeps it "
               "off; --param pool=true for the paper's layout"),
    }
    preset_settings = {
        "best": (
            {"m_objective": "task", "em_rounds": 1, "n_samples": 64, "batch_size": 1, "m_samples": 0, "m_batch": 1, "lr": 1e-3,
             "latent_steps": 1000, "m_steps": 1000, "options": {"calib_size": 96}},
            "3DGS's render loss against the uncompressed scene's renders (the family has no other): 1000 steps of quantization in "
            "the loop, then 1000 codebook steps with the codes frozen, one 96-px view of 64 per step (docs/gaussians.md; the "
            "shared recipe distils, which a scene has no loss for)",
        ),
    }
    calib_options = {
        "calib_size": Option(64, "longest image side in pixels of the calibration renders"),
        "calib_target": Option("renders", "what calibration trains towards: the uncompressed scene's renders, or ground-truth images (the reference scene's, or a 3DGS output's training images)", TARGETS),
    }
    eval_options = {"eval_size": Option(96, "longest image side in pixels of the evaluation renders")}
    prepare_options = {
        "prune": Option(0.0, "fraction of the Gaussians to drop before compressing, least important first (0: none)"),
        "prune_steps": Option(PruneSettings.steps, "fine-tuning steps after pruning, one calibration view each, against the uncompressed renders (0: none)"),
        "prune_lr": Option(PruneSettings.lr_scale, "factor on 3DGS's per-attribute learning rates for the fine-tuning"),
        "prune_size": Option(PruneSettings.size, "longest image side in pixels of the renders pruning and fine-tuning use"),
        "prune_target": Option(PruneSettings.target, "what the fine-tuning trains towards: the uncompressed scene's renders, or ground-truth images (the reference scene's, or a 3DGS output's training images)", TARGETS),
        "order": Option("keep", "the order the Gaussians are stored in: as the .ply has them, or along a Morton curve of their positions (what the morton quantizer on gaussians.means codes compactly)", ORDERS),
    }
    loss_keys = ("target",)

    @classmethod
    def recognises(cls, spec: str | None) -> bool:
        if spec is None:
            return False
        if spec.lower() == REFERENCE:
            return True
        path = Path(spec).expanduser()
        return path.suffix.lower() == ".ply" and path.is_file()

    # ---- loading ---------------------------------------------------------------------------------
    def load(self, spec: str | None) -> LoadedModel:
        ply = self._resolve(spec)
        scene = GaussianScene.load(ply).eval()
        views = scene_views(ply, scene.means.detach())
        return self._loaded(scene, views, str(spec if spec is not None else REFERENCE), ply, _original_record(ply, scene))

    def _resolve(self, spec: str | None) -> Path:
        if spec is None or spec.lower() == REFERENCE:
            if not REFERENCE_PLY.is_file():
                raise CompressKitError(f"the reference scene is not in this installation ({REFERENCE_PLY}); make it with `PYTHONPATH=. python bench/make_ref_scene.py`")
            return REFERENCE_PLY
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CompressKitError(f"{spec}: no such .ply file")
        return path

    def _loaded(self, scene: GaussianScene, views: Views, source: str, resolved: Path, original: dict) -> LoadedModel:
        model = SplatModel(scene, views.calibration + views.evaluation).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return LoadedModel(model, source, str(resolved), extras={"views": views, "original": original})

    # ---- targets -----------------------------------------------------------------------------
    def extra_targets(self, model: nn.Module) -> dict[str, Layout]:
        rows = Layout(inputs="none")  # one row per Gaussian
        return {
            "gaussians.f_rest": rows, "gaussians.f_dc": rows, "gaussians.scales": rows, "gaussians.quats": rows,
            "gaussians.opacities": Layout(out_axis=1, inputs="none"),  # [N] -> one row of N
            "gaussians.means": Layout(out_axis=1, inputs="none"),  # [N, 3] -> a row per coordinate
        }

    # ---- preparation: pruning -------------------------------------------------------------------
    def prepare_settings(self, options=None) -> dict[str, Any]:
        settings = super().prepare_settings(options)
        PruneSettings.from_options(settings)  # ranges, and settings that would do nothing
        return settings

    def prepare(self, loaded: LoadedModel, options, progress=None) -> dict[str, Any]:
        """Prune ``options["prune"]`` of the Gaussians and fine-tune the rest (``prune.py``), then put
        them in ``options["order"]``, in place. The unpruned scene stays in ``loaded.extras["teacher"]``:
        calibration renders its targets from it, and ``extras["original"]`` (what evaluation compares
        with) still names the unpruned ``.ply``. Reordering changes no picture (the renderer sorts by
        depth), only what the ``morton`` quantizer stores: a point then costs the gap to the previous
        one's Morton key (``quantizers/morton.py``)."""
        record = self._prune(loaded, PruneSettings.from_options(options), progress)
        if options["order"] == "morton":
            model: SplatModel = loaded.model
            model.gaussians = model.gaussians.select(morton_order(model.gaussians.means)).requires_grad_(False).eval()
            record["order"] = "morton"
            loaded.extras["preparation"] = record
        return record

    def _prune(self, loaded: LoadedModel, settings: PruneSettings, progress) -> dict[str, Any]:
        if settings.fraction == 0.0:
            return {}
        model: SplatModel = loaded.model
        cameras = [fit_camera(c, settings.size) for c in loaded.extras["views"].calibration]
        truth = None
        if settings.target == "ground-truth":
            image = _ground_truth(loaded, "prune_target")
            truth = [image(i, c) for i, c in enumerate(cameras)]
        teacher = model.gaussians
        model.gaussians, record = prune_scene(teacher, cameras, settings, progress, truth)
        loaded.extras["teacher"] = loaded.extras.get("teacher", teacher)
        loaded.extras["preparation"] = record
        return record

    # ---- calibration ---------------------------------------------------------------------------
    def calibration_batches(self, loaded: LoadedModel, data: DataSpec) -> list[dict[str, Any]]:
        views: Views = loaded.extras["views"]
        n_cal = len(views.calibration)
        if data.n_samples > n_cal:
            raise CompressKitError(f"asked for {data.n_samples} calibration views, but the scene has {n_cal} calibration cameras; pass --calib-samples {n_cal} or fewer")
        order = torch.randperm(n_cal, generator=torch.Generator().manual_seed(data.seed))[: data.n_samples]
        size = self.option(data, "calib_size")
        target = self.option(data, "calib_target")
        model: SplatModel = loaded.model
        if target == "ground-truth":
            image = _ground_truth(loaded, "calib_target")
            return [{"camera_index": torch.tensor([i]), "size": size, "target": image(i, fit_camera(views.calibration[i], size))[None]}
                    for i in order.tolist()]
        teacher = SplatModel(loaded.extras["teacher"], model.cameras) if "teacher" in loaded.extras else model  # the unpruned scene
        batches = []
        with torch.no_grad():
            for i in order.tolist():  # calibration cameras come first in the model's list
                batches.append({"camera_index": torch.tensor([i]), "size": size, "target": teacher(torch.tensor([i]), size)})
        return batches

    def latent_lr(self, loaded: LoadedModel, target: str) -> float | None:
        """3DGS's per-attribute learning rates (``prune.LR``; positions at the late end of its schedule,
        times the calibration cameras' extent), as pruning's fine-tuning uses them."""
        attribute = target.removeprefix("gaussians.")
        if attribute == "means":
            return LR_MEANS[1] * camera_extent(loaded.extras["views"].calibration)
        return LR.get(attribute)

    def task_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return render_loss(model(camera_index=batch["camera_index"], size=batch["size"]), batch["target"])

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, loaded: LoadedModel, spec: EvalSpec) -> dict[str, float | str]:
        """PSNR / SSIM of the held-out renders against the uncompressed scene's, the PSNR drop
        against ground truth where there is one, and the compression ratios."""
        size = self.option(spec, "eval_size")
        views: Views = loaded.extras["views"]
        cams = [fit_camera(c, size) for c in views.evaluation]
        original = loaded.extras["original"]
        theirs, mine = self.render_pair(loaded, len(cams), size)
        out: dict[str, float | str] = {
            "psnr": float(psnr(mine, theirs).clamp(max=PSNR_CAP_DB).mean()),
            "ssim": float(ssim(mine, theirs).mean()),
            "views": float(len(cams)),
        }
        image = _truth(loaded)
        if image is not None:
            truth = torch.stack([image(len(views.calibration) + j, c) for j, c in enumerate(cams)])
            out["psnr_gt"] = float(psnr(mine, truth).mean())
            out["psnr_gt_original"] = float(psnr(theirs, truth).mean())
            out["psnr_drop_db"] = out["psnr_gt_original"] - out["psnr_gt"]
        else:
            out["psnr_drop_db_skipped"] = f"no ground-truth images for this scene ({views.images_note}): psnr compares with the uncompressed scene's renders"
        out.update(_ratios(loaded, original))
        return out

    # ---- persistence ---------------------------------------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        model: SplatModel = loaded.model
        views: Views = loaded.extras["views"]
        record = {
            "format_version": 1, "num_gaussians": model.gaussians.num_gaussians, "sh_degree": model.gaussians.sh_degree,
            "cameras": {"calibration": [_camera_json(c) for c in views.calibration], "evaluation": [_camera_json(c) for c in views.evaluation], "source": views.source,
                        "images": [str(f) for f in views.images], "images_note": views.images_note},
            "original": loaded.extras["original"], "preparation": loaded.extras.get("preparation", {}),
        }
        (directory / ARCH_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    def load_architecture(self, directory: Path) -> LoadedModel:
        path = directory / ARCH_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            n, degree = int(record["num_gaussians"]), int(record["sh_degree"])
            cameras = record["cameras"]
            views = Views(tuple(_camera_from_json(c) for c in cameras["calibration"]), tuple(_camera_from_json(c) for c in cameras["evaluation"]),
                          cameras["source"], tuple(Path(f) for f in cameras.get("images", [])), cameras.get("images_note", Views.images_note))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CompressKitError(f"{path}: not a compressed 3DGS scene's architecture record ({' '.join(str(err).split())})") from None
        k = (degree + 1) ** 2
        z = torch.zeros
        scene = GaussianScene(z(n, 3), z(n, 3), z(n, k - 1, 3), z(n), z(n, 3), z(n, 4))
        loaded = self._loaded(scene, views, str(directory.parent), directory.parent, record["original"])
        loaded.extras["preparation"] = record.get("preparation", {})
        return loaded

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        write_ply(directory / "point_cloud.ply", loaded.model.gaussians.to_ply())  # to_ply reads the decoded values

    def decompress(self, loaded: LoadedModel, out: Path, overwrite: bool = False) -> Path:
        """Write the (decoded) scene as a standard 3DGS ``.ply`` at ``out``."""
        if out.suffix.lower() != ".ply":
            raise CompressKitError(f"--out {out}: a 3DGS scene is written as a .ply file")
        return write_ply(out, loaded.model.gaussians.to_ply(), overwrite=overwrite)

    def render_pair(self, loaded: LoadedModel, n_views: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uncompressed, this model)`` renders of the first ``n_views`` held-out cameras, ``[V, 3, H, W]`` in [0, 1]."""
        cams = [fit_camera(c, size) for c in loaded.extras["views"].evaluation[:n_views]]
        reference = _reference_scene(loaded.extras["original"])
        return render_views(reference, cams).clamp(0, 1), render_views(loaded.model.gaussians, cams).clamp(0, 1)


# ---- helpers -------------------------------------------------------------------------------------
def _original_record(ply: Path, scene: GaussianScene) -> dict:
    """What evaluation needs to know of the uncompressed scene, kept in a compressed directory too."""
    return {"ply": str(ply.resolve()), "ply_bytes": ply.stat().st_size, "num_gaussians": scene.num_gaussians,
            "sh_degree": scene.sh_degree, "ground_truth": ply.resolve() == REFERENCE_PLY.resolve()}


def _truth(loaded: LoadedModel) -> Callable[[int, Camera], torch.Tensor] | None:
    """``(camera index, camera) -> [3, H, W]`` ground-truth image (the index counts the calibration
    cameras, then the evaluation ones; ``camera`` is fitted to the size wanted), or None when the scene
    has none: the reference scene's object is procedural; a 3DGS output's training images are files."""
    if loaded.extras["original"].get("ground_truth"):
        from compresskit.adapters.gaussians.procedural import render_ground_truth

        return lambda index, camera: render_ground_truth(camera)
    files = loaded.extras["views"].images
    if files:
        return lambda index, camera: read_image(files[index], camera)
    return None


def _ground_truth(loaded: LoadedModel, option: str) -> Callable[[int, Camera], torch.Tensor]:
    """:func:`_truth`, or one clear error naming ``option`` and why the scene has no ground truth."""
    truth = _truth(loaded)
    if truth is None:
        raise CompressKitError(f"option {option}=ground-truth: this scene has no ground-truth images ({loaded.extras['views'].images_note}); "
                               f"leave {option} at 'renders' to train towards the uncompressed scene")
    return truth


def _reference_scene(original: dict) -> GaussianScene:
    path = Path(original["ply"])
    if not path.is_file():
        raise CompressKitError(f"the uncompressed scene {path} is not there to compare with; evaluate where it is")
    return GaussianScene.load(path)


def _ratios(loaded: LoadedModel, original: dict) -> dict[str, float]:
    """``compression_ratio``: the ``.ply`` file's bytes over the compressed scene file's
    (``model.safetensors``, its header included) when ``loaded`` was read from a directory, else
    over the attribute bytes; ``directory_bytes``: every file of that directory (the manifest's
    per-target report and the cameras too); ``attribute_ratio``: the original scene's float32
    attribute bytes (all its Gaussians, pruned ones too) over the compressed bytes (codes packed,
    codebooks and scales at their stored dtype); ``bits_per_gaussian``: per stored Gaussian."""
    from compresskit.nn import quantized_tensors

    scene = loaded.model.gaussians
    quantized = {name.removeprefix("gaussians."): qt for name, (_, _, qt) in quantized_tensors(loaded.model).items()}
    dense_bits = 16 if quantized else 32  # a compressed scene keeps the rest at the default dense dtype, float16
    stored_bits = 0.0
    for attr in ATTRIBUTES:
        if attr in quantized:
            stored_bits += quantized[attr].quantizer.size_report().total_bits
        else:
            stored_bits += getattr(scene, attr).numel() * dense_bits
    # float32 attributes of the original scene: a pruned one is charged against the Gaussians it started from
    n_values = sum(getattr(scene, a).numel() for a in ATTRIBUTES) * original.get("num_gaussians", scene.num_gaussians) / scene.num_gaussians
    out = {"attribute_ratio": n_values * FLOAT32_BYTES * 8 / stored_bits, "bits_per_gaussian": stored_bits / scene.num_gaussians,
           "num_gaussians": float(scene.num_gaussians)}
    directory = Path(loaded.resolved)
    if (directory / TENSORS).is_file():
        out["compression_ratio"] = original["ply_bytes"] / (directory / TENSORS).stat().st_size
        out["compressed_bytes"] = float((directory / TENSORS).stat().st_size)
        out["directory_bytes"] = float(sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()))
    elif quantized:
        out["compression_ratio"] = original["ply_bytes"] * 8 / stored_bits
    else:
        out["compression_ratio"] = 1.0  # the .ply itself
    return out


def _camera_json(c: Camera) -> dict:
    return {"world_to_camera": c.world_to_camera.tolist(), **{f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "world_to_camera"}}


def _camera_from_json(d: dict) -> Camera:
    return Camera(torch.tensor(d["world_to_camera"], dtype=torch.float32), float(d["fx"]), float(d["fy"]), float(d["cx"]), float(d["cy"]), int(d["width"]), int(d["height"]))
