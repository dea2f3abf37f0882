"""Make the project's reference 3DGS scene: Gaussians fitted, on the CPU, to exact renders of the procedural object.

    OMP_NUM_THREADS=1 PYTHONPATH=. nohup python bench/make_ref_scene.py --threads 1 \\
        --checkpoint /work/ckpt/scene.ckpt --resume --preview docs/img/gs_ref_scene_views.png > /work/ckpt/scene.log 2>&1 &

The target is :mod:`compresskit.adapters.gaussians.procedural` (a checkered sphere and a striped box, with a
highlight), rendered exactly by ray casting from ``--train-views`` cameras on a Fibonacci spiral around it
(``orbit_cameras``, elevations ``TRAIN_ELEVATIONS_DEG``); ``--heldout-views`` other cameras on interleaved
rings (``HELDOUT_ELEVATIONS_DEG``, none of them a training view) measure the result. The fit is the recipe of
3D Gaussian Splatting (Kerbl et al., SIGGRAPH 2023, ``graphdeco-inria/gaussian-splatting``, ``train.py``),
scaled from its 30 000 iterations to ``--iters``:

* start from ``--init-points`` surface samples (3DGS starts from SfM points) plus ``--random-points`` uniform in
  the object's bounding ball; colour from the sample, opacity 0.1, isotropic scale the RMS distance to the 3
  nearest neighbours, identity rotation, higher SH zero;
* one training view per iteration, a fresh permutation of the views per epoch (seeded by ``(seed, epoch)``);
  loss ``render_loss`` (0.8 L1 + 0.2 D-SSIM); Adam (0.9, 0.999, eps 1e-15) with 3DGS's per-attribute learning
  rates, the positions' decayed log-linearly from 1.6e-4 to 1.6e-6 times the scene extent;
* SH degree raised by one every ``--sh-every`` iterations up to 3 (the inactive coefficients are not shown to
  the renderer, so they get no gradient);
* from ``--densify-from`` to ``--densify-until``, every ``--densify-every`` iterations: Gaussians whose mean
  view-space positional gradient (NDC units, averaged over the views that saw them) is at least
  ``--grad-threshold`` are cloned when small (largest std <= ``percent_dense`` x extent) and split in two
  (positions drawn from the Gaussian, stds / 1.6) when large; then those with opacity < 0.005, a world size
  > 0.1 x extent or (after the opacity reset) a screen radius > ``SCREEN_PRUNE_FRAC`` of the width are
  pruned. The count never exceeds ``--max-gaussians`` (the candidates with the largest gradients win);
* once, at ``--opacity-reset-at``, every opacity is lowered to at most 0.01 (its Adam moments cleared).

The view-space gradient is 3DGS's: the gradient of the loss with respect to each splat's projected 2D mean
(``render``'s CPU path is run in its two steps, ``project`` then ``rasterize``, to read it), in NDC units
(pixels x W / 2), averaged over the views whose projection kept the Gaussian; its screen radius is the
half-size of its alpha >= 1/255 box. Simplified against 3DGS: one opacity reset instead of one every 3000
iterations, a screen-size prune relative to the image width, and no exposure or background tricks.

Defaults (96 x 96 images, 64 training views, 12 000 iterations, at most 15 000 Gaussians): measured on the
project's shared 2-core machine (load 3-4), ``--threads 1``: 1168 s (19.5 min), 14 994 Gaussians (the cap is
reached by iteration ~3000), 3.7 MB ``.ply``, held-out PSNR 37.71 dB, SSIM 0.9943 (``ref_scene.json``).

Resumable: with ``--checkpoint PATH`` everything (the Gaussians, however many there are, Adam's moments, the
densification statistics, the split generator, the step and the seconds spent) is written every
``--checkpoint-every`` iterations and at the end (``torch.save`` to ``PATH.tmp``, then ``os.replace``);
``--resume`` goes on from it bit-identically (same machine, same thread count). ``--stop-at K`` ends the
session after iteration K with the checkpoint written and nothing else.

Outputs: the scene as a standard 3DGS ``.ply`` (``--out``) and, next to it, a ``.json`` with the two camera
rigs as ``orbit_cameras`` arguments (``orbit_cameras(**rig)`` regenerates them), the split, the schedule, the
time and the held-out PSNR / SSIM against the ground truth; ``--preview views.png`` shows ground truth | render
for a few held-out views.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from compresskit.adapters.gaussians.image_metrics import psnr, render_loss, ssim
from compresskit.adapters.gaussians.procedural import BOUNDING_RADIUS, SUPERSAMPLE, render_ground_truth, sample_surface_points
from compresskit.adapters.gaussians.project import project, quat_to_rotmat
from compresskit.adapters.gaussians.raster import rasterize
from compresskit.adapters.gaussians.render import orbit_cameras, render
from compresskit.errors import CompressKitError

OUT = Path(__file__).resolve().parent.parent / "compresskit" / "adapters" / "gaussians" / "data" / "ref_scene.ply"
FORMAT_VERSION = 1
ATTRS = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")
SH_DEGREE = 3  # K = 16 coefficients per channel
SH_C0 = 0.28209479177387814  # Y_0^0: colour = SH_C0 * f_dc + 0.5
TRAIN_ELEVATIONS_DEG = (-35.0, 80.0)  # the spiral's band: the object is seen from below too
HELDOUT_ELEVATIONS_DEG = (32.0, 2.0, 58.0, -18.0)  # ring i, azimuth 45 i degrees: between the spiral's views
BETAS, ADAM_EPS = (0.9, 0.999), 1e-15
# 3DGS's learning rates (arguments/__init__.py); the positions' are multiplied by the scene extent
LR = {"f_dc": 2.5e-3, "f_rest": 2.5e-3 / 20, "opacities": 0.05, "scales": 5e-3, "quats": 1e-3}
LR_MEANS_INIT, LR_MEANS_FINAL = 1.6e-4, 1.6e-6
INIT_OPACITY, RESET_OPACITY, MIN_OPACITY = 0.1, 0.01, 0.005
PERCENT_DENSE, WORLD_PRUNE_FRAC = 0.01, 0.1  # of the extent: clone / split boundary, too large a Gaussian
TILE_PX = 8  # the rasterizer's tile side: the same image as 16, faster on the CPU (docs/BENCHMARKS.md)
SCREEN_PRUNE_FRAC = 0.25  # of the image width: too large a screen radius (3DGS: 20 px of ~1000)


def rigs(args: argparse.Namespace) -> dict[str, dict]:
    """The training and held-out cameras as ``orbit_cameras`` keyword arguments (what the JSON records)."""
    common = {"radius": args.radius, "target": [0.0, 0.0, 0.0], "fov_deg": args.fov, "width": args.size,
              "height": args.size, "up": [0.0, 0.0, 1.0]}
    return {"train": {"n": args.train_views, **common, "elevation_range_deg": list(TRAIN_ELEVATIONS_DEG)},
            "heldout": {"n": args.heldout_views, **common, "elevations_deg": list(HELDOUT_ELEVATIONS_DEG)}}


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def initial_gaussians(n_surface: int, n_random: int, seed: int) -> dict[str, torch.Tensor]:
    """Surface samples plus random points in the bounding ball, as 3DGS initialises from a point cloud."""
    samples = sample_surface_points(n_surface, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    direction = torch.randn(n_random, 3, generator=gen)
    radius = BOUNDING_RADIUS * torch.rand(n_random, 1, generator=gen) ** (1 / 3)
    points = torch.cat([samples.points, radius * direction / direction.norm(dim=-1, keepdim=True)])  # [N, 3]
    colours = torch.cat([samples.colours, torch.rand(n_random, 3, generator=gen)])  # [N, 3]
    n = points.shape[0]
    k = min(3, n - 1)
    sq = torch.cat([torch.cdist(chunk, points).pow(2).topk(k + 1, largest=False).values[:, 1:]
                    for chunk in points.split(1024)]) if k > 0 else torch.ones(n, 1)  # [N, k] without self
    log_std = sq.mean(1).clamp(min=1e-7).sqrt().log()  # [N]
    return {
        "means": points, "f_dc": (colours - 0.5) / SH_C0, "f_rest": torch.zeros(n, (SH_DEGREE + 1) ** 2 - 1, 3),
        "opacities": torch.full((n,), _logit(INIT_OPACITY)), "scales": log_std.unsqueeze(1).repeat(1, 3),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
    }


class SceneFitter:
    """The whole fitting state: Gaussians, Adam's moments, densification statistics, step, generator."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rigs = rigs(args)
        self.train_cams, self.heldout_cams = orbit_cameras(**self.rigs["train"]), orbit_cameras(**self.rigs["heldout"])
        self.targets = torch.stack([render_ground_truth(c, args.supersample) for c in self.train_cams])  # [V, 3, H, W]
        centres = torch.stack([c.center.float() for c in self.train_cams])
        self.extent = 1.1 * float((centres - centres.mean(0)).norm(dim=-1).max())  # 3DGS's cameras_extent
        self.params = {k: v.requires_grad_(True) for k, v in initial_gaussians(args.init_points, args.random_points, args.seed).items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self._reset_stats()
        self.gen = torch.Generator().manual_seed(args.seed + 1)  # split positions
        self.step, self.elapsed_s = 0, 0.0

    @property
    def num_gaussians(self) -> int:
        return self.params["means"].shape[0]

    def _reset_stats(self) -> None:
        n = self.num_gaussians
        self.grad_accum, self.grad_count, self.max_radius_px = torch.zeros(n), torch.zeros(n), torch.zeros(n)

    def sh_degree_at(self, iteration: int) -> int:
        return min(SH_DEGREE, iteration // self.args.sh_every)

    def view_of(self, step: int) -> int:
        v = len(self.train_cams)
        perm = torch.randperm(v, generator=torch.Generator().manual_seed(self.args.seed * 100_003 + step // v))
        return int(perm[step % v])

    def gaussians(self) -> SimpleNamespace:
        """What the renderer reads: the six attributes."""
        return SimpleNamespace(**self.params)

    def means_lr(self, iteration: int) -> float:
        t = min(iteration / max(self.args.iters, 1), 1.0)
        return self.extent * math.exp((1 - t) * math.log(LR_MEANS_INIT) + t * math.log(LR_MEANS_FINAL))

    # ---- one iteration ----------------------------------------------------------------------------
    def train_step(self) -> float:
        a, it = self.args, self.step + 1  # iterations count from 1, as in 3DGS
        view = self.view_of(self.step)
        cam = self.train_cams[view]
        # render()'s CPU path, in its two steps, to read the gradient of the 2D means as 3DGS does; the
        # inactive SH coefficients are not evaluated, so they get no gradient
        splats = project(self.gaussians(), cam, self.sh_degree_at(it))
        splats.means2d.retain_grad()
        image, _ = rasterize(splats, cam.width, cam.height, torch.zeros(3), tile=TILE_PX)  # [3, H, W]
        loss = render_loss(image, self.targets[view])
        for p in self.params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            if it < a.densify_until:
                self.add_stats(splats, cam)
            self.adam_step(it)
            if a.densify_from < it < a.densify_until and it % a.densify_every == 0:
                self.densify_and_prune(after_reset=it > a.opacity_reset_at)
            if it == a.opacity_reset_at:
                self.reset_opacity()
        self.step = it
        return loss.item()

    def adam_step(self, t: int) -> None:
        (b1, b2), lrs = BETAS, {**LR, "means": self.means_lr(t)}
        for k, p in self.params.items():
            if p.grad is None:  # not on this view's graph at all
                continue
            m, v = self.exp_avg[k], self.exp_avg_sq[k]
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2**t)).add_(ADAM_EPS), value=-lrs[k] / (1 - b1**t))

    def add_stats(self, splats, cam) -> None:
        """Accumulate each seen Gaussian's view-space positional gradient (NDC units, as 3DGS) and screen radius."""
        ids = splats.ids  # [M] the Gaussians this view projected
        grad = splats.means2d.grad if splats.means2d.grad is not None else torch.zeros_like(splats.means2d)  # [M, 2] per pixel
        g_ndc = (grad * torch.tensor([cam.width / 2, cam.height / 2])).norm(dim=-1)  # NDC spans the image in 2 units
        self.grad_accum.index_add_(0, ids, g_ndc)
        self.grad_count.index_add_(0, ids, torch.ones_like(g_ndc))
        self.max_radius_px[ids] = torch.maximum(self.max_radius_px[ids], splats.extents.amax(1))

    # ---- densification ----------------------------------------------------------------------------
    def _rebuild(self, rows: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        """Keep the Gaussians at ``rows`` (with their Adam moments), append ``new`` (with zero moments)."""
        for k in ATTRS:
            kept = self.params[k].detach()[rows]
            self.params[k] = torch.cat([kept, new[k]]).requires_grad_(True)
            for moments in (self.exp_avg, self.exp_avg_sq):
                moments[k] = torch.cat([moments[k][rows], torch.zeros_like(new[k])])

    def densify_and_prune(self, after_reset: bool) -> dict[str, int]:
        """Clone small and split large Gaussians with a high mean view-space gradient, then prune; returns the counts."""
        a, p = self.args, {k: v.detach() for k, v in self.params.items()}
        n = self.num_gaussians
        grads = torch.where(self.grad_count > 0, self.grad_accum / self.grad_count.clamp(min=1), 0.0)  # [N]
        size = p["scales"].exp().amax(1)  # [N] largest std
        candidates = torch.nonzero(grads >= a.grad_threshold).squeeze(1)
        room = max(a.max_gaussians - n, 0)  # clone and split each add one Gaussian
        if candidates.numel() > room:
            candidates = candidates[grads[candidates].argsort(descending=True, stable=True)[:room]].sort().values
        large = size[candidates] > PERCENT_DENSE * self.extent
        clone, split = candidates[~large], candidates[large]
        stds = p["scales"][split].exp().repeat(2, 1)  # [2S, 3]
        offsets = torch.randn(stds.shape, generator=self.gen) * stds
        children = {k: p[k][split].repeat(2, *[1] * (p[k].dim() - 1)) for k in ATTRS}
        children["means"] = (quat_to_rotmat(children["quats"]) @ offsets.unsqueeze(-1)).squeeze(-1) + children["means"]
        children["scales"] = (stds / (0.8 * 2)).log()
        keep = torch.ones(n, dtype=torch.bool)
        keep[split] = False
        new = {k: torch.cat([p[k][clone], children[k]]) for k in ATTRS}
        self._rebuild(torch.nonzero(keep).squeeze(1), new)
        radius = torch.cat([self.max_radius_px[keep], torch.zeros(new["means"].shape[0])])
        p = {k: v.detach() for k, v in self.params.items()}
        prune = (torch.sigmoid(p["opacities"]) < MIN_OPACITY) | (p["scales"].exp().amax(1) > WORLD_PRUNE_FRAC * self.extent)
        if after_reset:
            prune |= radius > SCREEN_PRUNE_FRAC * self.train_cams[0].width
        self._rebuild(torch.nonzero(~prune).squeeze(1), {k: p[k][:0] for k in ATTRS})
        self._reset_stats()
        return {"cloned": clone.numel(), "split": split.numel(), "pruned": int(prune.sum()), "count": self.num_gaussians}

    def reset_opacity(self) -> None:
        """Lower every opacity to at most RESET_OPACITY and forget its Adam moments (3DGS's reset_opacity)."""
        self.params["opacities"].data.clamp_(max=_logit(RESET_OPACITY))
        self.exp_avg["opacities"].zero_()
        self.exp_avg_sq["opacities"].zero_()

    # ---- checkpoints ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """The arguments that define the run; a checkpoint only resumes the run it came from."""
        skip = {"checkpoint", "checkpoint_every", "resume", "out", "preview", "preview_views", "log_every", "stop_at", "threads"}
        return json.dumps({k: v for k, v in sorted(vars(self.args).items()) if k not in skip})

    def save_checkpoint(self, path: Path) -> None:
        state = {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint(), "step": self.step,
                 "elapsed_s": self.elapsed_s, "gen": self.gen.get_state(), "grad_accum": self.grad_accum,
                 "grad_count": self.grad_count, "max_radius_px": self.max_radius_px}
        for k in ATTRS:
            state[f"param.{k}"], state[f"exp_avg.{k}"], state[f"exp_avg_sq.{k}"] = self.params[k].detach(), self.exp_avg[k], self.exp_avg_sq[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: the previous checkpoint stays whole until this one is complete

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        if state.get("fingerprint") != self.fingerprint():
            raise CompressKitError(f"{path} is the checkpoint of a run with other arguments; pass the same ones, or another --checkpoint")
        for k in ATTRS:
            self.params[k] = state[f"param.{k}"].clone().requires_grad_(True)
            self.exp_avg[k], self.exp_avg_sq[k] = state[f"exp_avg.{k}"].clone(), state[f"exp_avg_sq.{k}"].clone()
        self.grad_accum, self.grad_count, self.max_radius_px = state["grad_accum"], state["grad_count"], state["max_radius_px"]
        self.gen.set_state(state["gen"])
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, cams) -> tuple[list[float], list[float], list[torch.Tensor], list[torch.Tensor]]:
        """PSNR and SSIM of each camera's render against the ground truth, and both images ``[3, H, W]``."""
        truth = [render_ground_truth(c, self.args.supersample) for c in cams]
        renders = [render(self.gaussians(), c, tile_size=TILE_PX).image.clamp(0, 1) for c in cams]
        return ([float(psnr(r, t)) for r, t in zip(renders, truth)], [float(ssim(r, t)) for r, t in zip(renders, truth)], truth, renders)


def write_outputs(fitter: SceneFitter, out: Path, final_loss: float | None) -> dict:
    """The ``.ply`` at ``out`` and its ``.json`` next to it; returns the JSON record."""
    from compresskit.adapters.gaussians.ply import PlyGaussians, write_ply

    a = fitter.args
    p = {k: v.detach().contiguous().numpy() for k, v in fitter.params.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_ply(out, PlyGaussians(**p), overwrite=True)
    psnrs, ssims, _, _ = fitter.evaluate(fitter.heldout_cams)
    record = {
        "format_version": FORMAT_VERSION, "script": "bench/make_ref_scene.py", "scene": out.name,
        "num_gaussians": fitter.num_gaussians, "sh_degree": SH_DEGREE,
        "ground_truth": f"compresskit.adapters.gaussians.procedural.render_ground_truth(camera, supersample={a.supersample})",
        "cameras": {"function": "compresskit.adapters.gaussians.render.orbit_cameras", **fitter.rigs},
        "split": {"train": list(range(a.train_views)), "heldout": list(range(a.heldout_views)),
                  "note": "indices into orbit_cameras(**cameras[rig]); the held-out rig shares no camera with the training rig"},
        "training": {"iters": fitter.step, "planned_iters": a.iters, "seed": a.seed, "threads": a.threads,
                     "seconds": round(fitter.elapsed_s, 1), "final_loss": final_loss, "extent": fitter.extent,
                     "init_points": a.init_points, "random_points": a.random_points, "max_gaussians": a.max_gaussians,
                     "grad_threshold": a.grad_threshold, "sh_every": a.sh_every, "densify_from": a.densify_from,
                     "densify_until": a.densify_until, "densify_every": a.densify_every, "opacity_reset_at": a.opacity_reset_at,
                     "lr": {**LR, "means": [LR_MEANS_INIT, LR_MEANS_FINAL, "x extent, log-linear decay"]},
                     "loss": "0.8 L1 + 0.2 D-SSIM (image_metrics.render_loss)"},
        "heldout": {"psnr_db_mean": sum(psnrs) / len(psnrs), "ssim_mean": sum(ssims) / len(ssims), "psnr_db": psnrs, "ssim": ssims},
    }
    tmp = out.with_name(out.stem + ".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out.with_suffix(".json"))
    return record


def write_preview(fitter: SceneFitter, path: Path, n_views: int) -> None:
    """Ground truth | render for the first ``n_views`` held-out views, PSNR under each render."""
    from compresskit.grid import image_grid, save_png, side_by_side

    cams = fitter.heldout_cams[:n_views]
    psnrs, _, truth, renders = fitter.evaluate(cams)
    up = max(1, 160 // fitter.args.size)  # nearest-neighbour upscale so small views stay readable
    truth, renders = ([x.repeat_interleave(up, 1).repeat_interleave(up, 2) for x in xs] for xs in (truth, renders))
    gt = image_grid(torch.stack(truth) * 2 - 1, [f"held-out {i}" for i in range(len(cams))], columns=len(cams))
    fit = image_grid(torch.stack(renders) * 2 - 1, [f"{q:.1f} dB" for q in psnrs], columns=len(cams))
    save_png(side_by_side([gt, fit], ["ground truth", f"{fitter.num_gaussians} Gaussians"]), path, overwrite=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=12000)
    p.add_argument("--size", type=int, default=96, help="image width and height in pixels")
    p.add_argument("--train-views", type=int, default=64)
    p.add_argument("--heldout-views", type=int, default=8)
    p.add_argument("--radius", type=float, default=2.8, help="camera distance from the object's centre")
    p.add_argument("--fov", type=float, default=50.0, help="field of view across the width, degrees")
    p.add_argument("--supersample", type=int, default=SUPERSAMPLE, help="ground truth rays per pixel along each axis")
    p.add_argument("--init-points", type=int, default=4000, help="surface samples to start from")
    p.add_argument("--random-points", type=int, default=200, help="random points in the bounding ball to start from")
    p.add_argument("--max-gaussians", type=int, default=15000)
    p.add_argument("--grad-threshold", type=float, default=2e-4, help="mean view-space gradient (NDC) that densifies")
    p.add_argument("--sh-every", type=int, help="iterations per SH degree (default iters / 12)")
    p.add_argument("--densify-from", type=int, help="default iters / 20")
    p.add_argument("--densify-until", type=int, help="default iters / 2")
    p.add_argument("--densify-every", type=int, help="default iters / 60")
    p.add_argument("--opacity-reset-at", type=int, help="default iters / 5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT, help="the .ply; its .json goes next to it")
    p.add_argument("--checkpoint", type=Path, help="write the whole state here every --checkpoint-every iterations and at the end")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--stop-at", type=int, help="end this session after this iteration (checkpoint written, no outputs)")
    p.add_argument("--preview", type=Path, help="PNG: ground truth | render for a few held-out views")
    p.add_argument("--preview-views", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    schedule = {"sh_every": 12, "densify_from": 20, "densify_until": 2, "densify_every": 60, "opacity_reset_at": 5}
    for key, div in schedule.items():
        if getattr(args, key) is None:
            setattr(args, key, max(args.iters // div, 1))
    if args.resume and args.checkpoint is None:
        p.error("--resume needs --checkpoint PATH")
    if args.stop_at is not None and args.checkpoint is None:
        p.error("--stop-at needs --checkpoint PATH (the session's work would be lost)")
    if args.init_points + args.random_points > args.max_gaussians:
        p.error("--init-points + --random-points must not exceed --max-gaussians")
    return args


def main(argv: list[str] | None = None) -> SceneFitter:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    fitter = SceneFitter(args)
    if args.resume and args.checkpoint.is_file():
        fitter.load_checkpoint(args.checkpoint)
        print(f"resumed from {args.checkpoint} at iteration {fitter.step} ({fitter.num_gaussians} Gaussians)")
    print(f"{args.train_views} training / {args.heldout_views} held-out views of {args.size} x {args.size}, {args.iters} iterations, "
          f"{fitter.num_gaussians} Gaussians to start, at most {args.max_gaussians}, {args.threads} thread(s)", flush=True)
    end = min(args.iters, args.stop_at or args.iters)
    losses, loss, start = [], None, time.perf_counter() - fitter.elapsed_s
    while fitter.step < end:
        loss = fitter.train_step()
        fitter.elapsed_s = time.perf_counter() - start
        losses.append(loss)
        if fitter.step % args.log_every == 0 or fitter.step == end:
            print(f"iter {fitter.step}: loss {sum(losses) / len(losses):.4f}  {fitter.num_gaussians} Gaussians  "
                  f"SH {fitter.sh_degree_at(fitter.step)}  {fitter.elapsed_s:.0f} s", flush=True)
            losses = []
        if args.checkpoint and (fitter.step % args.checkpoint_every == 0 or fitter.step == end):
            fitter.save_checkpoint(args.checkpoint)
    if fitter.step < args.iters:
        print(f"stopped at iteration {fitter.step} of {args.iters}; --resume goes on from {args.checkpoint}")
        return fitter
    record = write_outputs(fitter, args.out, loss)
    h = record["heldout"]
    print(f"wrote {args.out} ({record['num_gaussians']} Gaussians) and its .json: held-out PSNR {h['psnr_db_mean']:.2f} dB, "
          f"SSIM {h['ssim_mean']:.4f}, {record['training']['seconds']:.0f} s")
    if args.preview:
        write_preview(fitter, args.preview, args.preview_views)
        print(f"wrote {args.preview}")
    return fitter


if __name__ == "__main__":
    main()
