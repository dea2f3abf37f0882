"""Peak memory and time per block of a streamed compression (issue 15): is memory bounded by one block?

Runs :func:`compresskit.stream.compress_streaming` on a checkpoint (by default the LLaMA-2-7B-shaped
one ``bench/make_7b_shaped.py`` writes) while a thread samples this process's resident memory
(``VmRSS``) every 20 ms. Prints, per block, its seconds and the peak RSS while it ran, then the
run's peak (also ``ru_maxrss``), the size of one float32 block, the model's float32 size and the
target bound ``one float32 block + 4 GiB``.

``--trace`` also names where the memory goes: the walk's steps (statistics passes, the
asymmetric target, k-means, E-step, layer-wise rounds, writes) are wrapped, and for each the
peak RSS while it ran (innermost step) and the RSS when it began are printed, largest first.

``--max-blocks K`` stops after K blocks (resumably: a later run with ``--resume`` goes on), so a
7B model can be measured over part of its depth in a session; the per-block peaks show whether
memory grows with depth.

    python bench/make_7b_shaped.py --out /tmp/llama2-7b-shaped
    python bench/stream_7b.py --model /tmp/llama2-7b-shaped --method pq --bits 2 --max-blocks 4
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Samples RSS every ``period`` seconds; ``take()`` returns the peak since the last take."""

    def __init__(self, period: float = 0.02):
        super().__init__(daemon=True)
        self.period, self.peak, self.overall, self.running = period, 0, 0, True
        self.trace: Trace | None = None

    def run(self) -> None:
        while self.running:
            now = rss_bytes()
            if self.trace is not None:
                self.trace.charge(now)
            self.peak, self.overall = max(self.peak, now), max(self.overall, now)
            time.sleep(self.period)

    def take(self) -> int:
        peak, self.peak = max(self.peak, rss_bytes()), 0
        return peak


class Trace:
    """Peak RSS per step of the walk: ``wrap(owner, attr)`` replaces a function with one that pushes
    its label while it runs; the sampler thread charges each sample to the innermost label."""

    def __init__(self):
        self.stack: list[str] = []
        self.peaks: dict[str, int] = {}
        self.entry: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, attr: str, label: str | None = None) -> None:
        import functools

        fn = getattr(owner, attr)
        label = label or attr

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            path = "/".join([*self.stack[-1:], label])
            self.entry[path] = max(self.entry.get(path, 0), rss_bytes())
            self.calls[path] = self.calls.get(path, 0) + 1
            self.stack.append(path)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()

        setattr(owner, attr, traced)

    def charge(self, rss: int) -> None:
        stack = self.stack
        label = stack[-1] if stack else "(outside)"
        if rss > self.peaks.get(label, 0):
            self.peaks[label] = rss

    def rows(self) -> list[dict]:
        return sorted(
            ({"step": k, "calls": self.calls.get(k, 0), "entry_gib": round(self.entry.get(k, 0) / GIB, 3), "peak_gib": round(v / GIB, 3)}
             for k, v in self.peaks.items()),
            key=lambda r: -r["peak_gib"],
        )


def install_trace() -> Trace:
    """Wrap the steps a streamed walk takes (module attributes, looked up when called)."""
    from compresskit.calib import codebook, estep, walk
    from compresskit.registry import available_quantizers
    from compresskit.stream import driver

    trace = Trace()
    for name in ("_statistics", "_outputs", "_stages", "_record_error"):
        trace.wrap(walk.Walk, name)
    trace.wrap(walk, "asymmetric_target")
    trace.wrap(walk, "fit_layer")
    trace.wrap(walk.copy, "deepcopy")
    trace.wrap(estep, "e_step")
    for name in ("update_codebooks", "update_row_scales", "_e_step"):
        trace.wrap(codebook, name)
    trace.wrap(codebook, "refine_layer")  # fit_layer imports it from there when it runs
    for name in ("materialise", "write_tensors", "save_carry", "model_state"):
        trace.wrap(driver, name)
    from compresskit.quantizers import pq

    trace.wrap(pq, "kmeans")
    for cls in available_quantizers().values():
        for name in ("fit", "_fit"):
            if name in vars(cls):
                trace.wrap(cls, name, f"{cls.__name__}.{name}")
    return trace


