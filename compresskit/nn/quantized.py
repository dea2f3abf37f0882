"""Compressed tensors: a fitted quantizer's state, put in place of a module's tensor by parametrize.

:func:`quantize_tensor` registers a :class:`QuantizedTensor` as the ``torch.nn.utils.parametrize``
parametrization of ``owner.attr`` (a layer's ``weight``, or any parameter or buffer). The dense
tensor is dropped (parametrize keeps an empty placeholder in its place), and reading ``owner.attr``
rebuilds the tensor from the codes and codebooks. So the owner keeps its class and its own
``forward``: ``isinstance(m, nn.Linear)`` holds, a subclass's behaviour is kept, and a bare tensor is
compressed by the same mechanism as a layer (see ``docs/core.md``).

State: integer codes are a buffer (``codes``), never trained; float state (PQ pool or codebooks, row
scales, RTN scales and zero points) are ``nn.Parameter`` s with ``requires_grad=False``, which the
EM calibrator switches on to train them through the model. The rebuilt tensor is exactly the
quantizer's ``inverse_transform`` in the stored layout, in the dtype of the placeholder (so
``model.half()`` gives half weights). Under ``torch.no_grad`` with nothing trainable it is cached
until the state changes or moves.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from compresskit.errors import CompressKitError
from compresskit.quantizers.base import Quantizer
from compresskit.targets import Layout


def _attr(state_name: str) -> str:
    return state_name.rstrip("_")


class QuantizedTensor(nn.Module):
    """The parametrization holding one compressed tensor (see module docstring).

    ``quantizer``: fitted, shape ``[out, ...]`` as the layout puts it; ``layout``: how that maps to
    the stored tensor. ``override``: while set (a callable returning the ``[out, ...]`` float32
    tensor), the rebuilt tensor is its result instead — how soft assignments are trained.
    """

    def __init__(self, quantizer: Quantizer, layout: Layout = Layout(), cache: bool = True, stored_dim: int = 2):
        super().__init__()
        self.quantizer = quantizer
        self.layout = layout
        self.stored_dim = stored_dim  # dimensions of the stored tensor (1: a column kept as one row)
        self.cache = cache
        self.override: Callable[[], torch.Tensor] | None = None
        self.register_buffer("codes", quantizer.codes_)
        for name in quantizer.state_names():
            tensor = getattr(quantizer, name)
            if tensor.is_floating_point():
                self.register_parameter(_attr(name), nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(_attr(name), tensor)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._registered = False
        self.bind()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The quantizer's learned tensors as this module holds them now (device, dtype), by state name."""
        return {name: getattr(self, _attr(name)) for name in self.quantizer.state_names()}

    def bind(self) -> Quantizer:
        """Point the quantizer at this module's tensors (after ``.to()`` they are new objects); returns it."""
        self.quantizer.bind_state(self.state_tensors(), self.codes)
        return self.quantizer

    def dequantize(self) -> torch.Tensor:
        """The tensor in the quantizer's ``[out, ...]`` shape, float32: ``inverse_transform`` of this state."""
        q = self.bind()
        return q._inverse(self.codes).reshape(q.shape_)

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        tensors = [self.codes, *self.state_tensors().values()]
        return (*((id(t), t._version, t.device, t.dtype) for t in tensors), dtype)

    def rebuild(self, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in its stored layout and ``dtype`` (cached when nothing can train)."""
        if self.override is not None:
            return self.layout.from_rows(self.override(), self.stored_dim).to(dtype)
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not self.cache or trainable or torch.compiler.is_compiling():
            return self.layout.from_rows(self.dequantize(), self.stored_dim).to(dtype)
        key = self._cache_key(dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.layout.from_rows(self.dequantize(), self.stored_dim).to(dtype).contiguous())
        return self._cache[1]

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.rebuild(placeholder.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # called once by register_parametrization: keep an empty placeholder, not the dense tensor
        if self._registered:
            raise CompressKitError("a compressed tensor cannot be assigned; densify the model first (compresskit.nn.densify)")
        return value.new_empty(0)

    def extra_repr(self) -> str:
        q = self.quantizer
        return f"{q.name}, shape={tuple(q.shape_)}, bits_per_weight={q.size_report().bits_per_weight:.3f}"


def quantize_tensor(owner: nn.Module, attr: str, quantizer: Quantizer, layout: Layout = Layout(), *, cache: bool = True) -> QuantizedTensor:
    """Replace ``owner.attr`` by the fitted ``quantizer``'s state; returns the :class:`QuantizedTensor`.

    The quantizer must be fitted on ``layout.to_rows(owner.attr)`` (same shape). Use
    :func:`share_tensor` to put the same compressed tensor on the other owners of a tied tensor.
    """
    current = getattr(owner, attr, None)
    if not isinstance(current, torch.Tensor):
        raise CompressKitError(f"{type(owner).__name__} has no tensor {attr!r} to compress")
    if is_quantized(owner, attr):
        raise CompressKitError(f"{type(owner).__name__}.{attr} is compressed already")
    expected = tuple(layout.to_rows(current).shape)
    if tuple(quantizer.shape_) != expected:
        raise CompressKitError(f"the quantizer was fitted on shape {tuple(quantizer.shape_)}, but {attr} is {expected} in this layout")
    qt = QuantizedTensor(quantizer, layout, cache=cache, stored_dim=current.dim())
    if not current.is_meta:  # a skeleton built on the meta device keeps the state where it was read
        qt = qt.to(current.device)
    _register(owner, attr, qt, current)
    return qt


def share_tensor(owner: nn.Module, attr: str, qt: QuantizedTensor) -> None:
    """Register an existing :class:`QuantizedTensor` on another owner of the same (tied) tensor."""
    current = getattr(owner, attr, None)
    if not isinstance(current, torch.Tensor):
        raise CompressKitError(f"{type(owner).__name__} has no tensor {attr!r} to share")
    _register(owner, attr, qt, current)


def _register(owner: nn.Module, attr: str, qt: QuantizedTensor, current: torch.Tensor) -> None:
    if current.is_meta:  # a skeleton built on the meta device: the placeholder is real, where the state is
        empty = torch.empty(0, dtype=current.dtype, device=qt.codes.device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(empty, requires_grad=False)
        else:
            owner._buffers[attr] = empty
    qt._registered = False
    try:
        parametrize.register_parametrization(owner, attr, qt, unsafe=True)
    finally:
        qt._registered = True
    placeholder = owner.parametrizations[attr].original
    placeholder.requires_grad_(False)


def is_quantized(module: nn.Module, attr: str) -> bool:
    """Is ``module.attr`` a compressed tensor?"""
    return quantized_of(module, attr) is not None


def quantized_of(module: nn.Module, attr: str) -> QuantizedTensor | None:
    """The :class:`QuantizedTensor` behind ``module.attr``, or None."""
    if not parametrize.is_parametrized(module, attr):
        return None
    found = [p for p in module.parametrizations[attr] if isinstance(p, QuantizedTensor)]
    return found[0] if found else None


def quantized_tensors(model: nn.Module) -> dict[str, tuple[str, str, QuantizedTensor]]:
    """Every compressed tensor of ``model``: ``{target name: (owner name, attr, QuantizedTensor)}``.

    A tensor shared by several owners (tied) is listed once, under its first owner in module order.
    A layer's ``weight`` is named by the layer (``model.layers.0.mlp.up_proj``), any other tensor
    ``owner.attr``.
    """
    out: dict[str, tuple[str, str, QuantizedTensor]] = {}
    seen: set[int] = set()
    for owner_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            qt = quantized_of(module, attr)
            if qt is None or id(qt) in seen:
                continue
            seen.add(id(qt))
            out[target_name(owner_name, attr)] = (owner_name, attr, qt)
    return out


def owners_of(model: nn.Module, qt: QuantizedTensor) -> list[tuple[str, str]]:
    """Every ``(owner name, attr)`` that reads ``qt`` (more than one when the tensor is tied)."""
    found = []
    for owner_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            found += [(owner_name, attr) for attr in module.parametrizations if quantized_of(module, attr) is qt]
    return found


def quantized_prefixes(model: nn.Module) -> list[str]:
    """``state_dict`` key prefixes of every compressed tensor's parametrization (its placeholder and
    its quantizer state), e.g. ``"fc.parametrizations.weight."``."""
    out = []
    for owner_name, module in model.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module):
            out += [f"{owner_name}.parametrizations.{a}.".lstrip(".") for a in module.parametrizations if quantized_of(module, a) is not None]
    return out


def target_name(owner: str, attr: str) -> str:
    """How a tensor target is named: the layer for ``weight``, else ``owner.attr``."""
    return owner if attr == "weight" else (f"{owner}.{attr}" if owner else attr)


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed tensor of ``model`` by a plain one holding its rebuilt value, in place.

    Tied tensors stay tied (one dense tensor for all owners).
    """
    for owner_name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations):
            if quantized_of(module, attr) is not None:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model
