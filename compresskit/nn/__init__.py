"""Compressed tensors: a quantizer's state in place of a module's tensor (``torch.nn.utils.parametrize``)."""
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

__all__ = [
    "QuantizedTensor",
    "densify",
    "is_quantized",
    "owners_of",
    "quantize_tensor",
    "quantized_of",
    "quantized_prefixes",
    "quantized_tensors",
    "share_tensor",
    "target_name",
]
