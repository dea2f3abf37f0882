"""Assemble a :class:`Calibrator` from a :class:`CalibrationConfig` and the family's data.

With an adapter, the data come from it (real data, or noise for ``data="zero-data"``), drawn one
sample at a time and grouped ``batch_size`` per model call; the task M-step draws its own
``m_samples`` with ``seed + 1``. Without an adapter, the caller's ``calibration_data`` (model-call
kwargs, used as they are) drives the layer-output objective, layer by layer.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from compresskit.adapters.base import Adapter, LoadedModel
from compresskit.calib.calibrator import Calibrator, batched
from compresskit.calib.config import CalibrationConfig
from compresskit.errors import CompressKitError


def build_calibrator(
    model: nn.Module,
    loaded: LoadedModel | None,
    adapter: Adapter | None,
    config: CalibrationConfig,
    data: Sequence[dict[str, Any]] | None = None,
    comm=None,
) -> Calibrator:
    """The calibrator for ``config``; ``data`` (model-call kwargs) replaces the adapter's data;
    ``comm``: this rank's :class:`~compresskit.distributed.Comm` (None: one process)."""
    if data is not None:
        if not data or not all(isinstance(b, dict) for b in data):
            raise CompressKitError("calibration_data must be a non-empty list of keyword-argument dicts for model(**batch)")
        defaults = CalibrationConfig()
        unused = [k for k in ("data", "source", "options", "n_samples", "batch_size", "m_samples", "m_batch") if getattr(config, k) != getattr(defaults, k)]
        if unused:
            raise CompressKitError(f"{', '.join(unused)} would do nothing: calibration_data is used as given, one model call per batch")
        batches, m_batches = list(data), None
    elif adapter is None:
        raise CompressKitError("calibration needs data: pass calibration_data=[{...model kwargs...}] or an adapter")
    elif loaded is None:
        raise CompressKitError("calibrating with the adapter's data needs the LoadedModel the adapter returned: compress(loaded, ...)")
    else:
        spec = adapter.calib_spec(config.source, config.n_samples, config.seed, config.options)
        draw = adapter.noise_batches if config.data == "zero-data" else adapter.calibration_batches
        samples = draw(loaded, spec)
        batches = batched(samples, config.batch_size)
        m_batches = None
        if config.m_objective in ("task", "distill"):
            if config.m_samples:
                m_spec = adapter.calib_spec(config.source, config.m_samples, config.seed + 1, config.options)
                m_batches = batched(adapter.calibration_batches(loaded, m_spec), config.m_batch)
            else:
                m_batches = batched(samples, config.m_batch)
    if adapter is None and config.m_objective in ("task", "distill", "block"):
        raise CompressKitError(f"m_objective {config.m_objective!r} needs an adapter (its task loss, distillation or blocks)")
    task_loss = adapter.task_loss if adapter is not None and adapter.supports("task_loss") else None
    distill = None
    if config.m_objective == "distill":
        if not adapter.supports("distill_loss"):
            raise CompressKitError(f"the {adapter.name!r} adapter has no distillation loss; use m_objective 'task' or 'block'")
        distill = (adapter.distill_targets, adapter.distill_loss)
    return Calibrator(
        adapter.blocks(model) if adapter is not None else None,
        batches,
        task_loss,
        config,
        m_batches=m_batches,
        distill=distill,
        clean=adapter.clean_block_call if adapter is not None else None,
        loss_keys=adapter.loss_keys if adapter is not None else (),
        comm=comm,
        latent_lr=(lambda name: adapter.latent_lr(loaded, name)) if adapter is not None and loaded is not None else None,
    )
