"""Issue-14 feasibility study: one configuration, from training to a decoded bitstream.

Issue 14 asks whether the reference 3DGS scene can reach >= 40x at <= 0.3 dB held-out PSNR drop. One run
of this script is one row of that study: prune (by importance), optionally reduce the SH degree, fine-tune
against the ground-truth training views, optionally quantize in the loop (RTN means / opacity / --rtn
columns with STE, VQ groups with STE and Lloyd-updated codebooks, then frozen codes with the codebooks
trained directly), write the exact bitstream, decode it from the file alone and evaluate the decoded scene.
Without quantization (--qat-start -1, the default) it saves the fine-tuned float scene instead
(<out-dir>/out/<name>_fp.pt, the --init of later runs).

Writes <out-dir>/out/<name>.json (args, eval trajectory, result), <out-dir>/out/<name>.gsq (quantized runs)
and appends the result to <out-dir>/results.jsonl. From the repo root:

    PYTHONPATH=. python bench/gs_study/run.py --name NAME [options] [--out-dir /tmp/gs_study]

This is the study's later script (run2.py there); its first script re-assigned codes at every step,
which is --reassign-every 1 here (README.md).
"""
import argparse
import json
import lzma
import math
import os
import struct
import time
from types import SimpleNamespace

import numpy as np
import torch

from common import (ATTRS, DEFAULT_OUT_DIR, LR, PLY_BYTES, TILE_PX, Adam, cams_and_gt, evaluate, importance,
                    load_scene, means_lr_fn, view_order)
from compresskit.adapters.gaussians.image_metrics import render_loss
from compresskit.adapters.gaussians.render import render

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--name", required=True)
p.add_argument("--prune", default="", help="step:fraction_of_original,...")
p.add_argument("--sh", type=int, default=3)
p.add_argument("--iters", type=int, default=2000)
p.add_argument("--qat-start", type=int, default=-1)
p.add_argument("--freeze-at", type=int, default=-1, help="codes frozen, codebooks trained directly from here")
p.add_argument("--means-bits", type=int, default=12)
p.add_argument("--opac-bits", type=int, default=6)
p.add_argument("--vq", default="dc=f_dc:256,geom=scales+quats:1024,sh=f_rest:256",
               help="name=attr+attr:k,... one k-entry codebook per group; k1+k2 (e.g. sh=f_rest:128+128) is a residual "
                    "VQ of that many stages; f_rest1/f_rest2/f_rest3 are the SH-rest bands of degree 1/2/3 (9/15/21 values, "
                    "product VQ per band, e.g. sh1=f_rest1:128,sh2=f_rest2:128,sh3=f_rest3:128; needs --sh 3)")
p.add_argument("--cb-dtype", default="f16", choices=["f16", "i8"])
p.add_argument("--means-lr", default="1.6e-5,1.6e-6")
p.add_argument("--means-coding", default="fixed", choices=["fixed", "rice"], help="rice: Gaussians sorted by Morton code of the quantized means, deltas Rice-coded")
p.add_argument("--init", default="", help="start from a saved params .pt (skips the original scene)")
p.add_argument("--reassign-every", type=int, default=10)
p.add_argument("--rtn", default="", help="attr:bits,... per-column RTN (min/max float32) with STE, e.g. scales:6")
p.add_argument("--eval-every", type=int, default=500)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--imp-weighted", action="store_true", help="k-means weighted by importance")
p.add_argument("--sh-mask", type=float, default=0.0,
               help="keep the SH rest of only this fraction of the Gaussians (top by --sh-mask-score, chosen when QAT "
                    "starts); the others render with a zero SH rest; the file has 1 bit per Gaussian and SH codes only for "
                    "the kept ones. 0: off")
p.add_argument("--sh-mask-score", default="norm2imp", choices=["norm", "normimp", "norm2imp"],
               help="per-Gaussian score for --sh-mask: |f_rest|, |f_rest| * importance, |f_rest|^2 * importance")
