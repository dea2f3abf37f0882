"""Wall time of ``compresskit quantize`` in one process and under ``torchrun --nproc-per-node N``.

Builds a random-weight LLaMA from a ``LlamaConfig`` (seed 0; the tiny tokenizer of the tests), then
runs the same command both ways with the same thread count per process, checks that the saved
tensors are bit-identical, and prints one markdown row per method::

    python bench/distributed_walltime.py --layers 8 --hidden 256 --nproc 2 --threads 1

The figures in ``docs/BENCHMARKS.md`` ("Distributed compression") come from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, layers: int, hidden: int) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "adapters" / "lm"))
    from tiny_lms import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, vocab_size=384, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def run(cmd: list[str], threads: int) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process, the same in both runs")
    ap.add_argument("--methods", default="gptq:3,pq:2")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args.layers, args.hidden)
        print(f"| method | preset | 1 process (s) | {args.nproc} processes (s) | compress only, 1 / {args.nproc} (s) | bit-identical |")
        print("|---|---|---|---|---|---|")
        for spec in args.methods.split(","):
            method, bits = spec.split(":")
            base = [
                "quantize", "--model", str(tmp / "model"), "--method", method, "--bits", bits, "--no-eval", "--json",
                "--calib-samples", str(args.samples), "--calib-set", f"batch_size={args.batch_size}", "--option", f"seq_len={args.seq_len}",
            ]
            one_s, one = run([sys.executable, "-m", "compresskit", *base, "--out", str(tmp / f"{method}-1")], args.threads)
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port", "29533"]
            two_s, two = run([*launcher, "-m", "compresskit", *base, "--out", str(tmp / f"{method}-n")], args.threads)
            a, b = (load_file(str(tmp / f"{method}-{s}" / "model.safetensors")) for s in ("1", "n"))
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            print(f"| {method}:{bits} | fast | {one_s:.1f} | {two_s:.1f} | {one['seconds_compress']:.1f} / {two['seconds_compress']:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
