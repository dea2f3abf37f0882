"""GPTQ: round-to-nearest on RTN's grid, with second-order error feedback (Frantar et al. 2022).

Columns (input features) are quantized one at a time; the error each column makes is pushed into
the columns not yet quantized, weighted by the inverse of the proxy Hessian ``H = X^T X`` of the
layer's inputs, so the *output* error ``tr((W - W_hat) H (W - W_hat)^T)`` stays small rather than
the weight error. As in the reference (IST-DASLab/gptq, ``fasterquant``): the upper Cholesky factor
``U`` of ``(H + damp * mean(diag H) * I)^-1`` gives every update, and updates to columns beyond the
current block of ``block_size`` columns are applied lazily, once per block. ``W = Q + E U`` holds
exactly, with ``E`` the scaled errors, so the output error under the damped ``H`` is ``||E||^2``.

The output is RTN's: the same float16 scale/zero grid and the same stored state (``codes_``,
``scales_``, ``zeros_``, ``pad_``), so ``inverse_transform`` and size accounting are RTN's.

* ``group_size``: a group's scale and zero are computed from the error-updated weights when the
  algorithm reaches the group's first column (every pending update applied, whatever ``block_size``).
* ``act_order=True`` quantizes columns in order of decreasing ``diag(H)``. With ``group_size`` it
  uses *static groups*: all group scales are computed up front from the original ``W``, on groups
  of the original column order, so the stored layout stays RTN's.
* Dead inputs (``diag(H) == 0``, never active in calibration) get ``H_ii = 1`` and a zero weight.
* ``hessian=None`` means ``H = I``: no error feedback, and the result is RTN's exactly.
* ``codes_`` holds the codes the algorithm chose; ``transform(W)`` of a weight is plain rounding on
  the learned grid (it does not rerun the algorithm, which needs the Hessian).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from compresskit.calib.hessian import HessianAccumulator
from compresskit.errors import CompressKitError
from compresskit.quantizers.base import check_int
from compresskit.quantizers.rtn import RTN
from compresskit.registry import register_quantizer


@register_quantizer("gptq")
class GPTQ(RTN):
    """GPTQ on RTN's grid. ``fit(W, hessian=H)`` with ``H  # [in, in]`` (``X^T X`` up to scale).

    State as RTN: ``codes_ [m, n_padded]`` uint8, ``scales_``/``zeros_ [m, n_groups]`` float16.
    """

    uses_hessian = True  # the calibrator passes each layer's H = X^T X / N to fit

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool = False,
        act_order: bool = False,
        damp: float = 0.01,
        block_size: int = 128,
    ):
        super().__init__(bits=bits, group_size=group_size, symmetric=symmetric)
        self.act_order = act_order
        self.damp = damp
        self.block_size = block_size

    def _validate_params(self) -> None:
        super()._validate_params()
        if not isinstance(self.act_order, bool):
            raise CompressKitError(f"{self.name}: act_order must be True or False, got {self.act_order!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < math.inf:
            raise CompressKitError(f"{self.name}: damp must be a finite number >= 0 (e.g. 0.01), got {self.damp!r}")
        check_int("block_size", self.name, self.block_size, 1, 1 << 30)

    # ---- fit ----------------------------------------------------------------------------------
    def _fit(self, W: torch.Tensor, hessian: torch.Tensor | HessianAccumulator | None = None) -> None:
        if hessian is None:
            super()._fit(W)  # H = I: GPTQ is RTN; base fit then rounds W on the grid
            return
        H = self._check_hessian(hessian, W.shape[1])
        m, n = W.shape
        W = W.clone()

        dead = torch.diagonal(H) == 0
        idx = dead.nonzero().squeeze(1)
        H[idx, idx] = 1.0
        W[:, dead] = 0.0
        H.diagonal().add_(self.damp * H.diagonal().mean())

        g = self._group(n)
        Wp = self._grouped(W).reshape(m, -1)  # [m, N] zero-padded to whole groups; sets pad_
        N = Wp.shape[1]
        order = torch.arange(N)  # sweep order; padding columns last
        if self.act_order:
            order[:n] = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        # padding columns get an identity block: decoupled, they stay zero and get the code of 0, as in RTN
        U = self._inverse_cholesky(_padded(H, N)[order][:, order])  # [N, N] upper
        if self.act_order:
            super()._fit(W)  # static groups: scales/zeros from the original (dead-zeroed) W
        else:  # filled in group by group during the sweep
            self.scales_ = torch.ones(m, N // g, dtype=torch.float16)
            self.zeros_ = torch.empty(0) if self.symmetric else torch.zeros(m, N // g, dtype=torch.float16)
        codes, _, _ = _gptq_columns(self, Wp[:, order], U, order // g, g, dynamic=not self.act_order)
        self.codes_ = torch.empty_like(codes)
        self.codes_[:, order] = codes  # back to the original column order

    def _inverse_cholesky(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of ``H^-1`` (float64 for the solve), as float32."""
        try:
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        except torch.linalg.LinAlgError:
            raise CompressKitError(
                f"{self.name}: the hessian is not positive definite after damping (damp={self.damp}); "
                "raise damp or add calibration data"
            ) from None
        return U.to(torch.float32)

    def _check_hessian(self, hessian: Any, n: int) -> torch.Tensor:
        """Validate and return a float64 copy of the hessian ``[n, n]``."""
        if isinstance(hessian, HessianAccumulator):
            hessian = hessian.hessian
        if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
            raise CompressKitError(
                f"{self.name}: hessian must be a float tensor [in, in] or a HessianAccumulator, "
                f"got {type(hessian).__name__}"
            )
        if tuple(hessian.shape) != (n, n):
            raise CompressKitError(
                f"{self.name}: hessian must be [{n}, {n}] for a weight with {n} input columns "
                f"(conv kernels flattened), got {tuple(hessian.shape)}"
            )
        if not torch.isfinite(hessian).all():
            raise CompressKitError(f"{self.name}: the hessian has NaN or infinite values; check the calibration inputs")
        return hessian.detach().to(device="cpu", dtype=torch.float64).clone()

    # ---- one column's grid ----------------------------------------------------------------------
    def _set_group_grid(self, k: int, Wk: torch.Tensor) -> None:
        """Compute group ``k``'s scale/zero from its (error-updated) columns ``Wk [m, g]``, as RTN would."""
        ref = RTN(bits=self.bits, symmetric=self.symmetric)
        ref._fit(Wk)
        self.scales_[:, k] = ref.scales_[:, 0]
        if not self.symmetric:
            self.zeros_[:, k] = ref.zeros_[:, 0]

    def _column_grid(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, value of code 0) of group ``k``, float32 ``[m]``: same arithmetic as RTN._offset."""
        scale = self.scales_[:, k].float()
        if self.symmetric:
            return scale, -(2**self.bits - 1) / 2 * scale
        return scale, self.zeros_[:, k].float()


def _padded(H: torch.Tensor, N: int) -> torch.Tensor:
    """``H [n, n]`` with an identity block for padding columns: ``[N, N]``."""
    out = torch.eye(N, dtype=H.dtype)
    out[: H.shape[0], : H.shape[0]] = H
    return out


def _gptq_columns(
    q: GPTQ, W: torch.Tensor, U: torch.Tensor, group_of: torch.Tensor, g: int, dynamic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over columns of ``W [m, N]`` (already permuted) with ``U [N, N]`` upper.

    ``group_of [N]``: each column's group (of ``g`` original columns); ``dynamic``: compute a
    group's grid when its first column (in sweep order) is reached. Returns ``codes [m, N] uint8``,
    ``Q [m, N]`` the quantized weights, ``E [m, N]`` the scaled errors (``W = Q + E U``). ``W`` is updated in place.
    """
    m, N = W.shape
    maxq = 2**q.bits - 1
    codes = torch.empty(m, N, dtype=torch.uint8)
    Q = torch.empty_like(W)
    E = torch.empty_like(W)
    for i1 in range(0, N, q.block_size):
        i2 = min(i1 + q.block_size, N)
        W1 = W[:, i1:i2]  # a view: in-block updates land in W
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            k = int(group_of[j])
            if dynamic and j % g == 0:
                inside = W1[:, i : i + g]
                rest = W[:, i2 : j + g] - E[:, i1:j] @ U[i1:j, i2 : j + g]  # lazy updates still pending
                q._set_group_grid(k, torch.cat([inside, rest], dim=1))
            scale, zero = q._column_grid(k)
            w = W1[:, i].clone()
            c = torch.round((w - zero) / scale).clamp(0, maxq)
            wq = c * scale + zero
            err = (w - wq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            codes[:, j] = c.to(torch.uint8)
            Q[:, j] = wq
            E[:, j] = err
        W[:, i2:] -= E[:, i1:i2] @ U[i1:i2, i2:]
    return codes, Q, E