p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="per-run files go to <out-dir>/out/, plus results.jsonl and gt_cache.pt")
a = p.parse_args()
torch.manual_seed(a.seed)
T0 = time.time()
OUTD = os.path.join(a.out_dir, "out"); os.makedirs(OUTD, exist_ok=True)
train, held, tgt, hgt = cams_and_gt(a.out_dir)  # tgt [64, 3, 96, 96], hgt [8, 3, 96, 96]
P0 = load_scene()
N0 = P0["means"].shape[0]  # 14 994: --prune fractions are of this count
K1 = (a.sh + 1) ** 2 - 1  # SH-rest coefficients per colour channel (15 at degree 3)
# SH-rest bands as pseudo-attributes for per-band codebooks: name -> (first, last + 1) coefficient of f_rest [N, K1, 3]
BANDS = {"f_rest1": (0, 3), "f_rest2": (3, 8), "f_rest3": (8, 15)}
SH_ATTRS = ("f_rest",) + tuple(BANDS)  # the attributes that --sh-mask masks
if a.init:
    P0 = torch.load(a.init, weights_only=True)
P0["f_rest"] = P0["f_rest"][:, :K1].contiguous()  # [N, K1, 3]
params = {k: v.clone().requires_grad_(True) for k, v in P0.items()}
mi, mf = (float(x) for x in a.means_lr.split(","))
lrs = {**LR, "means": means_lr_fn(a.iters, mi, mf)}
opt = Adam(params, lrs)
prune_sched = {int(s): float(f) for s, f in (x.split(":") for x in a.prune.split(",") if x)}
# VQ groups: the group's attributes are concatenated into one vector per Gaussian, one k-entry codebook
groups = []
for spec in a.vq.split(","):
    if not spec or a.qat_start < 0: continue
    name, rest = spec.split("="); attrs, k = rest.split(":")
    attrs = [x for x in attrs.split("+") if not (x == "f_rest" and K1 == 0)]
    assert a.sh == 3 or not any(x in BANDS for x in attrs), "per-band SH codebooks need --sh 3"
    ks = [int(x) for x in k.split("+")]  # one entry per residual stage
    assert all(x in SH_ATTRS for x in attrs) or not any(x in SH_ATTRS for x in attrs), "SH and other attributes in one group"
    if attrs: groups.append({"name": name, "attrs": attrs, "k": ks[0], "ks": ks, "sh": any(x in SH_ATTRS for x in attrs)})
assert a.sh_mask == 0 or a.qat_start < 0 or any(g["sh"] for g in groups), "--sh-mask needs an SH-rest VQ group"
_bands = [t for g in groups for t in g["attrs"] if t in BANDS]
assert not _bands or (sorted(_bands) == sorted(BANDS) and "f_rest" not in [t for g in groups for t in g["attrs"]]), \
    "per-band SH codebooks: each of f_rest1..3 exactly once, and no f_rest group"
RTN = {t: int(b) for t, b in (x.split(":") for x in a.rtn.split(",") if x)} if a.qat_start >= 0 else {}  # attr -> bits
log = {"args": vars(a), "evals": []}


def attr_val(attr):
    """The parameter tensor behind `attr`: params[attr], or the band's slice of f_rest [N, nb, 3] for f_rest1..3."""
    if attr in BANDS:
        s, e = BANDS[attr]
        return params["f_rest"][:, s:e]
    return params[attr]


def feat(attr, x):
    """[N, ...] attribute -> [N, d] rows to quantize; quaternions unit-normalised, first component made >= 0."""
    if attr == "quats":
        x = torch.nn.functional.normalize(x, dim=-1)
        return x * torch.where(x[:, :1] < 0, -1.0, 1.0)
    return x.reshape(x.shape[0], -1)


def unfeat(attr, q, n):
    """Inverse of feat's reshape: f_rest rows [N, 3 * K1] -> [N, K1, 3] (a band's rows [N, 3 * nb] -> [N, nb, 3])."""
    return q.reshape(n, -1, 3) if attr in SH_ATTRS else q


def dims(attr):
    if attr in BANDS:
        return 3 * (BANDS[attr][1] - BANDS[attr][0])
    return {"f_dc": 3, "f_rest": 3 * K1, "scales": 3, "quats": 4}[attr]


