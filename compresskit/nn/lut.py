"""Fast batch-1 inference for codebook-compressed Linear layers: a lookup-table (LUT) forward.

A PQ / VQ weight is codes into centroids, so ``y = x @ W_hat.T`` never needs ``W_hat``: per subspace
g, the dot products of the input's d columns with every centroid its book holds form a table
``lut [n_sub, k]``, and output row i is ``scale_i * sum_g lut[g, code(i, g)]`` (plus the bias). For
one token that reads the byte codes (a quarter of a byte per weight at 2 bits) and a table that
fits the core's L2 cache, instead of the dense float32 weight: see ``docs/inference.md``.

:func:`enable_lut` gives every ``nn.Linear`` whose weight is a codebook :class:`QuantizedTensor` an
*instance* ``forward``: inputs of at most ``threshold`` rows (tokens), with no gradient needed, go
through the LUT kernel; anything else goes through the class's own ``forward`` (the parametrization
rebuilds and caches the dense weight, as before). The module keeps its class, its state dict and its
parametrization; :func:`disable_lut` deletes the instance attribute. Which layers are served is
decided by capability: a :class:`CodebookQuantizer` (its ``codebook_layout``), the ``[out, in]``
layout (``out_axis=0``), and a class that does not override ``nn.Linear.forward``.

What the LUT path keeps per layer (built on the first call, rebuilt when the quantizer's state
changes in place or moves): the centroids in float32, dimension-major (``[n_books, d, k]``; for
DPQ's pool, the pool looked up through the projection table), the row scales in float32, and one
LUT scratch buffer. The codes are read where they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from compresskit.errors import CompressKitError
from compresskit.nn import _lut_kernels as K
from compresskit.nn.quantized import QuantizedTensor, quantized_of
from compresskit.quantizers.codebook import CodebookQuantizer

# Inputs of at most this many rows (tokens) take the LUT path by default. The LUT costs one pass
# over the codes per row, while the dense matmul reads its cached weight once for any small batch:
# bench/pq_linear.py --crossover 4 measured the LUT faster at 2 rows for both 4096 x 11008 shapes
# and all three methods at one thread, and mixed at 3 rows (figures in docs/inference.md).
DEFAULT_THRESHOLD = 2
SERVED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in float32, returned as given


@dataclass
class LutReport:
    """What :func:`enable_lut` did: ``switched`` layer names, and ``left_alone`` {name: reason} for
    every other layer with a compressed weight."""

    switched: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"LUT forward on {len(self.switched)} layer(s)"]
        lines += [f"  left alone: {name}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


@dataclass
class _Plan:
    """A layer's LUT state, valid while ``key`` (ids and versions of the quantizer's tensors) holds."""

    key: tuple
    cbT: np.ndarray  # [n_books, d, k] float32, centroids as reconstruction sees them
    runs: list[tuple[int, int, np.ndarray]]  # (first row, end row, books [n_sub] int32) per run of rows
    scale: np.ndarray | None  # [m] float32 row scales, or None
    lut: np.ndarray  # [n_sub, kp] float32 scratch
    d: int
    in_features: int


def _state_key(qt: QuantizedTensor) -> tuple:
    tensors = [qt.codes, *qt.state_tensors().values()]
    return tuple((id(t), t._version, t.device) for t in tensors)


def why_not(module: nn.Module) -> str | None:
    """Why :func:`enable_lut` would leave ``module`` alone (one sentence), or None if it can serve it."""
    qt = quantized_of(module, "weight")
    if qt is None:
        return "its weight is not compressed"
    if not isinstance(module, nn.Linear):
        return f"a {type(module).__name__} is not an nn.Linear"
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} overrides nn.Linear.forward, which an instance forward would bypass"
    if not isinstance(qt.quantizer, CodebookQuantizer):
        return f"the {qt.quantizer.name} quantizer has no codebook to build a lookup table from"
    if qt.layout.out_axis != 0 or qt.stored_dim != 2:  # inputs: nn.Linear's own (a tied head may carry "none")
        return f"its weight is stored in another layout ({qt.layout}); the LUT kernel reads [out, in] rows"
    if qt.codes.device.type != "cpu":
        return f"its codes are on {qt.codes.device}; the LUT kernel runs on the CPU"
    if "forward" in vars(module) and not isinstance(vars(module)["forward"], _LutForward):
        return "it already has an instance forward of someone else's"
    plan = _plan(qt)
    return plan if isinstance(plan, str) else None


def _plan(qt: QuantizedTensor) -> _Plan | str:
    """The layer's cached :class:`_Plan`, (re)built when its state changed; a reason string when the
    codebook layout cannot be served (books that change along the rows too often)."""
    key = _state_key(qt)
    plan = getattr(qt, "_lut_plan", None)
    if isinstance(plan, _Plan) and plan.key == key:
        return plan
    q = qt.bind()
    layout = q.codebook_layout()
    m, n_sub = qt.codes.shape
    book = layout.book  # [m, n_sub] int64
    changes = torch.nonzero((book[1:] != book[:-1]).any(1)).reshape(-1) + 1
    starts = [0, *changes.tolist()]
    if len(starts) > 1 and len(starts) * layout.k > m:  # one table per run of rows: more entries than rows served
        return (f"its codebooks change along the rows ({len(starts)} runs of rows): {len(starts)} lookup tables of "
                f"{layout.k} entries per subspace would cost more than the {m} rows they serve")
    ends = [*starts[1:], m]
    runs = [(lo, hi, book[lo].to(torch.int32).numpy().copy()) for lo, hi in zip(starts, ends)]
    cbT = layout.centroids().permute(0, 2, 1).contiguous().numpy()  # [n_books, d, k]
    scale = None if layout.row_scales is None else layout.row_scales.detach().float().numpy().copy()
    kp = K.BYTE_K if qt.codes.dtype == torch.uint8 else layout.k
    plan = _Plan(key, cbT, runs, scale, np.zeros((n_sub, kp), np.float32), layout.d, q.shape_[1])
    qt._lut_plan = plan
    return plan


def lut_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W_hat.T + bias`` through the LUT kernel, without rebuilding ``W_hat``.

    ``x [..., in]`` float32, bfloat16 or float16 on the CPU (computed in float32, returned in x's
    dtype); ``qt``: a codebook :class:`QuantizedTensor` that :func:`why_not` accepts. Cost grows with
    the number of rows of x (one LUT pass per row); no autograd.
    """
    plan = _plan(qt)
    if isinstance(plan, str):
        raise CompressKitError(f"lut_linear cannot serve this tensor: {plan}")
    m, n_sub = qt.codes.shape
    flat = x.reshape(-1, x.shape[-1]).detach()
    rows = np.zeros((flat.shape[0], n_sub * plan.d), np.float32)  # [T, n_sub * d], padded columns zero
    rows[:, : flat.shape[1]] = flat.to(torch.float32).numpy()
    out = np.zeros((rows.shape[0], m), np.float32)
    codes = qt.codes.numpy()  # [m, n_sub], read in place
    for t in range(rows.shape[0]):
        for lo, hi, books in plan.runs:
            K.build_lut(rows[t], plan.cbT, books, plan.lut)
            _gather(plan.lut, codes[lo:hi], out[t, lo:hi])
    if plan.scale is not None:
        out *= plan.scale
    if bias is not None:
        out += bias.detach().to(torch.float32).numpy()
    return torch.from_numpy(out).reshape(*x.shape[:-1], m).to(x.dtype)


