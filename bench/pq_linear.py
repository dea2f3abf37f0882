"""Batch-1 speed of the LUT forward (compresskit.nn.lut) against dense float32 F.linear, on the CPU.

Layers: 4096 -> 11008 and 11008 -> 4096 (LLaMA-7B's MLP shapes) at 2 bits, pooled PQ (DPQ's pool),
plain PQ and VQ, each fitted on a random weight with few k-means iterations: the codes' values do not
change the work the kernel does, only the time to fit. For each thread count (torch and numba set
together) the dense anchor ``F.linear(x, W_hat)`` (float32, W_hat the same layer rebuilt) and the LUT
forward (``layer(x)`` with ``enable_lut``, float32 and bfloat16 input) are timed in the same run:
medians over ``--repeats`` rounds, the callables timed interleaved in each round, after warm-up calls (the first compiles the numba kernels).
``--crossover`` also times 1..N rows against the dense matmul on its cached weight (where the
default threshold comes from). ``--lm`` times SmolLM2-135M greedy generation, FP against PQ 2-bit
with the LUT on.

    python bench/pq_linear.py --threads 1 2 --json out.json
    python bench/pq_linear.py --lm --lm-dir /tmp/smollm2-pq2 --threads 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import torch
import torch.nn.functional as F
from torch import nn

from compresskit.nn import enable_lut, quantize_tensor
from compresskit.quantizers import PQ, VQ

SHAPES = [(4096, 11008), (11008, 4096)]  # (in_features, out_features)
METHODS = {  # few iterations: the fitted values do not change the kernel's work
    "pq-pooled": lambda: PQ(bits=2, n_iter=1, init="random", pool_iters=0),
    "pq-plain": lambda: PQ(bits=2, pool=False, n_iter=1, init="random"),
    "vq": lambda: VQ(bits=2, n_iter=1, init="random"),
}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    numba.set_num_threads(n)


def medians_ms(fns: dict, repeats: int, warmup: int = 5) -> dict:
    """Median milliseconds of each callable, timed interleaved (one call of each per round), so that
    all of them see the same share of a noisy machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def compressed_layer(n_in: int, n_out: int, method: str) -> tuple[nn.Linear, torch.Tensor, float]:
    """A bias-free Linear whose weight is the fitted quantizer; returns it, W_hat and the fit seconds."""
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=False)
    start = time.perf_counter()
    q = METHODS[method]().fit(layer.weight.detach())
    seconds = time.perf_counter() - start
    quantize_tensor(layer, "weight", q)
    return layer, q.inverse_transform().contiguous(), seconds


def bench_layers(args) -> list[dict]:
    rows = []
    for n_in, n_out in SHAPES:
        for method in args.methods:
            layer, w_hat, fit_s = compressed_layer(n_in, n_out, method)
            report = enable_lut(layer, threshold=max(args.crossover, 1))
            assert report.switched == [""], report
            for threads in args.threads:
                set_threads(threads)
                x = torch.randn(1, n_in)
                xb = x.to(torch.bfloat16)
                fns = {"dense_fp32_ms": lambda: F.linear(x, w_hat), "lut_float32_ms": lambda: layer(x), "lut_bfloat16_ms": lambda: layer(xb)}
                for tokens in range(2, args.crossover + 1):
                    xt = torch.randn(tokens, n_in)
                    fns[f"dense_fp32_ms_{tokens}rows"] = lambda xt=xt: F.linear(xt, w_hat)
                    fns[f"lut_fp32_ms_{tokens}rows"] = lambda xt=xt: layer(xt)
                row = {"shape": f"{n_in}->{n_out}", "method": method, "threads": threads, "fit_s": round(fit_s, 1),
                       "load_avg_1min": round(os.getloadavg()[0], 2)}
                with torch.no_grad():
                    row.update({name: round(ms, 3) for name, ms in medians_ms(fns, args.repeats).items()})
                row["ratio_float32"] = round(row["dense_fp32_ms"] / row["lut_float32_ms"], 2)
                row["ratio_bfloat16"] = round(row["dense_fp32_ms"] / row["lut_bfloat16_ms"], 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def bench_lm(args) -> list[dict]:
    """SmolLM2-135M greedy generation, batch 1, KV cache: FP against PQ 2-bit with the LUT on."""
    from compresskit.adapters import get_adapter
    from compresskit.io import load_compressed

    out_dir = Path(args.lm_dir)
    if not (out_dir / "manifest.json").exists():
        cmd = ["compresskit", "quantize", "--model", "smollm2-135m", "--method", "pq", "--bits", "2",
               "--preset", "none", "--no-eval", "--out", str(out_dir)]
        print("compressing:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    fp = get_adapter("lm")().load(None)
    tok = fp.extras["tokenizer"]
    comp, _ = load_compressed(out_dir)
    report = enable_lut(comp.model, threshold=args.lm_threshold)
    print(f"LUT on {len(report.switched)} layers, left alone: {len(report.left_alone)}", flush=True)
    prompt = tok("The history of the printing press", return_tensors="pt")
    rows = []
    for threads in args.threads:
        set_threads(threads)
        row = {"model": "smollm2-135m", "threads": threads, "new_tokens": args.new_tokens,
               "prompt_tokens": int(prompt["input_ids"].shape[1]), "load_avg_1min": round(os.getloadavg()[0], 2)}
        generators = {}
        for name, model in (("fp32", fp.model), ("pq2_lut", comp.model)):
            def generate(model=model):
                with torch.no_grad():
                    return model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          do_sample=False, use_cache=True, pad_token_id=tok.eos_token_id)
            generators[name] = generate
        # warm-up (compiles the kernels, builds the LUT plans and, for the prompt, the dense cache), interleaved rounds
        for name, ms in medians_ms(generators, args.lm_repeats, warmup=1).items():
            row[f"{name}_tokens_per_s"] = round(args.new_tokens / (ms / 1e3), 1)
        row["ratio"] = round(row["pq2_lut_tokens_per_s"] / row["fp32_tokens_per_s"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--crossover", type=int, default=0, help="also time 2..N rows against the dense matmul")
    p.add_argument("--no-layers", action="store_true", help="skip the layer benchmark")
    p.add_argument("--lm", action="store_true", help="time SmolLM2-135M generation")
    p.add_argument("--lm-dir", default="/tmp/smollm2-135m-pq2", help="compressed model directory (made if missing)")
    p.add_argument("--lm-threshold", type=int, default=None, help="enable_lut threshold for the LM (default: the library's)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lm-repeats", type=int, default=3)
    p.add_argument("--json", help="write all rows to this file")
    args = p.parse_args(argv)
    if args.lm_threshold is None:
        from compresskit.nn.lut import DEFAULT_THRESHOLD
        args.lm_threshold = DEFAULT_THRESHOLD
    print(f"torch {torch.__version__}, numba {numba.__version__}, {torch.get_num_threads()} torch threads available; "
          "layers fitted on random weights with 1 k-means iteration (codes' values do not change the kernel's work)",
          file=sys.stderr)
    out = {"layers": [] if args.no_layers else bench_layers(args)}
    if args.lm:
        out["lm"] = bench_lm(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