@torch.no_grad()
def assign(x, C):
    """Nearest centroid: x [n, d], C [k, d] -> idx [n]."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ C.T + (C * C).sum(1)[None]
    return d.argmin(1)


@torch.no_grad()
def lloyd(x, C, idx, w=None):
    """One (weighted) Lloyd update of C [k, d] in place; live [k] marks centroids that got points."""
    w = torch.ones(x.shape[0]) if w is None else w
    s = torch.zeros_like(C).index_add_(0, idx, x * w[:, None])
    c = torch.zeros(C.shape[0]).index_add_(0, idx, w)
    live = c > 0
    C[live] = s[live] / c[live, None]
    return C, live


@torch.no_grad()
def kmeans(x, k, iters=25, w=None):
    """k-means of x [n, d] -> C [k, d], seeded from --seed."""
    g = torch.Generator().manual_seed(a.seed)
    C = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        idx = assign(x, C)
        C, live = lloyd(x, C, idx, w)
        dead = (~live).nonzero().squeeze(1)
        if dead.numel():  # re-seed dead centroids at the worst-fit points
            err = (x - C[idx]).pow(2).sum(1)
            C[dead] = x[err.topk(dead.numel()).indices]
    return C


def rtn(x, lo, hi, b):
    """Round-to-nearest at b bits on [lo, hi] (per column when lo, hi are [d]): (codes, dequantized)."""
    L = 2 ** b - 1
    code = torch.round((x.clamp(lo, hi) - lo) / (hi - lo) * L)
    return code, lo + code / L * (hi - lo)


# quantization state: lo/hi [3] means range; C[name] [k, d] codebooks; idx[name] [N] codes;
# rlo_<attr>/rhi_<attr> [d] --rtn ranges; w [N] k-means weights or None; frozen.
# Residual groups (--vq ...:k1+k2) have C[name] and idx[name] as lists, one per stage. --sh-mask: rows [M] the
# Gaussians that keep their SH rest (sorted); SH groups are coded on those rows only.
qs = None


def grows(g):
    """The rows group g is coded on: qs["rows"] for an SH group under --sh-mask, else None (all)."""
    return qs["rows"] if g["sh"] and qs["rows"] is not None else None


def gw(g):
    """k-means weights [n_rows] of group g, or None."""
    r = grows(g)
    return qs["w"] if qs["w"] is None or r is None else qs["w"][r]


def gx(g, detach=False):
    """Group g's vectors [n_rows, d]: its attributes concatenated, restricted to grows(g)."""
    x = torch.cat([feat(t, attr_val(t).detach() if detach else attr_val(t)) for t in g["attrs"]], 1)
    r = grows(g)
    return x if r is None else x[r]


@torch.no_grad()
def rvq_update(x, Cs, w):
    """One assign + Lloyd update + re-assign per residual stage (stage s fits what stages < s leave of x [n, d]).
    Cs: list of [k_s, d], updated in place. Returns the codes, a list of [n]."""
    idxs, r = [], x
    for C in Cs:
        idx = assign(r, C)
        lloyd(r, C, idx, w)
        idx = assign(r, C)
        idxs.append(idx); r = r - C[idx]
    return idxs


@torch.no_grad()
def rvq_assign(x, Cs):
    """Greedy residual codes of x [n, d] with the stage codebooks Cs (list of [k_s, d]) -> list of [n]."""
    idxs, r = [], x
    for C in Cs:
        idx = assign(r, C); idxs.append(idx); r = r - C[idx]
    return idxs


def start_qat():
    global qs
    # importance() backpropagates, so outside no_grad (the first round's --imp-weighted called it inside and failed)
    imp = importance(params, train[::4]) if (a.imp_weighted or a.sh_mask > 0) else None  # [N]
    with torch.no_grad():
        m = params["means"]
        qs = {"lo": m.min(0).values.clone(), "hi": m.max(0).values.clone(), "frozen": False, "C": {}, "idx": {}}
        for t in RTN:
            x = feat(t, params[t].detach())
            qs["rlo_" + t], qs["rhi_" + t] = x.min(0).values.clone(), x.max(0).values.clone()
        w = imp if a.imp_weighted else None
        qs["w"] = w
        qs["rows"] = None
        if a.sh_mask > 0:
            nrm = params["f_rest"].detach().reshape(imp.shape[0], -1).norm(dim=1)  # [N]
            sc = {"norm": nrm, "normimp": nrm * imp, "norm2imp": nrm ** 2 * imp}[a.sh_mask_score]
            qs["rows"] = sc.topk(int(round(a.sh_mask * sc.shape[0]))).indices.sort().values  # [M]
        for g in groups:
            x = gx(g, detach=True)
            if len(g["ks"]) == 1:
                qs["C"][g["name"]] = kmeans(x, min(g["k"], x.shape[0]), w=gw(g))
            else:  # residual stages, each k-means on what the previous stages leave
                Cs, r = [], x
                for k in g["ks"]:
                    C = kmeans(r, min(k, r.shape[0]), w=gw(g)); Cs.append(C); r = r - C[assign(r, C)]
                qs["C"][g["name"]] = Cs