def _gather(lut: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:
    """``out[i] += sum_g lut[g, codes[i, g]]``, in column tiles of at most ``K.LUT_TILE_BYTES`` of LUT."""
    n_sub = codes.shape[1]
    start = 0
    if codes.dtype == np.uint8 and n_sub >= 8:
        n_words = n_sub // 8
        words = codes[:, : n_words * 8].view(np.uint64)  # [rows, n_words]: 8 codes a word
        flat = lut.reshape(-1)
        per_tile = max(1, K.LUT_TILE_BYTES // (8 * K.BYTE_K * 4))
        for w0 in range(0, n_words, per_tile):
            w1 = min(n_words, w0 + per_tile)
            K.gather_words(flat[w0 * 8 * K.BYTE_K : w1 * 8 * K.BYTE_K], words[:, w0:w1], out)
        start = n_words * 8
    per_tile = max(1, K.LUT_TILE_BYTES // (lut.shape[1] * 4))
    for g0 in range(start, n_sub, per_tile):
        g1 = min(n_sub, g0 + per_tile)
        K.gather_codes(lut[g0:g1], codes[:, g0:g1], out)


class _LutForward:
    """The instance ``forward`` :func:`enable_lut` installs (see the module docstring)."""

    def __init__(self, module: nn.Linear, qt: QuantizedTensor, threshold: int):
        self.module = module
        self.qt = qt
        self.threshold = threshold

    def serves(self, x: torch.Tensor) -> bool:
        """Does this call take the LUT path? Small CPU inputs, no autograd, the same compressed weight."""
        m, qt = self.module, self.qt
        if x.device.type != "cpu" or x.dtype not in SERVED_DTYPES or x.dim() == 0 or x.shape[-1] != m.in_features:
            return False
        if x.numel() // m.in_features > self.threshold or qt.override is not None or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in m.parameters())):
            return False
        return quantized_of(m, "weight") is qt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.serves(x):
            return lut_linear(x, self.qt, self.module.bias)
        return type(self.module).forward(self.module, x)


def enable_lut(model: nn.Module, threshold: int = DEFAULT_THRESHOLD) -> LutReport:
    """Give every servable ``nn.Linear`` of ``model`` (see :func:`why_not`) the LUT forward, in place.

    Inputs of at most ``threshold`` rows (tokens: the product of all but the last dimension) with no
    gradient needed take the LUT kernel; larger ones use the layer's dense path (weight rebuilt once
    and cached). Calling it again updates the threshold. Returns a :class:`LutReport`.
    """
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
        raise CompressKitError(f"enable_lut: threshold must be an integer >= 0 (rows of the input), got {threshold!r}")
    report = LutReport()
    for name, module in model.named_modules():
        if quantized_of(module, "weight") is None:
            continue
        reason = why_not(module)
        if reason is not None:
            report.left_alone[name] = reason
            continue
        module.forward = _LutForward(module, quantized_of(module, "weight"), threshold)
        report.switched.append(name)
    return report


def disable_lut(model: nn.Module) -> list[str]:
    """Remove the LUT forward from every layer of ``model`` that has it; returns their names."""
    removed = []
    for name, module in model.named_modules():
        if isinstance(vars(module).get("forward"), _LutForward):
            del module.forward
            removed.append(name)
    return removed


def lut_enabled(module: nn.Module) -> bool:
    """Does ``module`` have the LUT forward?"""
    return isinstance(vars(module).get("forward"), _LutForward)
