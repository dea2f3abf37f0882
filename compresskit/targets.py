"""Compression targets: named tensors with a layout, whatever module (if any) holds them.

A :class:`Target` is one tensor to compress. For a layer it is the module's ``weight`` and the target
is named by the module (``model.layers.0.mlp.up_proj``); for a bare parameter or buffer (a 3DGS
scene's SH coefficients) it is named ``owner.attr``. The :class:`Layout` says how the quantizer
reads the tensor: which axis holds the output rows (quantizers see ``[out, ...]``, flattened to
``[out, in]``) and how the layer's inputs become rows of ``X`` for calibration's ``X^T X``.

Built-in layouts cover ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Embedding`` and their
subclasses (found by ``isinstance``). Other module types are added with :func:`register_layout`, by
the adapter of the family that uses them (the core never names a family's classes), e.g.
transformers' ``Conv1D``, whose weight is stored ``[in, out]``::

    register_layout(Conv1D, Layout(out_axis=1), kind="linear")
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compresskit.errors import CompressKitError

INPUT_KINDS = ("linear", "conv1d", "conv2d", "none")


@dataclass(frozen=True)
class Layout:
    """How a stored tensor maps to the ``[out, in]`` rows a quantizer fits.

    ``out_axis``: the axis of the stored tensor that holds output rows (0 for ``nn.Linear``'s
    ``[out, in]``, 1 for a weight stored ``[in, out]``); the quantizer fits the tensor with that axis
    moved first. A 1-D tensor ``[n]`` with ``out_axis=1`` is one row ``[1, n]`` (a column of
    per-item scalars, such as a 3DGS scene's opacities, quantized with one scale, not one per value). ``inputs``: how the owner's inputs become rows of ``X`` so that the output is
    ``X @ W2d.T`` — ``linear`` (the last dimension), ``conv1d`` / ``conv2d`` (unfolded kernel
    patches), or ``none`` (no activations reach it: an embedding table, a bare tensor).
    """

    out_axis: int = 0
    inputs: str = "linear"

    def __post_init__(self):
        if self.out_axis not in (0, 1):
            raise CompressKitError(f"Layout.out_axis must be 0 or 1, got {self.out_axis!r}")
        if self.inputs not in INPUT_KINDS:
            raise CompressKitError(f"Layout.inputs must be one of {', '.join(INPUT_KINDS)}, got {self.inputs!r}")

    def to_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The stored tensor as the quantizer sees it: output axis first (a view when possible)."""
        if self.out_axis == 0:
            return tensor
        return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor.transpose(0, 1)

    def from_rows(self, rows: torch.Tensor, stored_dim: int = 2) -> torch.Tensor:
        """Inverse of :meth:`to_rows`: the quantizer's ``[out, ...]`` tensor in the stored layout
        (``stored_dim``: the stored tensor's number of dimensions; 1 undoes the one-row view)."""
        if self.out_axis == 0:
            return rows
        return rows.reshape(-1) if stored_dim == 1 else rows.transpose(0, 1)

    def rows_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape :meth:`to_rows` gives a stored tensor of ``shape``."""
        if self.out_axis == 0:
            return tuple(shape)
        return (1, shape[0]) if len(shape) == 1 else (shape[1], shape[0], *shape[2:])

    def to_json(self) -> dict:
        return {"out_axis": self.out_axis, "inputs": self.inputs}

    @classmethod
    def from_json(cls, data: dict | None) -> "Layout":
        return cls(**(data or {}))


@dataclass(frozen=True)
class Target:
    """One tensor to compress.

    ``aliases`` are other names of the same owner module (reachable twice in the tree); ``tied_to``
    are *other* targets holding the very same tensor (an LM head tied to the embedding): they are
    compressed together, as one tensor, or not at all. ``in_graph`` is False for a layer the traced
    forward never called and for every target found by walking the module tree.
    """

    name: str
    owner: str
    attr: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "embedding" | "tensor"
    shape: tuple[int, ...]  # the stored tensor's shape
    layout: Layout = Layout()
    order: int = 0
    tied_to: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    in_graph: bool = True

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape the quantizer sees: ``[out, ...]`` (the output axis moved first)."""
        return self.layout.rows_shape(self.shape)


# ---- layouts of module types ---------------------------------------------------------------------
_BUILTIN: tuple[tuple[type[nn.Module], str, Layout], ...] = (
    (nn.Linear, "linear", Layout()),
    (nn.Conv1d, "conv1d", Layout(inputs="conv1d")),
    (nn.Conv2d, "conv2d", Layout(inputs="conv2d")),
    (nn.Embedding, "embedding", Layout(inputs="none")),
)
_REGISTERED: dict[type[nn.Module], tuple[str, Layout]] = {}


def register_layout(module_type: type[nn.Module], layout: Layout, kind: str = "linear") -> None:
    """Make ``module_type`` (and its subclasses) a compressible layer whose ``weight`` has ``layout``.

    ``kind`` is the layer kind reported and matched by options such as ``include_embeddings``.
    Registering the same type again with the same layout is a no-op; with another, an error.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise CompressKitError(f"register_layout expects an nn.Module subclass, got {module_type!r}")
    existing = _REGISTERED.get(module_type)
    if existing is not None and existing != (kind, layout):
        raise CompressKitError(f"{module_type.__qualname__} already has the layout {existing[1]} ({existing[0]})")
    _REGISTERED[module_type] = (kind, layout)


def module_layout(module: nn.Module, extra: dict[type[nn.Module], tuple[str, Layout]] | None = None) -> tuple[str, Layout] | None:
    """``(kind, layout)`` of a module whose ``weight`` is a compressible layer's, or None.

    ``extra`` are an adapter's layouts (:meth:`Adapter.layouts`); they and registered types win over
    the built-ins, so a family can describe its own subclass of a built-in type.
    """
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    for cls in type(module).__mro__:
        if extra and cls in extra:
            return extra[cls]
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    for cls, kind, layout in _BUILTIN:
        if isinstance(module, cls):
            return kind, layout
    return None
