"""Cross-check the CPU renderer against gsplat's CUDA rasterizer on the reference scene (issue 14).

Needs a CUDA device and gsplat (``pip install --no-deps gsplat jaxtyping``; gsplat compiles its CUDA
extension on first use). For every camera of ``ref-scene`` (held-out and calibration views) it renders

* ``cpu``: the project's pure-torch path on the CPU (what every CPU user gets);
* ``gsplat``: :func:`render` on CUDA tensors, which hands the inputs to ``gsplat.rasterization``;
* ``torch-cuda``: the project's pure-torch projection and rasterizer run on CUDA tensors,

and prints, per view and as medians: the PSNR of ``gsplat`` and ``torch-cuda`` against ``cpu`` (inf
where equal), their largest absolute pixel difference and the largest alpha difference. Then the
gradients: the scene with its colours and positions perturbed (seeded) is rendered by both back ends,
the render loss (L1 + D-SSIM) against the unperturbed ``cpu`` render is back-propagated, and the
cosine similarity of the two gradients is printed per attribute. Last, the median forward and
forward+backward times of each back end.

    PYTHONPATH=. python bench/gs_cuda_crosscheck.py --out crosscheck.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import compresskit.adapters.gaussians as gaussians_package
from compresskit.adapters.gaussians.image_metrics import psnr, render_loss
from compresskit.adapters.gaussians.project import project, sh_degree_of
from compresskit.adapters.gaussians.raster import DEFAULT_MAX_ELEMENTS, TILE, rasterize
from compresskit.adapters.gaussians.render import render
from compresskit.adapters.gaussians.scene import GaussianScene
from compresskit.adapters.gaussians.views import scene_views

REF_SCENE = Path(gaussians_package.__file__).resolve().parent / "data" / "ref_scene.ply"
ATTRIBUTES = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")
DEVICE = {"cpu": "cpu", "gsplat": "cuda", "torch-cuda": "cuda"}  # where each back end runs


def leaves(scene: GaussianScene, device: str) -> SimpleNamespace:
    """The scene's attributes as fresh leaf tensors on ``device`` that collect gradients."""
    return SimpleNamespace(**{a: getattr(scene, a).detach().to(device).clone().requires_grad_(True) for a in ATTRIBUTES})


def torch_path(g, camera, background):
    """The project's own projection + rasterizer on whatever device ``g`` is on."""
    splats = project(g, camera, sh_degree_of(g.f_rest, None))
    return rasterize(splats, camera.width, camera.height, background, DEFAULT_MAX_ELEMENTS, TILE)


def one_view(g, camera, backend: str, background):
    if backend == "torch-cuda":
        return torch_path(g, camera, background)
    out = render(g, camera, background=background)
    return out.image, out.alpha


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first run warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", type=Path, default=REF_SCENE)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also write the JSON lines here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gs_cuda_crosscheck needs a CUDA device")
    import gsplat  # noqa: F401  (fails here, clearly, when it is not installed)

    lines = []

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        lines.append(record)

    scene = GaussianScene.load(args.scene)
    views = scene_views(args.scene, scene.means)
    cameras = list(views.evaluation) + list(views.calibration)
    background = {d: torch.zeros(3, device=d) for d in ("cpu", "cuda")}
    unperturbed = {d: leaves(scene, d) for d in ("cpu", "cuda")}
    emit({"scene": str(args.scene.name), "gaussians": scene.num_gaussians, "sh_degree": scene.sh_degree,
          "views": len(cameras), "size": [cameras[0].width, cameras[0].height], "gsplat": gsplat.__version__,
          "torch": torch.__version__, "device": torch.cuda.get_device_name()})

    # ---- images -----------------------------------------------------------------------------------
    per_backend = {"gsplat": [], "torch-cuda": []}
    targets = []
    with torch.no_grad():
        for i, cam in enumerate(cameras):
            ref_img, ref_alpha = one_view(unperturbed["cpu"], cam, "cpu", background["cpu"])
            targets.append(ref_img)
            for backend in per_backend:
                img, alpha = one_view(unperturbed["cuda"], cam, backend, background["cuda"])
                img, alpha = img.cpu(), alpha.cpu()
                rec = {"view": i, "backend": backend, "psnr_vs_cpu": float(psnr(img, ref_img)),
                       "max_abs": float((img - ref_img).abs().max()), "alpha_max_abs": float((alpha - ref_alpha).abs().max())}
                per_backend[backend].append(rec)
    for backend, recs in per_backend.items():
        finite = [r["psnr_vs_cpu"] for r in recs if math.isfinite(r["psnr_vs_cpu"])]
        emit({"images": backend, "views": len(recs),
              "psnr_vs_cpu_median": statistics.median(finite) if finite else float("inf"),
              "psnr_vs_cpu_min": min(finite) if finite else float("inf"),
              "max_abs_max": max(r["max_abs"] for r in recs), "alpha_max_abs_max": max(r["alpha_max_abs"] for r in recs)})

    # ---- gradients of the render loss --------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    noise = {"means": 0.01 * torch.randn(scene.means.shape, generator=gen),
             "f_dc": 0.1 * torch.randn(scene.f_dc.shape, generator=gen)}

    def perturbed(device: str) -> SimpleNamespace:
        g = leaves(scene, device)
        with torch.no_grad():
            for a, n in noise.items():
                getattr(g, a).add_(n.to(device))
        return g

    grads = {}
    for backend, device in DEVICE.items():
        g = perturbed(device)
        loss = 0.0
        for cam, target in zip(cameras[:8], targets[:8]):
            img, _ = one_view(g, cam, backend, background[device])
            loss = loss + render_loss(img[None], target.to(device)[None])
        loss.backward()
        grads[backend] = {a: getattr(g, a).grad.detach().cpu().flatten() for a in ATTRIBUTES}
        grads[backend]["loss"] = float(loss.detach())
    for backend in ("gsplat", "torch-cuda"):
        cos = {a: float(torch.nn.functional.cosine_similarity(grads[backend][a], grads["cpu"][a], dim=0)) for a in ATTRIBUTES}
        emit({"gradients": backend, "loss": grads[backend]["loss"], "loss_cpu": grads["cpu"]["loss"], "cosine_vs_cpu": cos})

    # ---- speed --------------------------------------------------------------------------------------
    cam = cameras[0]
    for backend, device in DEVICE.items():
        g, bg = unperturbed[device], background[device]

        def forward():
            with torch.no_grad():
                one_view(g, cam, backend, bg)

        def forward_backward():
            img, _ = one_view(g, cam, backend, bg)
            img.sum().backward()

        emit({"speed": backend, "forward_s": timed(forward, device, args.repeats),
              "forward_backward_s": timed(forward_backward, device, args.repeats),
              "threads": torch.get_num_threads()})
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")


if __name__ == "__main__":
    main()
