"""Usage: python bench/gs_study/sh_layouts.py [ply | INIT.pt] [OUT_DIR (default /tmp/gs_study2)]

Scratch diagnostic (not a run of the study; no training, no bitstream): held-out PSNR cost of SH-rest codings,
k-means only, on the UNPRUNED ref scene (.ply, 14 994 Gaussians, 37.705 dB); every other attribute left as in the .ply.
Bytes are computed by formula (int8 tables as run.py writes them: k*d + 8*d per codebook; codes ceil(log2 k) bits per
coded Gaussian; mask 1 bit per Gaussian), both at this scene's N and at N = 7497 (the 50%-pruned count, same fractions).
Tables are used in float (the int8 rounding of run.py is not applied)."""
import json, math, sys, time
import torch
from common import cams_and_gt, evaluate, importance, load_scene

T0 = time.time()
SRC = sys.argv[1] if len(sys.argv) > 1 else "ply"
OUT = sys.argv[2] if len(sys.argv) > 2 else "/tmp/gs_study2"
P = load_scene() if SRC == "ply" else {k: v for k, v in torch.load(SRC, weights_only=True).items() if k in ("means", "f_dc", "f_rest", "opacities", "scales", "quats")}
N = P["means"].shape[0]
train, held, tgt, hgt = cams_and_gt(OUT)
base = evaluate(P, held, hgt)[0]
imp = importance(P, train[::4])
X = P["f_rest"].reshape(N, 45).clone()
nrm = X.norm(dim=1)
SC = {"norm": nrm, "normimp": nrm * imp, "norm2imp": nrm ** 2 * imp}
BANDS = {1: (0, 9), 2: (9, 24), 3: (24, 45)}  # columns of X (coefficient-major [15, 3] flattened): band 1 = coeffs 0-2
out = open(f"{OUT}/sh_layouts.jsonl" if SRC == "ply" else f"{OUT}/sh_layouts_init.jsonl", "a")
print("base", base, "s", time.time() - T0, flush=True)


@torch.no_grad()
def assign(x, C):
    d = (x * x).sum(1, keepdim=True) - 2 * x @ C.T + (C * C).sum(1)[None]
    return d.argmin(1)


@torch.no_grad()
def kmeans(x, k, iters=25, w=None):
    k = min(k, x.shape[0])
    g = torch.Generator().manual_seed(0)
    C = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    w = torch.ones(x.shape[0]) if w is None else w
    for _ in range(iters):
        idx = assign(x, C)
        s = torch.zeros_like(C).index_add_(0, idx, x * w[:, None]); c = torch.zeros(k).index_add_(0, idx, w)
        live = c > 0; C[live] = s[live] / c[live, None]
        dead = (~live).nonzero().squeeze(1)
        if dead.numel():
            err = (x - C[idx]).pow(2).sum(1); C[dead] = x[err.topk(dead.numel()).indices]
    return C


def rvq(x, ks, w=None):
    r, q = x, torch.zeros_like(x)
    for k in ks:
        C = kmeans(r, k, w=w); i = assign(r, C); q = q + C[i]; r = r - C[i]
    return q


def nbytes(n, frac, cbs):
    """cbs: list of (k, d) codebooks, each coded on the kept rows."""
    m = int(round(frac * n)) if frac < 1 else n
    return (math.ceil(n / 8) if frac < 1 else 0) + sum(k * d + 8 * d + math.ceil(m * max(1, math.ceil(math.log2(k))) / 8) for k, d in cbs)


def run(name, frac=1.0, score="norm2imp", sh=None, bands=None, weighted=False):
    """sh: list of stage sizes for one 45-d codebook (residual if >1); bands: {1: [k..], 2: [...], 3: [...]}; neither: mask only."""
    t = time.time()
    rows = torch.arange(N) if frac >= 1 else SC[score].topk(int(round(frac * N))).indices
    w = imp[rows] if weighted else None
    Q = torch.zeros_like(X); cbs = []
    xr = X[rows]
    if sh:
        Q[rows] = rvq(xr, sh, w); cbs = [(k, 45) for k in sh]
    elif bands:
        q = torch.zeros_like(xr)
        for b, ks in bands.items():
            s, e = BANDS[b]; q[:, s:e] = rvq(xr[:, s:e], ks, w); cbs += [(k, e - s) for k in ks]
        Q[rows] = q
    else:
        Q[rows] = xr
    ps = evaluate({**P, "f_rest": Q.reshape(N, 15, 3)}, held, hgt)[0]
    r = {"src": SRC, "N": N, "name": name, "frac": frac, "score": score, "sh": sh, "bands": bands, "weighted": weighted,
         "cost_db": base - ps, "psnr": ps, "sh_bytes_N14994": nbytes(N, frac, cbs), "sh_bytes_N7497": nbytes(7497, frac, cbs),
         "s": round(time.time() - t, 1)}
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + "\n"); out.flush()


if SRC == "ply":
    LAYOUTS = [("k256", 1.0, dict(sh=[256])), ("mask0.4", 0.4, {}), ("mask0.4_k256", 0.4, dict(sh=[256])), ("k1024", 1.0, dict(sh=[1024])),
               ("rvq256+256", 1.0, dict(sh=[256, 256])), ("band_1024_256_128_mask0.4", 0.4, dict(bands={1: [1024], 2: [256], 3: [128]})),
               ("mask0.3", 0.3, {}), ("mask0.5", 0.5, {}), ("mask0.4_k512", 0.4, dict(sh=[512])),
               ("mask0.3_rvq256+256", 0.3, dict(sh=[256, 256])), ("band_256_256_256", 1.0, dict(bands={1: [256], 2: [256], 3: [256]})),
               ("band_512_256_128_mask0.4", 0.4, dict(bands={1: [512], 2: [256], 3: [128]})), ("mask0.4_norm", 0.4, dict(score="norm")),
               ("mask0.4_normimp", 0.4, dict(score="normimp")), ("k256_impw", 1.0, dict(sh=[256], weighted=True)),
               ("mask0.2", 0.2, {}), ("mask0.6", 0.6, {})]
else:  # on the pruned, fine-tuned init: the layouts that fit next to q50_B's other streams (bytes: see the README of round 2)
    LAYOUTS = [("k256", 1.0, dict(sh=[256])), ("k256_impw", 1.0, dict(sh=[256], weighted=True)), ("k1024", 1.0, dict(sh=[1024])),
               ("mask0.6", 0.6, {}), ("mask0.8", 0.8, {}), ("mask0.5", 0.5, {}),
               ("rvq256+16_impw", 1.0, dict(sh=[256, 16], weighted=True)), ("rvq256+32_impw", 1.0, dict(sh=[256, 32], weighted=True)),
               ("k384_impw", 1.0, dict(sh=[384], weighted=True)), ("rvq128+128_impw", 1.0, dict(sh=[128, 128], weighted=True)),
               ("band_256_128_64_impw", 1.0, dict(bands={1: [256], 2: [128], 3: [64]}, weighted=True)),
               ("mask0.6_k384_impw", 0.6, dict(sh=[384], weighted=True)), ("mask0.7_k256_impw", 0.7, dict(sh=[256], weighted=True)),
               ("mask0.6_band_512_256_128_impw", 0.6, dict(bands={1: [512], 2: [256], 3: [128]}, weighted=True)),
               ("rvq256+256_impw", 1.0, dict(sh=[256, 256], weighted=True))]
for name, frac, kw in LAYOUTS:
    run(name, frac, **kw)
print("done", time.time() - T0, flush=True)
