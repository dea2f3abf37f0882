"""Compressed layers: Linear / Conv1d / Conv2d / Embedding whose weight is rebuilt from a quantizer.

A compressed module holds a fitted quantizer's state as its own tensors, so ``.to()``,
``state_dict`` and autograd work as for any module:

* integer codes are buffers (``codes``), never trained;
* float state (PQ pool or codebooks, RTN scales and zero points) are ``nn.Parameter`` s with
  ``requires_grad=False``; the EM calibrator switches them on to train codebooks through the model.

``weight`` is exactly the quantizer's ``inverse_transform`` (same ops, same state), cast to the
module's compute dtype. Under ``torch.no_grad`` (or with nothing trainable) the rebuilt weight is
cached until the state changes or moves; ``cache_weight=False`` turns that off to save memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresskit.quantizers.base import Quantizer

_QMODULES: dict[type, type] = {}


def register_qmodule(source: type):
    """Class decorator: the compressed counterpart of ``source`` (e.g. ``nn.Linear``)."""

    def decorate(cls):
        _QMODULES[source] = cls
        return cls

    return decorate


def qmodule_for(module: nn.Module) -> type | None:
    """The compressed class for ``module``'s exact type, or None if it has none."""
    return _QMODULES.get(type(module))


def _attr(state_name: str) -> str:
    return state_name.rstrip("_")


class QuantizedModule(nn.Module):
    """Base: owns the quantizer state and rebuilds the weight; subclasses define ``forward``."""

    def __init__(self, quantizer: Quantizer, bias: torch.Tensor | None, cache_weight: bool = True):
        super().__init__()
        self.quantizer = quantizer
        self.cache_weight = cache_weight
        self.register_buffer("codes", quantizer.codes_)
        for name in quantizer._state_tensors:
            tensor = getattr(quantizer, name)
            if tensor.is_floating_point():
                self.register_parameter(_attr(name), nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(_attr(name), tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_module(cls, module: nn.Module, quantizer: Quantizer, **kwargs) -> "QuantizedModule":
        """Fit ``quantizer`` on ``module.weight`` (unless already fitted) and wrap the result."""
        if not hasattr(quantizer, "codes_"):
            quantizer.fit(module.weight.detach())
        qmodule = cls(quantizer, getattr(module, "bias", None), **kwargs)
        qmodule._copy_config(module)
        return qmodule.to(module.weight.device)

    def _copy_config(self, module: nn.Module) -> None:
        """Subclasses copy shape/stride/padding... from the source module."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The quantizer's learned tensors as this module currently holds them (device/dtype)."""
        return {name: getattr(self, _attr(name)) for name in self.quantizer._state_tensors}

    def _sync(self) -> None:
        q = self.quantizer
        for name, tensor in self.state_tensors().items():
            setattr(q, name, tensor)
        q.codes_ = self.codes

    def _cache_key(self) -> tuple:
        tensors = [self.codes, *self.state_tensors().values()]
        return tuple((id(t), t._version, t.device, t.dtype) for t in tensors)

    def dequantize(self) -> torch.Tensor:
        """The full weight in float32, exactly ``quantizer.inverse_transform`` on this state."""
        self._sync()
        return self.quantizer._inverse(self.codes).reshape(self.quantizer.shape_)

    def _adopt(self, old: "QuantizedModule") -> "QuantizedModule":
        """Take over ``old``'s per-type configuration (conv arguments, features); returns self."""
        for key, value in vars(old).items():
            if not key.startswith("_") and key not in ("training", "quantizer", "cache_weight"):
                setattr(self, key, value)
        return self.to(old.codes.device)

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        soft = self.__dict__.pop("_soft_weight", None)  # set by the calibrator's soft-assignment hook
        if soft is not None:
            return soft.to(dtype)
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not self.cache_weight or trainable or torch.compiler.is_compiling():
            return self.dequantize().to(dtype)
        key = (*self._cache_key(), dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dequantize().to(dtype))
        return self._cache[1]

    @property
    def weight(self) -> torch.Tensor:
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.weight_for(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        report = self.quantizer.size_report()
        return f"{self.quantizer.name}, shape={tuple(self.quantizer.shape_)}, bits_per_weight={report.bits_per_weight:.3f}"


@register_qmodule(nn.Linear)
class QuantizedLinear(QuantizedModule):
    def _copy_config(self, module: nn.Linear) -> None:
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x.dtype), self._bias(x.dtype))

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _fill(dense, self)


@register_qmodule(nn.Conv2d)
class QuantizedConv2d(QuantizedModule):
    def _copy_config(self, module: nn.Conv2d) -> None:
        self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        if module.padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d padding_mode={module.padding_mode!r} is not supported yet; keep this layer dense")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_for(x.dtype), self._bias(x.dtype), **self.conv_args)

    def to_dense(self) -> nn.Module:
        shape = self.quantizer.shape_  # [out, in / groups, *kernel]
        conv = nn.Conv1d if isinstance(self, QuantizedConv1d) else nn.Conv2d
        dense = conv(shape[1] * self.conv_args["groups"], shape[0], tuple(shape[2:]), bias=self.bias is not None, **self.conv_args)
        return _fill(dense, self)


@register_qmodule(nn.Conv1d)
class QuantizedConv1d(QuantizedConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight_for(x.dtype), self._bias(x.dtype), **self.conv_args)


@register_qmodule(nn.Embedding)
class QuantizedEmbedding(QuantizedModule):
    def _copy_config(self, module: nn.Embedding) -> None:
        self.padding_idx = module.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_for(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_for(torch.float32), self.padding_idx)

    def to_dense(self) -> nn.Embedding:
        rows, cols = self.quantizer.shape_
        return _fill(nn.Embedding(rows, cols, self.padding_idx), self)


def _fill(dense: nn.Module, qmodule: QuantizedModule) -> nn.Module:
    """Copy ``qmodule``'s rebuilt weight (and bias) into a plain module of the same kind."""
    with torch.no_grad():
        dense.weight.copy_(qmodule.dequantize())
        if qmodule.bias is not None:
            dense.bias.copy_(qmodule.bias)
    return dense.to(qmodule.codes.device)


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed module of ``model`` by a plain one holding its rebuilt weight (in place)."""
    from compresskit.rewrite import replace_module

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedModule):
            replace_module(model, name, module.to_dense())
    return model
