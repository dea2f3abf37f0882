"""Shared helpers for the issue-14 feasibility study (not product code).

Issue 14 asks whether the reference 3DGS scene (``compresskit/adapters/gaussians/data/ref_scene.ply``)
can be compressed >= 40x with a held-out PSNR drop <= 0.3 dB. The study's scripts (``baseline.py``,
``run.py``) share what is here: the scene as plain float32 tensors,
the training / held-out cameras with their ground-truth renders (cached on disk), the held-out
PSNR / SSIM, a 3DGS-style Adam, the position learning-rate schedule, the training-view order and the
per-Gaussian importance used for pruning.

A scene ("params") is a dict of tensors, N Gaussians, SH degree 3 as stored in the .ply:
    means [N, 3], f_dc [N, 3], f_rest [N, 15, 3], opacities [N] (logit), scales [N, 3] (log), quats [N, 4]
"""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch

import compresskit.adapters.gaussians as gaussians_package
from compresskit.adapters.gaussians.image_metrics import psnr, ssim
from compresskit.adapters.gaussians.ply import read_ply
from compresskit.adapters.gaussians.procedural import render_ground_truth
from compresskit.adapters.gaussians.render import orbit_cameras, render

torch.set_num_threads(1)
DEFAULT_OUT_DIR = "/tmp/gs_study"  # --out-dir default: per-run files in <out-dir>/out/, results.jsonl, gt_cache.pt
DATA = str(Path(gaussians_package.__file__).resolve().parent / "data")
PLY = f"{DATA}/ref_scene.ply"
PLY_BYTES = os.path.getsize(PLY)  # the denominator of every compression ratio (3 720 042)
REC = json.load(open(f"{DATA}/ref_scene.json"))  # how ref_scene.ply was made: cameras, lrs, extent
ATTRS = ("means", "f_dc", "f_rest", "opacities", "scales", "quats")
# make_ref_scene.py's per-attribute Adam lrs (means: see means_lr_fn)
LR = {"f_dc": 2.5e-3, "f_rest": 2.5e-3 / 20, "opacities": 0.05, "scales": 5e-3, "quats": 1e-3}
EXTENT = REC["training"]["extent"]
TILE_PX = 8


def load_scene():
    """ref_scene.ply as a dict of float32 tensors (shapes in the module docstring), N = 14 994."""
    d = read_ply(PLY)
    return {k: torch.from_numpy(getattr(d, k).copy()).float() for k in ATTRS}


def cams_and_gt(out_dir=DEFAULT_OUT_DIR):
    """64 training and 8 held-out cameras (96 px) and their ground truth, cached in <out_dir>/gt_cache.pt.

    Returns train, held (lists of cameras), tgt [64, 3, 96, 96] and hgt [8, 3, 96, 96] float in [0, 1].
    """
    cache = os.path.join(out_dir, "gt_cache.pt")
    train = orbit_cameras(**REC["cameras"]["train"])
    held = orbit_cameras(**REC["cameras"]["heldout"])
    if os.path.exists(cache):
        c = torch.load(cache, weights_only=True)
        return train, held, c["train"], c["held"]
    tgt = torch.stack([render_ground_truth(c) for c in train])
    hgt = torch.stack([render_ground_truth(c) for c in held])
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"train": tgt, "held": hgt}, cache)
    return train, held, tgt, hgt


@torch.no_grad()
def evaluate(params, cams, gts):
    """Mean PSNR (dB) and SSIM over `cams` of the clamped render against `gts` [V, 3, H, W]."""
    g = SimpleNamespace(**params)
    ps, ss = [], []
    for c, t in zip(cams, gts):
        img = render(g, c, tile_size=TILE_PX).image.clamp(0, 1)
        ps.append(float(psnr(img, t))); ss.append(float(ssim(img, t)))
    return sum(ps) / len(ps), sum(ss) / len(ss)


class Adam:
    """3DGS-style Adam (0.9, 0.999, eps 1e-15) with per-parameter lrs."""
    def __init__(self, params, lrs, eps=1e-15):
        self.p, self.lrs, self.eps = params, lrs, eps
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, lr_scale=None):
        self.t += 1
        t = self.t
        for k, p in self.p.items():
            if p.grad is None or k not in self.lrs:
                continue
            lr = self.lrs[k] if not callable(self.lrs[k]) else self.lrs[k](t)
            if lr_scale: lr = lr * lr_scale.get(k, 1.0)
            m, v = self.m[k], self.v[k]
            m.mul_(0.9).add_(p.grad, alpha=0.1)
            v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - 0.999 ** t)).add_(self.eps), value=-lr / (1 - 0.9 ** t))
            p.grad = None

    def reset(self, keys=None):
        for k in (keys or self.p):
            self.m[k] = torch.zeros_like(self.p[k]); self.v[k] = torch.zeros_like(self.p[k])


def means_lr_fn(iters, init=1.6e-5, final=1.6e-6):
    """Position lr log-linearly decayed (defaults: from where the fit's schedule is late-ish to its end)."""
    def f(t):
        s = min(t / max(iters, 1), 1.0)
        return EXTENT * math.exp((1 - s) * math.log(init) + s * math.log(final))
    return f


def view_order(step, v=64, seed=0):
    """Training view for `step`: a fresh seeded permutation of the v views every v steps."""
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(seed * 100_003 + step // v))
    return int(perm[step % v])


def importance(params, cams):
    """Accumulated blend weight per Gaussian: grad of the summed render wrt a per-Gaussian colour offset
    (d(sum_pixels sum_ch C)/d(colour_i) = sum over pixels of a_i T_i, x3 channels), over `cams`."""
    n = params["means"].shape[0]
    imp = torch.zeros(n)  # [N]
    for c in cams:
        dc = params["f_dc"].detach().clone().requires_grad_(True)
        g = SimpleNamespace(**{**{k: v.detach() for k, v in params.items()}, "f_dc": dc})
        img = render(g, c, tile_size=TILE_PX).image
        img.sum().backward()
        imp += dc.grad.abs().sum(1)  # dc.grad [N, 3] -> [N]
    return imp
