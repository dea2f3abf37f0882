"""Issue-14 feasibility study, step 0: the uncompressed baseline every drop is measured against.

Issue 14 asks for >= 40x on the reference 3DGS scene at <= 0.3 dB held-out PSNR drop. This prints the
reference scene's held-out and training PSNR / SSIM against ground truth (the study's 37.705 dB,
SSIM 0.9943), its size in bytes (the ratio's denominator) and the fwd+bwd time per training step.
It also writes the ground-truth cache <out-dir>/gt_cache.pt that the runs reuse.

    PYTHONPATH=. python bench/gs_study/baseline.py [--out-dir /tmp/gs_study]
"""
import argparse
import time
from types import SimpleNamespace

from common import DEFAULT_OUT_DIR, PLY_BYTES, TILE_PX, cams_and_gt, evaluate, load_scene
from compresskit.adapters.gaussians.image_metrics import render_loss
from compresskit.adapters.gaussians.render import render

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the ground-truth cache gt_cache.pt lives")
a = p.parse_args()
t0 = time.time()
train, held, tgt, hgt = cams_and_gt(a.out_dir)  # tgt [64, 3, 96, 96], hgt [8, 3, 96, 96]
print("gt", time.time() - t0, tgt.shape, hgt.shape, flush=True)
P = load_scene()
print("N", P["means"].shape[0], "ply bytes", PLY_BYTES)
t0 = time.time(); print("heldout", evaluate(P, held, hgt), time.time() - t0)
t0 = time.time(); print("train", evaluate(P, train, tgt), time.time() - t0)
# time fwd+bwd
params = {k: v.clone().requires_grad_(True) for k, v in P.items()}
t0 = time.time()
for i in range(10):
    img = render(SimpleNamespace(**params), train[i], tile_size=TILE_PX).image  # [3, 96, 96]
    render_loss(img, tgt[i]).backward()
print("fwd+bwd s/iter", (time.time() - t0) / 10)
