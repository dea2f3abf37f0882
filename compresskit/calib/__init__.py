"""Calibration: capture, walk, objectives, one typed config (see ``docs/calibration.md``).

Only ``hessian`` is imported eagerly (quantizers use it); the rest load on first use, which keeps
``compresskit.quantizers`` importable without the module-rewriting machinery.
"""
from importlib import import_module

from compresskit.calib.hessian import HessianAccumulator, conv_inputs

_LAZY = {
    "CalibrationConfig": "config",
    "PRESETS": "config",
    "Calibrator": "calibrator",
    "SoftAssignment": "soft",
    "e_step": "estep",
    "output_error": "estep",
    "reinit_dead": "deadcode",
    "usage_counts": "deadcode",
}

__all__ = ["HessianAccumulator", "conv_inputs", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"compresskit.calib.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'compresskit.calib' has no attribute {name!r}")
