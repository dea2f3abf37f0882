"""PQ codebook fitting: compresskit vs faiss on the same random weight, in one process.

Fits product quantization (d = 4, k = 256, 20 Lloyd iterations: 2 bits per weight) on one random
float32 matrix with ``compresskit.quantizers.PQ(bits=2, share=1, pool=False, n_iter=20)`` and with
``faiss.ProductQuantizer(cols, cols // 4, 8)``, and prints ONE JSON line: median wall times, relative
reconstruction errors ``||W - W_hat||^2 / ||W||^2``, and the speed ratio. ``share=1`` (one codebook
per subspace) is what faiss does; PQ's default may share codebooks between subspaces.

Like for like: both sides produce codebooks *and* the codes of W, so faiss is timed for
``train`` + ``compute_codes`` (both parts are also reported). compresskit's first call, which
compiles (or loads from numba's cache) its kernels, is timed separately from the warm repeats. The
PQ with its default settings (pool on, codebook sharing chosen automatically) is timed as extra
information.

Usage: python bench/kmeans_vs_faiss.py --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import faiss
import numba
import numpy as np
import torch

from compresskit.quantizers import PQ


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (faiss warns about 'at least N training points' per subspace)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _rel_error(W: np.ndarray, W_hat: np.ndarray) -> float:
    return float(((W - W_hat) ** 2).sum() / (W**2).sum())


def _fit_compresskit(W: torch.Tensor, **params) -> tuple[float, float]:
    """(seconds to fit, relative error of inverse_transform())."""
    start = time.perf_counter()
    pq = PQ(bits=2, n_iter=20, **params).fit(W)
    seconds = time.perf_counter() - start
    return seconds, _rel_error(W.numpy(), pq.inverse_transform().float().numpy())


def _fit_faiss(W: np.ndarray, d: int) -> tuple[float, float, float]:
    """(seconds to train, seconds to encode, relative error of decode())."""
    pq = faiss.ProductQuantizer(W.shape[1], W.shape[1] // d, 8)
    pq.cp.niter = 20
    pq.cp.verbose = False
    start = time.perf_counter()
    with _quiet_stderr():
        pq.train(W)
    trained = time.perf_counter()
    codes = pq.compute_codes(W)
    encoded = time.perf_counter()
    return trained - start, encoded - trained, _rel_error(W, pq.decode(codes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6912)
    parser.add_argument("--cols", type=int, default=1152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    W = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(args.seed))  # [rows, cols] float32
    W_np = np.ascontiguousarray(W.numpy())

    first_s, _ = _fit_compresskit(W, share=1, pool=False)  # JIT compile, or load from numba's on-disk cache
    ck = [_fit_compresskit(W, share=1, pool=False) for _ in range(args.repeats)]
    pooled = [_fit_compresskit(W) for _ in range(args.repeats)]
    fa = [_fit_faiss(W_np, d=4) for _ in range(args.repeats)]

    ck_s = statistics.median(s for s, _ in ck)
    faiss_s = statistics.median(t + e for t, e, _ in fa)
    print(json.dumps({
        "shape": [args.rows, args.cols], "d": 4, "k": 256, "n_iter": 20, "repeats": args.repeats,
        "threads": {"numba": numba.get_num_threads(), "faiss": faiss.omp_get_max_threads()},
        "compresskit_s": round(ck_s, 3),
        "compresskit_first_call_s": round(first_s, 3),
        "compresskit_default_pq_s": round(statistics.median(s for s, _ in pooled), 3),
        "faiss_s": round(faiss_s, 3),
        "faiss_train_s": round(statistics.median(t for t, _, _ in fa), 3),
        "faiss_encode_s": round(statistics.median(e for _, e, _ in fa), 3),
        "compresskit_rel_error": round(statistics.median(e for _, e in ck), 5),
        "compresskit_default_pq_rel_error": round(statistics.median(e for _, e in pooled), 5),
        "faiss_rel_error": round(statistics.median(e for _, _, e in fa), 5),
        "speedup": round(faiss_s / ck_s, 2),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
