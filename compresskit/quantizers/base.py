"""The estimator contract every quantizer follows (scikit-learn style, on plain weight tensors).

``__init__`` only stores its arguments; ``fit(W)`` learns the state (attributes ending in ``_``) and
returns ``self``; ``transform(W)`` gives integer codes; ``inverse_transform(codes)`` rebuilds the
weight in the dtype it was fitted on. Weights are 2-D ``[out, in]``; a tensor of more dimensions (a
conv kernel) is flattened to ``[shape[0], prod(shape[1:])]`` and restored on the way back.

Learned state round-trips through safetensors (``save`` / ``load_quantizer``): tensors in the file,
parameters and scalar state as JSON metadata. No pickle.

Capabilities are class attributes, so calibration dispatches on what a quantizer can do, never on its
name: ``uses_hessian`` (``fit(W, hessian=H)`` uses the input statistics) and
``supports_codebook_update`` (a :class:`~compresskit.quantizers.codebook.CodebookQuantizer`, whose
codes and centroid table calibration may change through its setters); ``trains_in_loop`` (False: the
latent phase of calibration leaves its codes as fitted, for a coding whose size depends on them).
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from compresskit.errors import CompressKitError
from compresskit.files import save_tensors
from compresskit.quantizers.packing import pack_codes, unpack_codes
from compresskit.quantizers.sizes import SizeReport

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Quantizer:
    """Base class: parameter handling, validation, persistence. Subclasses implement the math.

    Subclasses define ``name``, ``_fit(W2d)``, ``_transform(W2d) -> codes``,
    ``_inverse(codes) -> W2d`` (float32), ``_size(shape) -> dict of bits`` (from parameters and
    shape alone, used by :meth:`estimate`), and list their learned tensors in ``_state_tensors``.
    """

    name: ClassVar[str] = ""
    _state_tensors: ClassVar[tuple[str, ...]] = ()
    uses_hessian: ClassVar[bool] = False  # fit(W, hessian=H) uses the layer's input statistics
    supports_codebook_update: ClassVar[bool] = False  # a CodebookQuantizer: see quantizers/codebook.py
    trains_in_loop: ClassVar[bool] = True  # False: quantization in the loop keeps its codes as fitted (morton)

    # ---- parameters -------------------------------------------------------------------------
    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Constructor parameters and their defaults, read from the signature."""
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_defaults()}

    def set_params(self, **params: Any) -> "Quantizer":
        valid = self.param_defaults()
        for key, value in params.items():
            if key not in valid:
                raise CompressKitError(f"{self.name}: unknown parameter {key!r}; valid: {', '.join(valid)}")
            setattr(self, key, value)
        return self

    def clone(self) -> "Quantizer":
        """An unfitted copy with the same parameters."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ---- public verbs -----------------------------------------------------------------------
    def fit(self, W: torch.Tensor, **fit_params: Any) -> "Quantizer":
        """Learn the quantizer's state from weight ``W`` ([out, in], or more dims); returns self."""
        self._validate_params()
        W2 = self._check_weight(W)
        self.shape_ = tuple(W.shape)
        self.dtype_ = str(W.dtype).removeprefix("torch.")
        if hasattr(self, "codes_"):
            del self.codes_  # refitting
        self._fit(W2, **fit_params)
        if not hasattr(self, "codes_"):  # _fit may set codes itself (PQ keeps pre-pool codes)
            self.codes_ = self._transform(W2)
        return self

    def transform(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``W`` under the learned state (W must have the fitted shape)."""
        self._check_fitted()
        W2 = self._check_weight(W)
        if tuple(W.shape) != self.shape_:
            raise CompressKitError(f"{self.name}: fitted on shape {self.shape_}, got {tuple(W.shape)}")
        return self._transform(W2)

    def inverse_transform(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct the weight from ``codes`` (default: the fitted weight's codes).

        Differentiable with respect to the learned float state (codebooks, pool, scales).
        Returns the fitted shape in the fitted dtype.
        """
        self._check_fitted()
        if codes is None:
            codes = self.codes_
        W2 = self._inverse(codes)
        return W2.reshape(self.shape_).to(_DTYPE_NAMES[self.dtype_])

    def fit_transform(self, W: torch.Tensor, **fit_params: Any) -> torch.Tensor:
        return self.fit(W, **fit_params).codes_

    # ---- shapes it can take -----------------------------------------------------------------
    def adapt_to_shape(self, shape: tuple[int, ...]) -> tuple["Quantizer | None", str | None]:
        """Can this quantizer fit a weight of ``shape`` (``[out, ...]``, flattened as :meth:`fit` does)?

        Returns ``(self, None)`` when it can as it is; ``(clone, note)`` when a clone with adjusted
        parameters can (``note``: one sentence saying what changed and why, for the report);
        ``(None, reason)`` when the tensor cannot be compressed at all and should stay dense. One odd
        layer (a 1 x 128 gate, a 128 x 1 head) must never fail a model. Parameters that are invalid
        whatever the shape still raise CompressKitError. The base handles the rank and size every
        quantizer needs; subclasses with shape limits extend it.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            return None, f"a {len(shape)}-D tensor of shape {shape} has no [out, in] layout to quantize"
        if math.prod(shape) == 0:
            return None, f"the tensor of shape {shape} is empty"
        return self, None

    def _adapted(self, note: str, **params: Any) -> tuple["Quantizer", str]:
        """``(clone with params changed, note)``: what :meth:`adapt_to_shape` returns after an adjustment."""
        return type(self)(**{**self.get_params(), **params}), note

    # ---- shared state -----------------------------------------------------------------------
    def bind_state(self, tensors: dict[str, torch.Tensor], codes: torch.Tensor) -> None:
        """Adopt ``tensors`` (one per learned tensor name, as stored) and the unpacked ``codes``
        ``[same shape as codes_]`` as this fitted quantizer's state, without copying.

        A compressed module calls this so that its buffers and parameters and the quantizer are the
        same tensors: a change through either (an optimiser step, a setter's ``copy_``, ``.to()``)
        is seen by both. Shapes must match the fitted state; dtypes and devices may differ (a module
        trains in float32 and moves between devices).
        """
        self._check_fitted()
        names = tuple(self._state_tensors)
        if set(tensors) != set(names):
            raise CompressKitError(
                f"{self.name}: bind_state needs exactly the tensors {list(names)}, got {sorted(tensors)}; pass the quantizer's own state names"
            )
        for key in names:
            have, want = tuple(tensors[key].shape), tuple(getattr(self, key).shape)
            if have != want:
                raise CompressKitError(f"{self.name}: bind_state got {key} of shape {list(have)}, but the fitted state is {list(want)}; pass tensors of the fitted shapes")
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or tuple(codes.shape) != tuple(self.codes_.shape):
            raise CompressKitError(f"{self.name}: bind_state needs integer codes of shape {list(self.codes_.shape)} (unpacked); got {_describe(codes)}")
        for key in names:
            setattr(self, key, tensors[key])
        self.codes_ = codes

    def settle(self) -> None:
        """Round the learned float state in place to what the file stores, after anything wrote it
        directly (an optimiser step on the bound tensors). A no-op unless a quantizer stores its
        tensors coarser than it holds them (a codebook's 8-bit table, ``table_bits=8``)."""

    # ---- size accounting --------------------------------------------------------------------
    def size_report(self) -> SizeReport:
        """All-in size of the fitted tensor (codes, codebooks/pool, tables, scales)."""
        self._check_fitted()
        return SizeReport(math.prod(self.shape_), self._fitted_size())

    def planned_params(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """The parameters a fit on a weight of ``shape`` would use, automatic choices resolved (what a
        size estimate reports per layer); by default those given, :meth:`get_params`."""
        return self.get_params()

    @classmethod
    def estimate(cls, shape: tuple[int, ...], **params: Any) -> SizeReport:
        """All-in size for a weight of ``shape`` without any weights (parameters as for __init__)."""
        q = cls(**params)
        q._validate_params()
        if len(shape) < 2 or min(shape) < 1:
            raise CompressKitError(f"{cls.name}: shape must have at least 2 positive dimensions, got {tuple(shape)}")
        rows, cols = shape[0], math.prod(shape[1:])
        return SizeReport(rows * cols, q._size((rows, cols)))

    def _fitted_size(self) -> dict[str, int]:
        rows, cols = self.shape_[0], math.prod(self.shape_[1:])
        return self._size((rows, cols))

    # ---- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors as stored on disk (codes bit-packed)."""
        self._check_fitted()
        out = {name: getattr(self, name).detach().contiguous() for name in self._state_tensors}
        out["codes_"] = self._stored_codes()
        return out

    def _stored_codes(self) -> torch.Tensor:
        """``codes_`` as the file holds them: bit-packed, so the file costs exactly what size_report() says."""
        return pack_codes(self.codes_, self.code_bits_)

    def _codes_from_stored(self, stored: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        """Inverse of :meth:`_stored_codes`, from :meth:`state_meta`'s ``code_bits_`` and ``codes_shape_``."""
        return unpack_codes(stored, meta["code_bits_"], tuple(meta["codes_shape_"]))

    def stored_float_dtype(self) -> torch.dtype:
        """The dtype the learned float tensors (codebooks, scales) are stored in, as :meth:`size_report`
        counts them: float16 unless a quantizer says otherwise."""
        return torch.float16

    def state_meta(self) -> dict[str, Any]:
        """JSON-able description: quantizer name, parameters and scalar learned state."""
        self._check_fitted()
        return {
            "quantizer": self.name,
            "params": self.get_params(),
            "shape_": list(self.shape_),
            "dtype_": self.dtype_,
            "codes_shape_": list(self.codes_.shape),
            "code_bits_": self.code_bits_,
            **self._extra_meta(),
        }

    def state_names(self) -> tuple[str, ...]:
        """Names of the learned tensors besides ``codes_`` (e.g. ``("pool_", "projection_")``), as
        :meth:`bind_state` takes them; after ``fit`` or ``from_state``."""
        return tuple(self._state_tensors)

    def diagnostics(self) -> dict[str, Any]:
        """Numbers about the fit worth a report (e.g. PQ's weight error before and after pooling);
        empty by default. Keys end in ``_`` like the learned state they describe."""
        self._check_fitted()
        return {}

    def _extra_meta(self) -> dict[str, Any]:
        return {}

    def _load_extra_meta(self, meta: dict[str, Any]) -> None:
        pass

    def save(self, path: str | Path) -> None:
        """Write the fitted state to one safetensors file (JSON metadata in its header)."""
        save_tensors(self.state_tensors(), path, metadata={"compresskit": json.dumps(self.state_meta())})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Quantizer":
        """Rebuild a fitted quantizer from :meth:`state_tensors` and :meth:`state_meta`."""
        q = cls(**meta["params"])
        q._validate_params()
        q.shape_ = tuple(meta["shape_"])
        q.dtype_ = meta["dtype_"]
        q._load_extra_meta(meta)
        for name in q._state_tensors:
            setattr(q, name, tensors[name])
        q.codes_ = q._codes_from_stored(tensors["codes_"], meta)
        return q

    # ---- validation -------------------------------------------------------------------------
    def _validate_params(self) -> None:
        """Subclasses raise CompressKitError for out-of-range parameters."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "codes_"):
            raise CompressKitError(f"{self.name}: this quantizer is not fitted yet; call fit(W) first")

    def _check_weight(self, W: torch.Tensor) -> torch.Tensor:
        """Validate a weight and return it as float32 ``[rows, cols]``."""
        if not isinstance(W, torch.Tensor):
            raise CompressKitError(f"{self.name}: expected a torch.Tensor, got {type(W).__name__}")
        if W.dtype not in SUPPORTED_DTYPES:
            raise CompressKitError(f"{self.name}: weights must be float32, float16 or bfloat16, got {W.dtype}")
        if W.dim() < 2:
            raise CompressKitError(
                f"{self.name}: expected a weight of at least 2 dimensions [out, in], got shape {tuple(W.shape)}; "
                "reshape a 1-D tensor to (1, n) or (n, 1)"
            )
        if W.numel() == 0:
            raise CompressKitError(f"{self.name}: the weight is empty (shape {tuple(W.shape)})")
        W2 = W.detach().reshape(W.shape[0], -1).to(torch.float32)
        if not torch.isfinite(W2).all():
            n_bad = int((~torch.isfinite(W2)).sum())
            raise CompressKitError(f"{self.name}: the weight has {n_bad} NaN or infinite values; fix them before quantizing")
        return W2


def _describe(x: Any) -> str:
    """``float32 [3, 4]`` for a tensor, the type name otherwise (for error messages)."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    return type(x).__name__


def check_int(name: str, qname: str, value: Any, lo: int, hi: int) -> None:
    """Raise a one-line error unless ``value`` is an int in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CompressKitError(f"{qname}: {name} must be an integer from {lo} to {hi}, got {value!r}")


def load_quantizer(path: str | Path) -> Quantizer:
    """Read a quantizer written by :meth:`Quantizer.save` (safetensors; no pickle)."""
    from compresskit.registry import get_quantizer

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if "compresskit" not in header:
        raise CompressKitError(f"{path}: not a compresskit quantizer file (no 'compresskit' metadata)")
    meta = json.loads(header["compresskit"])
    return get_quantizer(meta["quantizer"]).from_state(load_file(str(path)), meta)
