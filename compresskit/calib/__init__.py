"""Calibration: streaming statistics of layer inputs (one block at a time), GPTQ's Hessians, and the
EM calibrator's pieces (activation-aware E-step, dead-centroid re-initialisation, soft assignments)."""
from compresskit.calib.deadcode import reinit_dead, usage_counts
from compresskit.calib.estep import e_step, output_error
from compresskit.calib.hessian import HessianAccumulator, conv_inputs
from compresskit.calib.soft import SoftAssignment
from compresskit.calib.stream import BlockwiseCalibrator, CalibConfig

__all__ = [
    "BlockwiseCalibrator",
    "CalibConfig",
    "HessianAccumulator",
    "SoftAssignment",
    "conv_inputs",
    "e_step",
    "output_error",
    "reinit_dead",
    "usage_counts",
]
