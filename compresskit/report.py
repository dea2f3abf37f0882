"""What a compression run did, per layer and in total, in bits (all-in) and relative error."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compresskit.quantizers.sizes import SizeReport

BASELINE_BITS = 16  # the uncompressed reference is the FP16 model


@dataclass
class LayerReport:
    name: str
    method: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    size: SizeReport
    rel_error: float  # ||W - W_hat||^2 / ||W||^2 of the weight
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # the quantizer's diagnostics, e.g. error before/after pooling

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = self.size.to_dict()
        d["bits_per_weight"] = self.size.bits_per_weight
        return d


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    dense: SizeReport  # everything kept dense (embeddings, norms, biases...), as stored
    graph_method: str  # "symbolic_trace" | "export" | "module_tree"
    graph_note: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {"before": {...}, "after": {...}}
    kept_dense: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed dense
    notes: dict[str, str] = field(default_factory=dict)  # layer name -> how its quantizer was adapted to it
    dense_dtype: str = "float16"
    calibration: dict[str, Any] = field(default_factory=dict)  # the CalibrationConfig used ({}: none)
    preparation: dict[str, Any] = field(default_factory=dict)  # what Adapter.prepare did ({}: nothing)

    @property
    def compressed(self) -> SizeReport:
        total = SizeReport(0, {})
        for layer in self.layers:
            total = total + layer.size
        return total

    @property
    def total(self) -> SizeReport:
        return self.compressed + self.dense

    @property
    def original_bits(self) -> int:
        return self.total.n_weights * BASELINE_BITS

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph_method": self.graph_method,
            "graph_note": self.graph_note,
            "n_layers_compressed": len(self.layers),
            "compressed_layers": self.compressed.to_dict(),
            "dense": self.dense.to_dict(),
            "total": self.total.to_dict(),
            "original_fp16_bytes": self.original_bits / 8,
            "compressed_bytes": self.total.total_bytes,
            "ratio": self.original_bits / max(1, self.total.total_bits),
            "bits_per_weight_all_in": self.total.bits_per_weight,
            "bits_per_weight_compressed_layers": self.compressed.bits_per_weight,
            "metrics": self.metrics,
            "kept_dense": self.kept_dense,
            "notes": self.notes,
            "dense_dtype": self.dense_dtype,
            "calibration": self.calibration,
            "preparation": self.preparation,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def unique_dense_tensors(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Persistent tensors of ``model`` that are not compressed-tensor state, tied ones listed once.

    Compressed layers contribute only their other tensors (biases) here; their codes, pool,
    codebooks and scales are accounted by the quantizer's own size report, and the empty
    placeholder parametrize keeps in a compressed tensor's place is no tensor of the model.
    ``exclude``: submodule names whose tensors are left out (a streamed run's blocks, on meta).
    """
    from compresskit.nn import quantized_prefixes

    skip = tuple(quantized_prefixes(model)) + tuple(f"{name}." for name in exclude)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(skip):
            continue
        key = (tensor.data_ptr(), tensor.numel()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def dense_size(model: nn.Module, float_bits: int = BASELINE_BITS, exclude: tuple[str, ...] = ()) -> SizeReport:
    """Size of everything not compressed (outside ``exclude``): floats at ``float_bits``, ints at their own width."""
    n, bits = 0, 0
    for tensor in unique_dense_tensors(model, exclude).values():
        n += tensor.numel()
        bits += tensor.numel() * (float_bits if tensor.is_floating_point() else tensor.element_size() * 8)
    return SizeReport(n, {"dense": bits})


def round_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every dense float tensor of ``model`` to ``dtype`` in place (keeping its own dtype)."""
    with torch.no_grad():
        for tensor in unique_dense_tensors(model).values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))
