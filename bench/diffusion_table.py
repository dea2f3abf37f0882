"""Issue 13's evidence: FP against rtn, gptq, vq, pq and pq + EM on the reference diffusion models.

Each configuration loads the reference model fresh (``fmnist-dit`` or ``fmnist-unet``), compresses
it through the front door (``compresskit.compress`` with the family's adapter: the blocks'
attention / MLP / AdaLN / conv weights; embedders, ``conv_in`` / ``conv_out`` and the final layer
dense, as the adapters document), samples ``--n-samples`` images with ``--steps`` respaced DDPM
steps and CFG 1.5 (the same seeds and balanced labels for every row) and scores them
(``fid``, ``is``, ``fid_effnet``; see docs/diffusion.md). One JSON line per configuration.

    python bench/diffusion_table.py --model fmnist-dit --out docs/diffusion_fmnist_dit.jsonl
    python bench/diffusion_table.py --table docs/diffusion_fmnist_dit.jsonl docs/diffusion_fmnist_unet.jsonl

What each method row gets (``--methods``, default all):

* ``rtn``, ``vq``, ``pq``: from the weights alone (k-means / rounding, no data);
* ``gptq``: GPTQ needs the layers' input statistics: the block walk of ``--preset fast``
  (``--calib-samples`` noised training images, :meth:`DiffusionAdapter.calibration_batches`);
* ``pq+em``: DPQ's calibration: the ``fast`` block walk (activation-aware E-step, layer-wise
  centroid rounds) and then ``--em-rounds`` whole-model EM rounds whose M-step trains the codebooks
  with the DDPM loss (``m_objective="task"``) on ``--m-samples`` timestep-sampled images with class
  dropout 0.1, dead centroids re-initialised, and an E-step after it;
* ``pq+fast``, ``pq+best``, ``pq+zero-data`` (and the same for ``vq``): that method with that preset as the family runs it
  (``adapter.calibration_preset(name)``, the ``--em-*`` / ``--m-*`` / ``--calib-samples`` flags
  ignored), so the preset itself is what is measured.

``--params '{"pool": false}'`` passes quantizer parameters to every row's method.

``seconds_compress`` is the wall time of ``compress`` (calibration included); ``seconds_eval`` the
sampling and scoring. Figures are from whatever machine runs it: report medians of repeated runs
where they matter.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

METHODS = ("rtn", "gptq", "vq", "pq", "pq+em", "pq+fast", "pq+best")
PRESET_ROWS = tuple(f"{m}+{p}" for m in ("pq", "vq") for p in ("fast", "best", "zero-data"))  # a codebook method with a named preset, as the family runs it


def calibration_for(method: str, args: argparse.Namespace, adapter):
    """The :class:`CalibrationConfig` of ``method``'s row (``None``: from the weights alone), with
    ``--calib-set`` on top, as the CLI's ``--calib-set`` puts settings on top of a preset."""
    config = _base_calibration(method, args, adapter)
    if args.calib_set:
        if config is None:
            sys.exit(f"error: --calib-set would do nothing for {method} (no calibration)")
        config = config.with_settings(args.calib_set)
    return config


def _base_calibration(method: str, args: argparse.Namespace, adapter):
    from compresskit import CalibrationConfig

    if method in PRESET_ROWS:
        return adapter.calibration_preset(method.split("+", 1)[1])
    if method == "gptq":
        return CalibrationConfig.preset("fast", n_samples=args.calib_samples)
    if method == "pq+em":
        return CalibrationConfig.preset(
            "fast", n_samples=args.calib_samples, m_objective=args.m_objective, em_rounds=args.em_rounds, m_steps=args.m_steps,
            m_samples=args.m_samples, m_batch=args.m_batch, lr=args.lr, m_dense=args.m_dense,
        )
    return None