def block_bytes(model_dir: Path) -> tuple[int, int, int]:
    """``(float32 bytes of the largest block, float32 bytes of the model, blocks)`` from the config."""
    import transformers

    from compresskit.stream import empty_parameters

    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with empty_parameters():
        model = transformers.AutoModelForCausalLM.from_config(config)
    blocks = model.model.layers
    per_block = max(sum(p.numel() for p in b.parameters()) for b in blocks) * 4
    return per_block, sum(p.numel() for p in model.parameters()) * 4, len(blocks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/llama2-7b-shaped")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one, removed)")
    p.add_argument("--method", default="pq")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--preset", default="fast", help="calibration preset, or none")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per block call (the walk's activations scale with it)")
    p.add_argument("--offload-dir", default=None, help="keep the calibration activations on disk here")
    p.add_argument("--max-blocks", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trace", action="store_true", help="peak RSS per step of the walk (see above)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from compresskit import CalibrationConfig, CompressConfig
    from compresskit.adapters.lm.adapter import CausalLMAdapter
    from compresskit.stream import compress_streaming

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    per_block, whole, n_blocks = block_bytes(model_dir)
    out = Path(args.out) if args.out else Path(f"/tmp/stream-bench-{args.method}{args.bits}")
    calibration = None
    if args.preset != "none":
        settings = {"n_samples": args.calib_samples, "batch_size": args.batch_size, "options": {"seq_len": args.seq_len}}
        if args.offload_dir:
            settings["offload_dir"] = args.offload_dir
        calibration = CalibrationConfig.preset(args.preset).with_settings(settings)
    sampler = Sampler()
    sampler.trace = install_trace() if args.trace else None
    baseline = rss_bytes()
    sampler.start()
    rows: list[dict] = []

    def on_block(i: int, name: str, seconds: float) -> None:
        rows.append({"block": i, "seconds": round(seconds, 2), "peak_rss_gib": round(sampler.take() / GIB, 3)})
        if not args.json:
            print(f"block {i:3d}  {seconds:8.1f} s  peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB", flush=True)

    start = time.perf_counter()
    result = compress_streaming(
        str(model_dir), out, CompressConfig(method=args.method, bits=args.bits), adapter=CausalLMAdapter(),
        calibration=calibration, resume=args.resume, overwrite=not args.resume, on_block=on_block, max_blocks=args.max_blocks,
    )
    seconds = time.perf_counter() - start
    sampler.running = False
    peak = max(sampler.overall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    bound = per_block + 4 * GIB
    times = sorted(r["seconds"] for r in rows)
    summary = {
        "model": str(model_dir), "method": f"{args.method}:{args.bits}", "preset": args.preset, "threads": args.threads,
        "calib": None if calibration is None else {"samples": args.calib_samples, "batch_size": args.batch_size, "seq_len": args.seq_len, "offload": bool(args.offload_dir)},
        "blocks_run": len(rows), "blocks_total": n_blocks, "finished": result.finished, "resumed_from": result.resumed_from,
        "seconds": round(seconds, 1), "median_block_seconds": times[len(times) // 2] if times else math.nan,
        "rss_before_gib": round(baseline / GIB, 3), "peak_rss_gib": round(peak / GIB, 3),
        "fp32_block_bytes": per_block, "fp32_block_gib": round(per_block / GIB, 3), "fp32_model_gib": round(whole / GIB, 3),
        "bound_gib": round(bound / GIB, 3), "within_bound": peak <= bound, "blocks": rows,
    }
    if sampler.trace is not None:
        summary["trace"] = sampler.trace.rows()
        if not args.json:
            print(f"{'step':70s} {'calls':>5s} {'RSS in':>7s} {'peak':>7s}  (GiB)")
            for r in summary["trace"]:
                print(f"{r['step']:70s} {r['calls']:5d} {r['entry_gib']:7.2f} {r['peak_gib']:7.2f}")
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("blocks", "trace")}, indent=1))
    if not args.out and result.finished:
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(0 if summary["within_bound"] else 1)


if __name__ == "__main__":
    main()