def freeze():
    qs["frozen"] = True
    with torch.no_grad():
        for g in groups:
            x = gx(g, detach=True)
            lr = LR["f_rest" if g["attrs"][0] in BANDS else g["attrs"][0]]
            if len(g["ks"]) == 1:
                qs["idx"][g["name"]] = assign(x, qs["C"][g["name"]])
                # codebooks become parameters, lr of the group's first attribute (scale+rot: scales' lr)
                cb = qs["C"][g["name"]].clone().requires_grad_(True)
                params["cb_" + g["name"]] = cb
                lrs["cb_" + g["name"]] = lr
                opt.m["cb_" + g["name"]] = torch.zeros_like(cb); opt.v["cb_" + g["name"]] = torch.zeros_like(cb)
            else:  # stage s's codebook is the parameter cb_<name>_<s>
                qs["idx"][g["name"]] = rvq_assign(x, qs["C"][g["name"]])
                for s_, C in enumerate(qs["C"][g["name"]]):
                    key = f"cb_{g['name']}_{s_}"
                    params[key] = C.clone().requires_grad_(True); lrs[key] = lr
                    opt.m[key] = torch.zeros_like(C); opt.v[key] = torch.zeros_like(C)


STEP = [0]  # the training step, read by scene() for --reassign-every


def scene(update=True):
    """What the renderer sees (quantized with STE when QAT is on)."""
    if qs is None:
        return {k: params[k] for k in ATTRS}
    out = {}
    m = params["means"]
    _, mq = rtn(m, qs["lo"], qs["hi"], a.means_bits)
    out["means"] = m + (mq - m).detach()
    o = torch.sigmoid(params["opacities"])
    _, oq = rtn(o, torch.tensor(0.0), torch.tensor(1.0), a.opac_bits)
    oq = o + (oq - o).detach()
    out["opacities"] = torch.logit(oq.clamp(1e-6, 1 - 1e-6))
    for t in ("f_dc", "f_rest", "scales", "quats"):
        out[t] = params[t]
    n = m.shape[0]
    for t, b in RTN.items():
        x = feat(t, params[t])
        _, xq = rtn(x, qs["rlo_" + t], qs["rhi_" + t], b)
        out[t] = unfeat(t, x + (xq - x).detach(), n)
    for g in groups:
        nm = g["name"]
        if len(g["ks"]) > 1:  # residual VQ: the sum of the stages' entries
            if qs["frozen"]:
                q = sum(params[f"cb_{nm}_{s_}"][i] for s_, i in enumerate(qs["idx"][nm]))
            else:
                x = gx(g)
                with torch.no_grad():
                    Cs = qs["C"][nm]
                    if update and (STEP[0] % a.reassign_every == 0 or nm not in qs["idx"]):
                        qs["idx"][nm] = rvq_update(x.detach(), Cs, gw(g))
                    idxs = qs["idx"][nm] if update else rvq_assign(x.detach(), Cs)
                    qv = sum(C[i] for C, i in zip(Cs, idxs))
                q = x + (qv - x).detach()
        elif qs["frozen"]:
            q = params["cb_" + nm][qs["idx"][nm]]
        else:
            x = gx(g)
            with torch.no_grad():
                C = qs["C"][nm]
                if update and (STEP[0] % a.reassign_every == 0 or nm not in qs["idx"]):
                    idx = assign(x.detach(), C)
                    lloyd(x.detach(), C, idx, gw(g))
                    qs["idx"][nm] = assign(x.detach(), C)
                idx = qs["idx"][nm] if update else assign(x.detach(), C)
            q = x + (C[idx] - x).detach()
        if grows(g) is not None:  # --sh-mask: the other Gaussians' SH rest is zero
            q = torch.zeros(n, q.shape[1]).index_copy(0, grows(g), q)
        o = 0
        for t in g["attrs"]:
            out[t] = unfeat(t, q[:, o:o + dims(t)], n); o += dims(t)
    if any(t in out for t in BANDS):  # per-band groups: f_rest [N, K1, 3] from its bands (unquantized bands as-is)
        out["f_rest"] = torch.cat([out.get(t, attr_val(t)) for t in BANDS], 1)
    for t in BANDS:
        out.pop(t, None)
    return out


