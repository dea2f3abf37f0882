"""Memory of loading (and running) a compressed model: is it the compressed size, not the dense one?

Loads a compressed directory with :func:`compresskit.load` (its adapter builds the architecture on
the meta device, so no float32 skeleton is made) while a thread samples this process's resident
memory every 20 ms, then greedy-decodes ``--tokens`` tokens from a short prompt. Prints the peak RSS
of the load and of the decoding, the RSS after the load, the bytes of the directory's tensor
files, the model's float32 size (from its config) and the seconds per decoded token.

``--cache auto`` (the default, as ``compresskit.load``) keeps rebuilt dense weights only where
they take at most half of the memory available; ``on`` / ``off`` force it.

    python bench/make_7b_shaped.py --out /tmp/llama2-7b-shaped
    python -m compresskit quantize --model /tmp/llama2-7b-shaped --method rtn --bits 2 --stream --out /tmp/l7b-rtn2
    python bench/load_compressed.py /tmp/l7b-rtn2 --tokens 2
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from stream_7b import GIB, Sampler, rss_bytes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="a compressed model directory (compresskit quantize --out)")
    p.add_argument("--tokens", type=int, default=2, help="tokens to decode after the load (0: none)")
    p.add_argument("--lut", action="store_true", help="serve codebook layers with the lookup-table kernel")
    p.add_argument("--cache", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    import compresskit
    from compresskit import io

    torch.set_num_threads(args.threads)
    directory = Path(args.directory)
    manifest = io.read_manifest(directory)
    stored = sum((directory / f).stat().st_size for f in manifest.get("tensor_files", [io.TENSORS]))
    sampler = Sampler()
    baseline = rss_bytes()
    sampler.start()
    start = time.perf_counter()
    model = compresskit.load(directory, lut=args.lut, cache={"auto": None, "on": True, "off": False}[args.cache])
    load_seconds = time.perf_counter() - start
    load_peak, after_load = sampler.take(), rss_bytes()
    dense_fp32 = manifest["totals"]["total"]["n_weights"] * 4  # every weight once, as the size report counted them
    cached = any(qt.cache for _, _, qt in compresskit.nn.quantized_tensors(model).values())
    token_seconds, decode_peak = None, None
    if args.tokens:
        ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432]]) % model.config.vocab_size  # a fixed prompt
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            token_seconds = (time.perf_counter() - start) / (out.shape[1] - ids.shape[1])
        decode_peak = sampler.take()
    sampler.running = False
    result = {
        "directory": str(directory), "lut": args.lut, "cache": cached, "threads": args.threads,
        "tensor_file_gib": round(stored / GIB, 3), "model_fp32_gib": round(dense_fp32 / GIB, 3),
        "rss_before_gib": round(baseline / GIB, 3), "load_seconds": round(load_seconds, 1),
        "load_peak_rss_gib": round(load_peak / GIB, 3), "rss_after_load_gib": round(after_load / GIB, 3),
        "tokens": args.tokens, "seconds_per_token": None if token_seconds is None else round(token_seconds, 2),
        "decode_peak_rss_gib": None if decode_peak is None else round(decode_peak / GIB, 3),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
