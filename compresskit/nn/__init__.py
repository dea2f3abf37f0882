"""Compressed tensors: a quantizer's state in place of a module's tensor (``torch.nn.utils.parametrize``),
and the LUT forward that serves codebook-compressed Linear layers at batch 1 without rebuilding them."""
from compresskit.nn.quantized import (
    QuantizedTensor,
    densify,
    is_quantized,
    owners_of,
    quantize_tensor,
    quantized_of,
    quantized_prefixes,
    quantized_tensors,
    share_tensor,
    target_name,
)
from compresskit.nn.lut import LutReport, disable_lut, enable_lut, lut_linear

__all__ = [
    "LutReport",
    "QuantizedTensor",
    "densify",
    "disable_lut",
    "enable_lut",
    "is_quantized",
    "lut_linear",
    "owners_of",
    "quantize_tensor",
    "quantized_of",
    "quantized_prefixes",
    "quantized_tensors",
    "share_tensor",
    "target_name",
]