def do_prune(frac):
    n_keep = int(round(frac * N0))
    imp = importance(params, train)
    keep = imp.topk(n_keep).indices.sort().values
    for k in ATTRS:
        params[k] = params[k].detach()[keep].clone().requires_grad_(True)
        opt.m[k] = opt.m[k][keep]; opt.v[k] = opt.v[k][keep]
    opt.p = params
    print(f"pruned to {n_keep}", flush=True)


def ev(step):
    ps, ss = evaluate(scene(update=False), held, hgt)
    r = {"step": step, "N": params["means"].shape[0], "psnr": ps, "ssim": ss, "s": time.time() - T0}
    log["evals"].append(r); print(r, flush=True)


ev(0)
losses = []
for step in range(a.iters):
    if step in prune_sched:
        do_prune(prune_sched[step])
    if step == a.qat_start:
        start_qat(); ev(step)
    if step == a.freeze_at:
        freeze()
    STEP[0] = step
    v = view_order(step, seed=a.seed)
    img = render(SimpleNamespace(**scene()), train[v], tile_size=TILE_PX).image
    loss = render_loss(img, tgt[v])
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if (step + 1) % 100 == 0:
        print(f"step {step+1} loss {np.mean(losses):.5f} {time.time()-T0:.0f}s", flush=True); losses = []
    if (step + 1) % a.eval_every == 0 and step + 1 < a.iters:
        ev(step + 1)
ev(a.iters)
res = {"name": a.name, "N": params["means"].shape[0], "sh": a.sh, "iters": a.iters}

