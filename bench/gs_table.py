"""Issue 14's evidence: rtn, vq, pq and pq + EM on a 3DGS scene (default: the reference scene).

Each row loads the scene fresh, compresses it through the front door (``compresskit.compress`` with
the ``gaussians`` adapter: SH, DC colour, scale and rotation with the row's method; opacity scalar
8-bit and positions scalar 16-bit unless the row says otherwise), saves it with ``compresskit.save``
(so the file ratio is of real bytes), reads the directory back and evaluates it on the held-out
cameras (``GaussianSplatAdapter.evaluate``: PSNR / SSIM against the uncompressed renders, PSNR
against the ground truth and its drop, the ratios). One JSON line per row.

    PYTHONPATH=. python bench/gs_table.py --out docs/gs_ref_scene.jsonl
    PYTHONPATH=. python bench/gs_table.py --table docs/gs_ref_scene.jsonl

Rows (``--rows``, default all): ``NAME`` is ``METHOD:BITS`` (every attribute the method handles at
that rate, the family's opacity / position methods), with suffixes:

* ``+em``: then one EM round whose M-step trains the codebooks with 3DGS's render loss
  (``0.8 L1 + 0.2 D-SSIM``) on ``--calib-views`` calibration cameras, dead centroids re-initialised;
* ``+st``: ``+em`` whose M-step starts with ``--latent-steps`` steps of quantization in the loop
  (``latent_steps``: float latents under straight-through estimates at 3DGS's per-attribute rates,
  codes re-assigned and centroids Lloyd-updated every ``--reassign-every`` steps; docs/calibration.md);
* ``+lean``: positions at 12 bits per coordinate and opacity at 6 bits (``--override``);
* ``+compact``: ``+lean`` and one 256-entry codebook per attribute over its whole vector (SH
  ``d = 45``, colour and scale ``d = 3``, rotation ``d = 4``; no pool), the compact end;
* ``+t8``: with ``+compact``, the codebooks stored as 8-bit levels (``table_bits=8``) instead of float16;
* ``+mo``: with ``+lean`` or ``+compact``, positions with the ``morton`` quantizer at 12 bits and the
  Gaussians in Morton order (``--option order=morton``): the same grid, coded as Rice-coded key gaps;
* ``+sh512``: with ``+compact``, a 512-entry SH-rest codebook instead of 256;
* ``+geo``: with ``+compact``, finer geometry, as the issue-14 study's best layout had it: scales as
  three 64-level scalar codebooks (``pq`` with ``d = 1``, ``k = 64``: 18 bits per Gaussian) and
  rotations with a 1024-entry codebook;
* ``+prune``: first the family's preparation step (``CompressConfig(prepare=...)``, CLI ``--option
  prune=F``): drop ``--prune`` of the Gaussians by importance and fine-tune the rest ``--prune-steps``
  steps against the unpruned scene's renders (``docs/gaussians.md``). The file ratio and the drop are
  still against the unpruned ``.ply``.

``rtn:B`` is scalar quantization of every attribute at B bits (per Gaussian row for the vector
attributes). ``seconds_compress`` is the wall time of ``compress``; ``seconds_eval`` the renders.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = ("rtn:8", "rtn:4", "vq:2", "vq:1", "pq:2", "pq:1", "pq:2+em", "pq:1+em", "pq:1+lean", "pq:1+em+lean", "pq:1+compact", "pq:1+em+compact",
        "rtn:8+prune", "pq:1+prune+compact", "pq:1+em+prune+compact")
LEAN = (("gaussians.means", {"method": "rtn", "bits": 12}), ("gaussians.opacities", {"method": "rtn", "bits": 6}))
# one 256-entry codebook per attribute over its whole vector (Compact3D's layout at this scene's size:
# a 4096-entry table of 45-d SH vectors would cost more than 15k Gaussians' codes), no pool
WHOLE = {"method": "pq", "bits": 1, "k": 256, "pool": False, "share": 1}
COMPACT = LEAN + (
    ("gaussians.f_rest", {**WHOLE, "d": 45}), ("gaussians.f_dc", {**WHOLE, "d": 3}),
    ("gaussians.scales", {**WHOLE, "d": 3}), ("gaussians.quats", {**WHOLE, "d": 4}),
)


def config_for(row: str, prepare: dict | None = None):
    """``(CompressConfig, calibration)`` of a row name (see the module docstring): ``calibration`` is
    ``"em"``, ``"st"`` or None; ``prepare`` are the preparation options a ``+prune`` row uses."""
    from compresskit import CompressConfig

    spec, *flags = row.split("+")
    method, _, bits = spec.partition(":")
    unknown = set(flags) - {"em", "st", "lean", "compact", "prune", "t8", "mo", "sh512", "geo"}
    if (unknown or not bits.isdigit() or {"t8", "sh512", "geo"} & set(flags) and "compact" not in flags
            or "mo" in flags and not {"lean", "compact"} & set(flags)):
        raise SystemExit(f"row {row!r}: write METHOD:BITS[+em|+st][+prune][+lean[+mo]|+compact[+t8][+mo][+sh512][+geo]]")
    overrides = COMPACT if "compact" in flags else LEAN if "lean" in flags else ()
    if "t8" in flags:  # 8-bit centroid tables (table_bits=8) for the codebook attributes
        overrides = tuple((p, {**o, "table_bits": 8} if o["method"] == "pq" else o) for p, o in overrides)
    if "sh512" in flags:
        overrides = tuple((p, {**o, "k": 512} if p == "gaussians.f_rest" else o) for p, o in overrides)
    if "geo" in flags:
        finer = {"gaussians.scales": {"d": 1, "k": 64}, "gaussians.quats": {"k": 1024}}
        overrides = tuple((p, {**o, **finer.get(p, {})}) for p, o in overrides)
    if "mo" in flags:
        overrides = tuple((p, {"method": "morton", "bits": 12} if p == "gaussians.means" else o) for p, o in overrides)
    prepare = dict(prepare or {}) if "prune" in flags else {}
    if "mo" in flags:
        prepare["order"] = "morton"
    calibration = "st" if "st" in flags else "em" if "em" in flags else None
    return CompressConfig(method=method, bits=int(bits), overrides=overrides, prepare=prepare), calibration


def run_one(scene: str, row: str, args: argparse.Namespace) -> dict:
    from compresskit import CalibrationConfig, compress, save
    from compresskit.adapters.gaussians.adapter import GaussianSplatAdapter
    from compresskit.io import load_compressed

    adapter = GaussianSplatAdapter()
    loaded = adapter.load(scene)
    truth = {"prune_target": "ground-truth"} if args.target == "ground-truth" else {}
    prepare = {"prune": args.prune, **({"prune_steps": args.prune_steps} if args.prune_steps is not None else {}), **truth}
    config, mode = config_for(row, prepare)
    calibration = None
    if mode:
        calibration = CalibrationConfig(
            n_samples=args.calib_views, batch_size=1, m_objective="task", em_rounds=1, m_steps=args.m_steps,
            m_batch=args.m_batch, lr=args.lr, options={"calib_size": args.calib_size, "calib_target": args.target},
            **({"latent_steps": args.latent_steps, "reassign_every": args.reassign_every} if mode == "st" else {}),
        )
    start = time.perf_counter()
    report = compress(loaded, config, adapter=adapter, calibration=calibration)
    seconds_compress = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scene"
        save(loaded.model, report, out, source={"model": loaded.source, "resolved": loaded.resolved, "adapter": adapter.name},
             save_architecture=lambda d: adapter.save_architecture(loaded, d))
        reloaded, _ = load_compressed(out)
        start = time.perf_counter()
        metrics = adapter.evaluate(reloaded, adapter.eval_spec(options={"eval_size": args.eval_size}))
        seconds_eval = time.perf_counter() - start
    layers = {layer.name.removeprefix("gaussians."): {"method": layer.method, "bits_per_value": layer.size.bits_per_weight, "rel_error": layer.rel_error,
                                                      **({"extra": layer.extra} if layer.extra else {})}
              for layer in report.layers}
    return {"scene": scene, "row": row, **metrics, "layers": layers, "calibration": report.calibration, "preparation": report.preparation,
            "seconds_compress": seconds_compress, "seconds_eval": seconds_eval, "threads": args.threads}


def table(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    print("| row | EM steps x views | ratio (file) | bits / Gaussian | PSNR vs FP renders | SSIM | PSNR vs GT | drop dB | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.get("calibration") or {}
        em = f"{c['m_steps']} x {c['m_batch']}" if c.get("m_objective") else "-"
        if c.get("latent_steps"):
            em = f"{c['latent_steps']} in the loop + {em}"
        if c.get("m_objective") and c.get("lr") != 1e-3:
            em += f", lr {c['lr']:g}"
        p = r.get("preparation") or {}
        label = r["row"] + (f" ({p['fraction']:.0%} pruned, {p['steps']} steps)" if p else "")
        if (c.get("options") or {}).get("calib_target") == "ground-truth":
            label += ", trained on ground truth"
        gt = f"{r['psnr_gt']:.2f}" if "psnr_gt" in r else "-"
        drop = f"{r['psnr_drop_db']:.2f}" if "psnr_drop_db" in r else "-"
        print(f"| {label} | {em} | {r['compression_ratio']:.1f}x | {r['bits_per_gaussian']:.1f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {gt} | {drop} | {r['seconds_compress']:.0f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scene", default="ref-scene", help="a .ply, or ref-scene")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (see the docstring)")
    p.add_argument("--eval-size", type=int, default=96, help="longest side of the evaluation renders, pixels")
    p.add_argument("--calib-size", type=int, default=96, help="longest side of the calibration renders, pixels")
    p.add_argument("--calib-views", type=int, default=32)
    p.add_argument("--m-steps", type=int, default=200)
    p.add_argument("--m-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-steps", type=int, default=600, help="+st rows: steps of quantization in the loop before the codebook M-step")
    p.add_argument("--reassign-every", type=int, default=10, help="+st rows: codes follow the latents every this many steps")
    p.add_argument("--prune", type=float, default=0.5, help="+prune rows: fraction of the Gaussians dropped")
    p.add_argument("--prune-steps", type=int, default=None, help="+prune rows: fine-tuning steps (default: the family's, 2000)")
    p.add_argument("--target", choices=("renders", "ground-truth"), default="renders",
                   help="what pruning's fine-tuning and calibration train towards (the options prune_target and calib_target)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="append JSON lines here")
    p.add_argument("--table", nargs="+", help="print the markdown table of these JSON-lines files and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        return table(args.table)
    torch.set_num_threads(args.threads)
    for row in args.rows.split(","):
        result = run_one(args.scene, row, args)
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return None


if __name__ == "__main__":
    sys.exit(main())
