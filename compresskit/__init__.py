"""compresskit: compress generative models to 1-4 bits per weight with pluggable quantizers."""
from compresskit.errors import CompressKitError
from compresskit.registry import available_quantizers, get_quantizer, register_quantizer

__version__ = "0.1.0"

__all__ = ["CompressKitError", "available_quantizers", "get_quantizer", "register_quantizer", "__version__"]