# ---------- exact bitstream ----------
def pack(codes, b):
    """n codes < 2**b -> n * b bits, least significant bit first, packed into bytes."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1)
    bits = ((c[:, None] >> np.arange(b)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack(buf, n, b):
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: n * b].reshape(n, b).astype(np.int64)
    return (bits << np.arange(b)).sum(1)


def morton(codes, b):  # codes [n, 3] int64 < 2^b
    m = np.zeros(codes.shape[0], dtype=np.int64)
    for i in range(b):
        for c in range(3):
            m |= ((codes[:, c] >> i) & 1) << (3 * i + c)
    return m


def unmorton(m, b):
    codes = np.zeros((m.shape[0], 3), dtype=np.int64)
    for i in range(b):
        for c in range(3):
            codes[:, c] |= ((m >> (3 * i + c)) & 1) << i
    return codes


def rice_encode(vals):
    vals = np.asarray(vals, dtype=np.int64)
    best = min(range(0, 48), key=lambda r: int(((vals >> r) + 1 + r).sum()))
    r = best; q = vals >> r
    lens = q + 1 + r
    start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    bits = np.zeros(int(lens.sum()), dtype=np.uint8)
    ones = np.repeat(start, q) + (np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q))
    bits[ones] = 1
    for j in range(r):
        bits[start + q + 1 + j] = (vals >> j) & 1
    return r, np.packbits(bits).tobytes()


def rice_decode(buf, n, r):
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))
    out = np.zeros(n, dtype=np.int64); pos = 0
    zeros = np.flatnonzero(bits == 0)
    zi = 0
    w = (1 << np.arange(r)).astype(np.int64)
    for i in range(n):
        # next zero at or after pos
        zi = np.searchsorted(zeros, pos, side="left")
        z = zeros[zi]; q = z - pos
        rem = int((bits[z + 1:z + 1 + r].astype(np.int64) * w).sum())
        out[i] = (q << r) | rem
        pos = z + 1 + r
    return out, (pos + 7) // 8


if qs is None:
    torch.save({k: v.detach() for k, v in params.items()}, f"{OUTD}/{a.name}_fp.pt")
    ps, ss = evaluate({k: v.detach() for k, v in params.items()}, held, hgt)
    raw = sum(v.numel() for v in params.values()) * 4
    res.update(psnr=ps, ssim=ss, float32_bytes=raw, ratio_float32=PLY_BYTES / raw)
else:
    if not qs["frozen"]:
        freeze()
    with torch.no_grad():
        S = scene(update=False)
        o = torch.sigmoid(params["opacities"])
        ocode, _ = rtn(o, torch.tensor(0.0), torch.tensor(1.0), a.opac_bits)
        alive = (ocode > 0).nonzero().squeeze(1)  # code 0 = opacity 0: culled by every render; drop it
        mcode, _ = rtn(params["means"], qs["lo"], qs["hi"], a.means_bits)
        if a.means_coding == "rice":
            mort = morton(mcode[alive].long().numpy(), a.means_bits)
            order = np.argsort(mort, kind="stable")
            alive = alive[torch.from_numpy(order)]
        n = alive.numel()
        blob = bytearray()
        # a residual group's entry is [attrs, [k_1, k_2, ...]]; "m" (only with --sh-mask): SH groups coded on masked rows
        hdr = {"n": n, "sh": a.sh, "mb": a.means_bits, "ob": a.opac_bits, "mc": a.means_coding, "cb": a.cb_dtype,
               "g": [[g["attrs"], [C.shape[0] for C in qs["C"][g["name"]]] if len(g["ks"]) > 1 else qs["C"][g["name"]].shape[0]]
                     for g in groups], "r": RTN}
        if qs["rows"] is not None:
            hdr["m"] = 1
        hdr = json.dumps(hdr, separators=(",", ":")).encode()
        blob += struct.pack("<H", len(hdr)) + hdr
        blob += np.concatenate([qs["lo"].numpy(), qs["hi"].numpy()]).astype("<f4").tobytes()
        if a.means_coding == "rice":
            ms = morton(mcode[alive].long().numpy(), a.means_bits)
            r, rb = rice_encode(np.diff(ms, prepend=0))
            mbytes = struct.pack("<BI", r, len(rb)) + rb
        else:
            mbytes = pack(mcode[alive].numpy(), a.means_bits)
        blob += mbytes
        blob += pack(ocode[alive].numpy(), a.opac_bits)
        parts = {"header": len(hdr) + 2 + 24, "means": len(mbytes), "opacity": math.ceil(n * a.opac_bits / 8)}
        mk = None  # [n] bool in file order: the Gaussians whose SH rest is coded (--sh-mask)
        if qs["rows"] is not None:
            keep = torch.zeros(params["means"].shape[0], dtype=torch.bool); keep[qs["rows"]] = True
            mk = keep[alive]
            mbits = pack(mk.long().numpy(), 1)
            blob += mbits; parts["sh_mask"] = len(mbits)
        for t, b in RTN.items():
            code, _ = rtn(feat(t, params[t].detach()), qs["rlo_" + t], qs["rhi_" + t], b)
            rb = torch.cat([qs["rlo_" + t], qs["rhi_" + t]]).numpy().astype("<f4").tobytes() + pack(code[alive].long().numpy(), b)
            blob += rb; parts["rtn_" + t] = len(rb)
        idx_streams = {}  # stream name -> codes in file order (for the entropy side numbers)
        for g in groups:
            nm = g["name"]
            multi = len(g["ks"]) > 1
            Cs = [params[f"cb_{nm}_{s_}"].detach() for s_ in range(len(g["ks"]))] if multi else [params["cb_" + nm].detach()]
            idxs = qs["idx"][nm] if multi else [qs["idx"][nm]]
            parts[nm] = 0
            for s_, (C, idx) in enumerate(zip(Cs, idxs)):
                k = C.shape[0]; b = max(1, math.ceil(math.log2(k)))
                if a.cb_dtype == "f16":
                    cb = C.numpy().astype("<f2").tobytes()
                else:  # int8 per column, float32 min/max per column
                    lo, hi = C.min(0).values, C.max(0).values
                    code = torch.round((C - lo) / (hi - lo).clamp(min=1e-12) * 255)
                    cb = np.concatenate([lo.numpy(), hi.numpy()]).astype("<f4").tobytes() + code.numpy().astype(np.uint8).tobytes()
                if grows(g) is not None:  # codes exist for the masked rows only: scatter to all rows, take the kept ones
                    full = torch.full((params["means"].shape[0],), -1, dtype=torch.long).index_copy(0, grows(g), idx)
                    fidx = full[alive][mk]
                else:
                    fidx = idx[alive]
                assert (fidx >= 0).all()
                blob += cb + pack(fidx.numpy(), b)
                parts[nm] += len(cb) + math.ceil(fidx.numel() * b / 8)
                idx_streams[nm + (f"_{s_}" if multi else "")] = (fidx.numpy(), b)
        blob = bytes(blob)
    path = f"{OUTD}/{a.name}.gsq"
    open(path, "wb").write(blob)
    # ---------- decode from the file only ----------
    buf = open(path, "rb").read()
    hl = struct.unpack("<H", buf[:2])[0]; h = json.loads(buf[2:2 + hl]); off = 2 + hl
    n = h["n"]; k1 = (h["sh"] + 1) ** 2 - 1
    # D: the decoded scene, same shapes as params with N = n (the Gaussians written to the file)
    lohi = np.frombuffer(buf[off:off + 24], dtype="<f4"); off += 24
    lo, hi = torch.tensor(lohi[:3]), torch.tensor(lohi[3:])
    if h["mc"] == "rice":
        r, ln = struct.unpack("<BI", buf[off:off + 5]); off += 5
        deltas, used = rice_decode(buf[off:off + ln], n, r); assert used == ln; off += ln
        mc = torch.tensor(unmorton(np.cumsum(deltas), h["mb"])).float()
    else:
        nb = math.ceil(n * 3 * h["mb"] / 8); mc = torch.tensor(unpack(buf[off:off + nb], n * 3, h["mb"])).reshape(n, 3).float(); off += nb
    D = {"means": lo + mc / (2 ** h["mb"] - 1) * (hi - lo)}
    nb = math.ceil(n * h["ob"] / 8); oc = torch.tensor(unpack(buf[off:off + nb], n, h["ob"])).float(); off += nb
    D["opacities"] = torch.logit((oc / (2 ** h["ob"] - 1)).clamp(1e-6, 1 - 1e-6))
    D["f_rest"] = torch.zeros(n, k1, 3)
    DIM = {"f_dc": 3, "f_rest": 3 * k1, "scales": 3, "quats": 4, **{t: 3 * (e - s) for t, (s, e) in BANDS.items()}}
    dmask = None  # [n] bool: Gaussians whose SH rest is in the file (header "m"), others zero
    if h.get("m"):
        nb = math.ceil(n / 8); dmask = torch.tensor(unpack(buf[off:off + nb], n, 1)).bool(); off += nb
    for t, b in h["r"].items():
        d = DIM[t]; mm = np.frombuffer(buf[off:off + 8 * d], dtype="<f4"); off += 8 * d
        rlo, rhi = torch.tensor(mm[:d].copy()), torch.tensor(mm[d:].copy())
        nb = math.ceil(n * d * b / 8); code = torch.tensor(unpack(buf[off:off + nb], n * d, b)).reshape(n, d).float(); off += nb
        x = rlo + code / (2 ** b - 1) * (rhi - rlo)
        D[t] = x.reshape(n, k1, 3) if t == "f_rest" else x
    for attrs, ks in h["g"]:
        d = sum(DIM[t] for t in attrs)
        masked = dmask is not None and any(t in SH_ATTRS for t in attrs)
        nr = int(dmask.sum()) if masked else n  # rows coded in the file
        q = torch.zeros(nr, d)
        for k in (ks if isinstance(ks, list) else [ks]):  # residual stages add up
            if h["cb"] == "f16":
                C = torch.tensor(np.frombuffer(buf[off:off + k * d * 2], dtype="<f2").astype(np.float32)).reshape(k, d); off += k * d * 2
            else:
                mm = np.frombuffer(buf[off:off + 8 * d], dtype="<f4"); off += 8 * d
                code = torch.tensor(np.frombuffer(buf[off:off + k * d], dtype=np.uint8).astype(np.float32)).reshape(k, d); off += k * d
                clo, chi = torch.tensor(mm[:d]), torch.tensor(mm[d:])
                C = clo + code / 255 * (chi - clo)
            b = max(1, math.ceil(math.log2(k))); nb = math.ceil(nr * b / 8)
            idx = torch.tensor(unpack(buf[off:off + nb], nr, b)); off += nb
            q = q + C[idx]
        if masked:
            q = torch.zeros(n, d).index_copy(0, dmask.nonzero().squeeze(1), q)
        o2 = 0
        for t in attrs:
            dd = DIM[t]
            D[t] = q[:, o2:o2 + dd].reshape(n, -1, 3) if t in SH_ATTRS else q[:, o2:o2 + dd]; o2 += dd
    if any(t in D for t in BANDS):
        D["f_rest"] = torch.cat([D.pop(t) for t in BANDS], 1)  # [n, 15, 3]
    assert off == len(buf), (off, len(buf))
    in_stream = set(h["r"]) | {"f_rest" if t in BANDS else t for attrs, _ in h["g"] for t in attrs}
    float_attrs = [t for t in ("f_dc", "f_rest", "scales", "quats") if t not in in_stream and not (t == "f_rest" and k1 == 0)]
    for t in float_attrs:  # ablations only: left unquantized, charged at float32 below
        D[t] = params[t].detach()[alive]
    D = {k: D[k] for k in ATTRS}
    ps, ss = evaluate(D, held, hgt)
    cont = {k: params[k].detach()[alive] for k in ATTRS}
    diag = {}
    for nm, keys in [("means", ["means"]), ("opacity", ["opacities"])] + [("rtn_" + t, [t]) for t in RTN] + [(g["name"], g["attrs"]) for g in groups]:
        Dc = {**D, **{k: cont[k] for k in keys if k not in BANDS}}
        for t in keys:  # a band: only its slice of f_rest back to continuous
            if t in BANDS:
                s_, e_ = BANDS[t]; Dc["f_rest"] = Dc["f_rest"].clone(); Dc["f_rest"][:, s_:e_] = cont["f_rest"][:, s_:e_]
        diag[nm] = evaluate(Dc, held, hgt)[0] - ps
    if mk is not None:  # --sh-mask: the SH VQ alone (continuous SH rest on the kept Gaussians, zero on the others)
        diag["sh_vq_only"] = evaluate({**D, "f_rest": cont["f_rest"] * mk[:, None, None]}, held, hgt)[0] - ps
    res_diag = diag
    size = len(buf) + sum(D[t].numel() * 4 for t in float_attrs)
    res.update(N=n, psnr=ps, ssim=ss, bytes=size, ratio=PLY_BYTES / size, bits_per_gaussian=size * 8 / n,
               parts=parts, lzma_bytes=len(lzma.compress(buf, preset=9 | lzma.PRESET_EXTREME)),
               psnr_continuous=evaluate({k: params[k].detach() for k in ATTRS}, held, hgt)[0])
    res["ratio_lzma"] = PLY_BYTES / res["lzma_bytes"]
    if a.sh_mask > 0 or any(len(g["ks"]) > 1 or g["attrs"][0] in BANDS for g in groups) or a.imp_weighted:
        # side numbers (new options only, so earlier rows' JSON is unchanged): each code stream entropy-coded on its own.
        # "h0": order-0 entropy of the codes in bytes (no table charged); "lzma": lzma of the codes as little-endian uint16
        ent = {}
        for sn, (c, b) in idx_streams.items():
            cnt = np.bincount(c, minlength=2 ** b); pr = cnt[cnt > 0] / c.size
            packed = math.ceil(c.size * b / 8)
            ent[sn] = {"packed": packed, "h0": math.ceil(float(-(pr * np.log2(pr)).sum()) * c.size / 8),
                       "lzma": len(lzma.compress(c.astype("<u2").tobytes(), preset=9 | lzma.PRESET_EXTREME))}
        res["idx_entropy"] = ent
        res["bytes_if_h0_codes"] = size - sum(e["packed"] - min(e["h0"], e["packed"]) for e in ent.values())
    res["float32_attrs_charged"] = float_attrs
    res["gain_if_continuous"] = res_diag
res["drop_vs_ref"] = 37.70535659790039 - res["psnr"]
res["wall_s"] = time.time() - T0
log["result"] = res
print("RESULT", json.dumps(res), flush=True)
json.dump(log, open(f"{OUTD}/{a.name}.json", "w"), indent=1)
with open(os.path.join(a.out_dir, "results.jsonl"), "a") as f:
    f.write(json.dumps(res) + "\n")
