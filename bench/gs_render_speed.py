"""CPU speed of the 3DGS renderer's torch path: forward and forward+backward, median wall times.

Scene: ``--n`` random Gaussians, means uniform in ``[-1, 1]^3``, isotropic-ish log scales uniform in
``[log smin, log smax]``, random rotations, opacities ``sigmoid(N(0, 1))``, SH degree 3; camera at distance
3.5 looking at the origin, 50 degree field of view. Prints one JSON line per image size, with the number
of splat-tile intersections (what the cost scales with) and the process's peak RSS so far.

Usage: OMP_NUM_THREADS=1 python bench/gs_render_speed.py --sizes 96 128 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time
from types import SimpleNamespace

import torch

from compresskit.adapters.gaussians import raster
from compresskit.adapters.gaussians.project import project
from compresskit.adapters.gaussians.render import Camera, render


def random_scene(n: int, smin: float, smax: float, seed: int = 0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        means=torch.rand(n, 3, generator=gen) * 2 - 1,
        f_dc=torch.randn(n, 3, generator=gen),
        f_rest=0.1 * torch.randn(n, 15, 3, generator=gen),
        opacities=torch.randn(n, generator=gen),
        scales=math.log(smin) + (math.log(smax) - math.log(smin)) * torch.rand(n, 3, generator=gen),
        quats=torch.randn(n, 4, generator=gen),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    ap.add_argument("--smin", type=float, default=0.01)
    ap.add_argument("--smax", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-elements", type=int, default=raster.DEFAULT_MAX_ELEMENTS)
    ap.add_argument("--tile", type=int, default=raster.TILE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scene = random_scene(args.n, args.smin, args.smax)
    for v in vars(scene).values():
        v.requires_grad_(True)
    for size in args.sizes:
        cam = Camera.look_at((0.0, -3.5, 1.0), (0.0, 0.0, 0.0), fov_deg=50, width=size, height=size)
        with torch.no_grad():
            bins = raster.bin_splats(project(scene, cam), size, size, args.tile)
        fwd, fwd_bwd = [], []
        for _ in range(args.repeats + 1):  # the first round warms up allocator and caches, not counted
            t0 = time.perf_counter()
            with torch.no_grad():
                render(scene, cam, max_elements=args.max_elements, tile_size=args.tile)
            t1 = time.perf_counter()
            out = render(scene, cam, max_elements=args.max_elements, tile_size=args.tile)
            (out.image.mean() + out.alpha.mean()).backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            fwd_bwd.append(t2 - t1)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({
            "n": args.n, "size": size, "tile": args.tile, "threads": args.threads, "scales": [args.smin, args.smax],
            "intersections": int(bins.gauss.numel()), "max_per_tile": int(bins.counts.max()),
            "forward_s": round(statistics.median(fwd[1:]), 4),
            "forward_backward_s": round(statistics.median(fwd_bwd[1:]), 4),
            "peak_rss_mb": round(rss / 1024, 1),
        }))


if __name__ == "__main__":
    main()
