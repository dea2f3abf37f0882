"""Calibration: streaming statistics of layer inputs (captured one block at a time)."""
from compresskit.calib.hessian import HessianAccumulator, conv_inputs

__all__ = ["HessianAccumulator", "conv_inputs"]