def run_one(model: str, method: str, bits: int | None, args: argparse.Namespace) -> list[dict]:
    """Compress ``model`` once with ``method`` at ``bits`` and evaluate it with each of ``--eval-seeds``: one row per seed."""
    from compresskit import CompressConfig, compress
    from compresskit.adapters import adapter_for

    adapter = adapter_for(model)()
    loaded = adapter.load(model)
    row: dict = {"model": model, "method": method, "bits": bits, "n_samples": args.n_samples, "steps": args.steps, "params": args.params}
    if args.calib_set and method != "fp":
        row["calib_set"] = args.calib_set
    t0 = time.perf_counter()
    if method == "fp":
        n = sum(p.numel() for p in loaded.model.parameters())
        row.update(size_mb=n * 2 / 1e6, bits_per_weight_all_in=16.0, bits_per_weight_layers=16.0, calibration={})
    else:
        calibration = calibration_for(method, args, adapter)
        base = method.split("+")[0]
        report = compress(loaded, CompressConfig(method=base, bits=bits, params=args.params), adapter=adapter, calibration=calibration)
        d = report.to_dict()
        if args.save_dir is not None:  # the compressed model, for `compresskit sample --compare` grids
            from compresskit import io

            out = args.save_dir / f"{Path(model).name.removesuffix('.safetensors')}-{method.replace('+', '')}{bits}"
            io.save(loaded.model, report, out, source={"model": model, "adapter": adapter.name}, overwrite=True,
                    save_architecture=lambda d: adapter.save_architecture(loaded, d))
            row["saved"] = str(out)
        row.update(
            size_mb=d["compressed_bytes"] / 1e6, fp16_mb=d["original_fp16_bytes"] / 1e6, ratio=d["ratio"],
            bits_per_weight_all_in=d["bits_per_weight_all_in"], bits_per_weight_layers=d["bits_per_weight_compressed_layers"],
            n_layers=d["n_layers_compressed"], calibration=d["calibration"],
        )
    row["seconds_compress"] = time.perf_counter() - t0
    rows = []
    for seed in args.eval_seeds:
        options = {"n_samples": args.n_samples, "steps": args.steps, "effnet": not args.no_effnet, "vs_source": args.vs_source}
        spec = adapter.eval_spec(seed=seed, options=options)
        t1 = time.perf_counter()
        rows.append({**row, "eval_seed": seed, **adapter.evaluate(loaded, spec), "seconds_eval": time.perf_counter() - t1})
    return rows


def label(row: dict) -> str:
    """The row's method and ``--params``, ``--calib-set`` and a non-default ``e_init``, with the M-step's objective, steps,
    images and lr where there is one (they vary between rows)."""
    calibration = row.get("calibration") or {}
    name = row["method"] + "".join(f" {k}={v}" for k, v in (row.get("params") or {}).items())
    name += "".join(f" {k}={v}" for k, v in (row.get("calib_set") or {}).items() if k != "m_steps" or not calibration.get("m_objective"))
    if calibration.get("e_init", "nearest") != "nearest" and "e_init" not in (row.get("calib_set") or {}):
        name += f" e_init={calibration['e_init']}"  # a preset's start (the diffusion presets' since 3725a20): rows before it started from nearest codes
    if row["method"] in ("pq+em", *PRESET_ROWS) and calibration.get("m_objective"):
        dense = f", also {calibration['m_dense']}" if calibration.get("m_dense") else ""
        return f"{name} ({calibration['m_objective']}, {calibration['m_steps']} steps, {calibration['m_samples']} images, lr {calibration['lr']:g}{dense})"
    return name


def reference_key(row: dict) -> tuple:
    """What an FP row must share with a row to be its reference: model, sampling seed, samples, steps."""
    return row["model"], row.get("eval_seed", 0), row["n_samples"], row["steps"]


def read_rows(paths: list[str]) -> list[dict]:
    """The JSON lines of ``paths`` in order, a row repeated in several files (a reference row) kept once."""
    seen = {}
    for p in paths:
        for line in open(p, encoding="utf-8"):
            if line.strip():
                seen.setdefault(line.strip(), json.loads(line))
    return list(seen.values())


