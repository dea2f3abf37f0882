"""Compressed modules that rebuild their weight from a fitted quantizer."""
from compresskit.nn.modules import (
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedModule,
    densify,
    qmodule_for,
    register_qmodule,
)

__all__ = [
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedModule",
    "densify",
    "qmodule_for",
    "register_qmodule",
]
