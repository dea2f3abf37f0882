"""Numba kernels behind ``lut.py``. Private: inputs are assumed valid, float32 and contiguous.

A codebook layer's output row i is ``sum_g x_g . C[book(i, g), code(i, g)]`` over its subspaces g
(``x_g``: the d inputs of subspace g). The *LUT* holds every ``x_g . C[b, c]`` the layer can ask for,
``lut [n_sub, kp]`` (kp: k, or 256 for byte codes), so for one token the output is one gather and one
add per code: no weight is ever rebuilt. Several tokens are several LUTs (``lut.py`` loops).

Why the gather loops look the way they do (measured on the 2-core Xeon of ``docs/inference.md``):

- Byte codes are read eight at a time as one ``uint64`` word and split by shifts: one load per eight
  codes instead of eight.
- Eight rows are summed together, each in its own accumulator: eight independent add chains, and the
  eight rows read the same 1 KB LUT rows at the same time, so the LUT lines they need stay in L1.
- The gathers are compiled *without* the ``reassoc`` fast-math flag. With it LLVM vectorises the sum
  into AVX-512 gathers, which were slower here than scalar loads.
- The caller cuts a LUT larger than :data:`LUT_TILE_BYTES` into column tiles (a run of subspaces)
  and calls the gather once per tile, accumulating into ``out``: a LUT that does not fit the core's
  L2 cache cost more than twice the time per lookup.

``cache=True`` keeps the compiled kernels on disk; the first call of each signature compiles.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
NO_REASSOC = {"contract", "nsz", "arcp"}  # keeps the batch-1 gather scalar (see module docstring)
BYTE_K = 256  # LUT row stride for byte codes: a code's offset is its byte, no multiply
ROWS = 8  # rows summed together by the gathers
CHUNK = 256  # rows per parallel task (a multiple of ROWS)
LUT_TILE_BYTES = 1 << 20  # largest LUT slice one gather call reads (fits a core's L2 with room)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def build_lut(x, cbT, books, lut):
    """``lut[g, c] = x[g*d : (g+1)*d] . cbT[books[g], :, c]`` for one token.

    ``x [n_sub * d]`` float32 (padded columns zero), ``cbT [n_books, d, k]`` float32 (centroids,
    dimension-major so that the loop over c vectorises), ``books [n_sub]`` int32, ``lut [n_sub, kp]``
    float32 with ``kp >= k`` (entries from k on are left as they are: no code reads them).
    """
    d, k = cbT.shape[1], cbT.shape[2]
    n_sub = lut.shape[0]
    for g in prange(n_sub):
        b = books[g]
        row = np.zeros(k, np.float32)
        for j in range(d):
            xv = x[g * d + j]
            for c in range(k):
                row[c] += xv * cbT[b, j, c]
        for c in range(k):
            lut[g, c] = row[c]


@njit(inline="always")
def _byte_at(lutf, base, word, j):
    """The LUT entry for byte j of ``word``: subspace ``j`` after ``base``, rows of BYTE_K floats."""
    return lutf[base + j * BYTE_K + ((word >> (8 * j)) & 255)]


@njit(parallel=True, fastmath=NO_REASSOC, cache=True)
def gather_words(lutf, words, out):
    """``out[i] += sum_g lutf[g*256 + code(i, g)]`` for byte codes packed eight to a word.

    ``lutf [n_words * 8 * 256]`` float32 (one token), ``words [m, n_words]`` uint64 (byte j of word w
    is subspace ``8 w + j``, little-endian), ``out [m]`` float32.
    """
    m, nw = words.shape
    n_tasks = (m + CHUNK - 1) // CHUNK
    for task in prange(n_tasks):
        lo = task * CHUNK
        hi = min(m, lo + CHUNK)
        full = lo + (hi - lo) // ROWS * ROWS
        for i in range(lo, full, ROWS):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            a4 = np.float32(0.0)
            a5 = np.float32(0.0)
            a6 = np.float32(0.0)
            a7 = np.float32(0.0)
            for w in range(nw):
                base = w * (8 * BYTE_K)
                v0 = words[i, w]
                v1 = words[i + 1, w]
                v2 = words[i + 2, w]
                v3 = words[i + 3, w]
                v4 = words[i + 4, w]
                v5 = words[i + 5, w]
                v6 = words[i + 6, w]
                v7 = words[i + 7, w]
                for j in range(8):
                    a0 += _byte_at(lutf, base, v0, j)
                    a1 += _byte_at(lutf, base, v1, j)
                    a2 += _byte_at(lutf, base, v2, j)
                    a3 += _byte_at(lutf, base, v3, j)
                    a4 += _byte_at(lutf, base, v4, j)
                    a5 += _byte_at(lutf, base, v5, j)
                    a6 += _byte_at(lutf, base, v6, j)
                    a7 += _byte_at(lutf, base, v7, j)
            out[i] += a0
            out[i + 1] += a1
            out[i + 2] += a2
            out[i + 3] += a3
            out[i + 4] += a4
            out[i + 5] += a5
            out[i + 6] += a6
            out[i + 7] += a7
        for i in range(full, hi):  # the last rows of the layer, one at a time
            acc = np.float32(0.0)
            for w in range(nw):
                base = w * (8 * BYTE_K)
                v = words[i, w]
                for j in range(8):
                    acc += _byte_at(lutf, base, v, j)
            out[i] += acc


@njit(parallel=True, fastmath=NO_REASSOC, cache=True)
def gather_codes(lut, codes, out):
    """``out[i] += sum_g lut[g, codes[i, g]]`` for codes of any integer dtype.

    ``lut [n_sub, kp]`` float32, ``codes [m, n_sub]`` (uint8, int16 or int32; any strides),
    ``out [m]`` float32. For codes wider than a byte, and for the subspaces left over when byte codes
    do not fill whole words. Eight rows at a time, as :func:`gather_words`.
    """
    m, n_sub = codes.shape
    n_tasks = (m + CHUNK - 1) // CHUNK
    for task in prange(n_tasks):
        lo = task * CHUNK
        hi = min(m, lo + CHUNK)
        full = lo + (hi - lo) // ROWS * ROWS
        for i in range(lo, full, ROWS):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            a4 = np.float32(0.0)
            a5 = np.float32(0.0)
            a6 = np.float32(0.0)
            a7 = np.float32(0.0)
            for g in range(n_sub):
                a0 += lut[g, codes[i, g]]
                a1 += lut[g, codes[i + 1, g]]
                a2 += lut[g, codes[i + 2, g]]
                a3 += lut[g, codes[i + 3, g]]
                a4 += lut[g, codes[i + 4, g]]
                a5 += lut[g, codes[i + 5, g]]
                a6 += lut[g, codes[i + 6, g]]
                a7 += lut[g, codes[i + 7, g]]
            out[i] += a0
            out[i + 1] += a1
            out[i + 2] += a2
            out[i + 3] += a3
            out[i + 4] += a4
            out[i + 5] += a5
            out[i + 6] += a6
            out[i + 7] += a7
        for i in range(full, hi):
            acc = np.float32(0.0)
            for g in range(n_sub):
                acc += lut[g, codes[i, g]]
            out[i] += acc