def table(paths: list[str]) -> None:
    """A markdown table of the rows in ``paths``. The ``x FP`` reference of a row is the FP row of the
    same model, sampling seed (``eval_seed``, 0 in rows from before it was recorded), sample count and steps."""
    rows = read_rows(paths)
    fp = {reference_key(r): r for r in rows if r["method"] == "fp"}
    print("| model | method | bits | seed | bits/weight (layers) | size MB | fid | x FP | fid_effnet | x FP | is | compress s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = fp.get(reference_key(r), {})
        ratio = lambda k: f"{r[k] / ref[k]:.2f}" if ref.get(k) and r.get(k) is not None else "-"  # noqa: E731
        effnet = f"{r['fid_effnet']:.2f}" if "fid_effnet" in r else "-"
        print(
            f"| {r['model']} | {label(r)} | {r['bits'] or '-'} | {r.get('eval_seed', 0)} | {r['bits_per_weight_layers']:.3f} | {r['size_mb']:.3f} | "
            f"{r['fid']:.2f} | {ratio('fid')} | {effnet} | {ratio('fid_effnet')} | {r['is']:.2f} | {r['seconds_compress']:.0f} | {r['seconds_eval']:.0f} |"
        )


def summary(paths: list[str]) -> None:
    """Per model, row label and bits: the median ``x FP`` over the sampling seeds measured (each
    against the FP row of its own seed), the range, and how many seeds."""
    import statistics

    rows = read_rows(paths)
    fp = {reference_key(r): r for r in rows if r["method"] == "fp"}
    groups: dict[tuple, dict[str, list[float]]] = {}
    source_keys = ("fid_source", "fid_effnet_source")
    for r in rows:
        ref = fp.get(reference_key(r))
        if ref is None:
            continue
        g = groups.setdefault((r["model"], label(r), r["bits"], f"{r['bits_per_weight_layers']:.3f}"), {"fid": [], "fid_effnet": [], **{k: [] for k in source_keys}})
        for k in ("fid", "fid_effnet"):
            if r.get(k) is not None and ref.get(k) and r["method"] != "fp":
                g[k].append(r[k] / ref[k])
        for k in source_keys:  # raw distances: the FP row's own is the sampling floor
            if r.get(k) is not None:
                g[k].append(r[k])
    cell = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else (f"{v[0]:.2f}" if v else "-")  # noqa: E731
    with_source = any(g[k] for g in groups.values() for k in source_keys)
    print("| model | method | bits | bits/weight (layers) | seeds | fid x FP, median (range) | fid_effnet x FP, median (range) |"
          + (" fid_source | fid_effnet_source |" if with_source else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if with_source else ""))
    for (model, name, bits, bpw), g in groups.items():
        if not any(g.values()):
            continue  # an FP row without fid_source: nothing to say
        seeds = max(len(g["fid"]), len(g["fid_source"]))
        print(f"| {model} | {name} | {bits or '-'} | {bpw} | {seeds} | {cell(g['fid'])} | {cell(g['fid_effnet'])} |"
              + (f" {cell(g['fid_source'])} | {cell(g['fid_effnet_source'])} |" if with_source else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit", help="fmnist-dit | fmnist-unet (or any model the diffusion adapters evaluate)")
    p.add_argument("--methods", default="fp," + ",".join(METHODS), help="comma-separated: fp and any of " + ", ".join(METHODS))
    p.add_argument("--bits", default="4,2,1")
    p.add_argument("--n-samples", type=int, default=500, help="generated images per row, scored against as many test images")
    p.add_argument("--steps", type=int, default=50, help="respaced DDPM sampling steps")
    p.add_argument("--params", type=json.loads, default={}, help="quantizer parameters for every row's method, as JSON")
    p.add_argument("--eval-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                   help="comma-separated sampling seeds; each compressed model is evaluated once per seed (rows carry eval_seed)")
    p.add_argument("--vs-source", action="store_true", help="also fid_source / fid_effnet_source: the distances to the FP model's "
                   "images (other seeds; the fp row's own is the sampling floor). Sampling takes twice as long")
    p.add_argument("--no-effnet", action="store_true", help="skip fid_effnet (EfficientNet-Lite0 at 224 px is the slow part)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--em-rounds", type=int, default=1)
    p.add_argument("--m-steps", type=int, default=100)
    p.add_argument("--m-samples", type=int, default=256)
    p.add_argument("--m-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--m-dense", default="", help="pq+em: uncompressed parameters the M-step trains too, as name patterns (e.g. '*.bias')")
    p.add_argument("--m-objective", choices=("task", "distill"), default="task",
                   help="pq+em's M-step loss: task (the DDPM loss against the true noise) or distill (against the uncompressed model's epsilon)")
    p.add_argument("--calib-set", type=json.loads, default={},
                   help="calibration settings on top of every calibrated row's, as JSON (e.g. '{\"m_steps\": 1200}'); rows carry calib_set")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save-dir", type=Path, help="also save each compressed model under this directory (<model>-<method><bits>)")
    p.add_argument("--out", type=Path, help="append one JSON line per configuration here")
    p.add_argument("--table", nargs="+", help="print the markdown table of these JSON-lines files and exit")
    p.add_argument("--summary", nargs="+", help="print the median x FP over sampling seeds of these JSON-lines files and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        return table(args.table)
    if args.summary:
        return summary(args.summary)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - {"fp", *METHODS, *PRESET_ROWS})
    if unknown:
        sys.exit(f"error: unknown method(s) {', '.join(unknown)}; choose from fp, {', '.join(sorted(set(METHODS) | set(PRESET_ROWS)))}")
    for method in methods:
        for bits in [None] if method == "fp" else [int(b) for b in args.bits.split(",")]:
            for row in run_one(args.model, method, bits, args):
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
