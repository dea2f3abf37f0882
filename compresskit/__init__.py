"""compresskit: compress generative models to 1-4 bits per weight with pluggable quantizers.

One front door: ``compresskit.compress(model, CompressConfig(method="pq", bits=2), adapter=...,
calibration=CalibrationConfig.preset("fast"))`` compresses the model's tensors in place and returns a
report; ``compresskit.save`` / ``compresskit.load`` write and read the safe directory format.
"""
__version__ = "0.1.0"

from compresskit.calib.config import CalibrationConfig
from compresskit.compress import compress
from compresskit.config import CompressConfig
from compresskit.errors import CompressKitError
from compresskit.io import load, save
from compresskit.registry import available_quantizers, get_quantizer, register_quantizer

__all__ = [
    "CalibrationConfig",
    "CompressConfig",
    "CompressKitError",
    "available_quantizers",
    "compress",
    "get_quantizer",
    "load",
    "register_quantizer",
    "save",
    "__version__",
]
