"""The calibrator: the walk (``walk.py``) and the objectives (``objectives.py``) composed, on data.

:func:`compresskit.compress` builds one from a :class:`CalibrationConfig` and the family's data and
calls :meth:`Calibrator.run`; the calibrator never names a family or a quantizer.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from compresskit.calib.capture import Clean
from compresskit.calib.config import CalibrationConfig
from compresskit.calib.objectives import MSteps
from compresskit.calib.offload import ActivationStore
from compresskit.calib.walk import Walks
from compresskit.errors import CompressKitError

Batch = dict[str, Any]
Distill = tuple[Callable[[nn.Module, Batch], Any], Callable[[nn.Module, Batch, Any], torch.Tensor]]


class Calibrator(Walks, MSteps):
    """Compresses targets with activation statistics, then runs the configured EM rounds.

    ``blocks``: dotted names of the repeated blocks in execution order, or ``None`` (layer by layer);
    ``batches``: model-call kwargs (already grouped into model calls); ``task_loss(model, batch)``: the
    family's loss (task M-step); ``m_batches``: what the task / distill M-step trains on (default:
    ``batches``); ``distill``: ``(targets_fn, loss_fn)`` for ``m_objective="distill"``; ``clean``: the
    adapter's ``clean_block_call``.
    """

    def __init__(
        self,
        blocks: Sequence[str] | None,
        batches: Sequence[Batch],
        task_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        config: CalibrationConfig | None = None,
        *,
        m_batches: Sequence[Batch] | None = None,
        distill: Distill | None = None,
        clean: Clean | None = None,
    ):
        if not batches:
            raise CompressKitError("calibration needs at least one calibration batch")
        self.config = (config or CalibrationConfig()).validated()
        self.blocks = list(blocks or [])
        self.batches = list(batches)
        self.task_loss = task_loss
        self.m_batches = list(m_batches) if m_batches else self.batches
        self.distill = distill
        self.clean = clean
        if self.config.m_objective == "task" and task_loss is None:
            raise CompressKitError("m_objective 'task' needs the family's task loss; pass an adapter that has one")
        if self.config.m_objective == "distill" and distill is None:
            raise CompressKitError("m_objective 'distill' needs the family's distill_targets and distill_loss")
        if self.config.m_objective == "block" and not self.blocks:
            raise CompressKitError("m_objective 'block' needs the model's blocks; this model has none (pass an adapter with blocks)")
        # the uncompressed model's predictions, taken before the walk: batch index -> targets
        self.teacher: dict[int, Any] = {}
        self.m_teacher: dict[int, Any] = {}
        # kept only for whole-model EM rounds: per codebook target, its Hessian and original weight
        # (O(sum of n^2 + m n) floats, which is why they are not kept otherwise)
        self.hessians: dict[str, torch.Tensor] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.block_losses: dict[str, float] = {}  # block M-step: its last loss
        # relative squared error of each compressed block's output against the original model's
        # (asymmetric walk) or the uncompressed block's on the same inputs (block M-step's teacher)
        self.block_errors: dict[str, float] = {}
        self.store = ActivationStore()  # replaced for each walk by one honouring offload_dir
        self.asymmetric = False  # set by the walk: asymmetric targets were used (config asks, blocks chained)

    def run(self, model: nn.Module, targets: list, plan, compress_plain, report, progress=None) -> list:
        """Compress ``targets`` of ``model``; returns one report per compressed target.

        ``plan(target)`` gives a fresh quantizer for a target (None: keep it dense), ``compress_plain(target)``
        compresses one from its weight alone, ``report(target, quantizer, W, seconds)`` describes a
        compressed one (all three come from :func:`compresskit.compress`).
        """
        self._compress_plain, self._report = compress_plain, report
        if self._distilling():
            self._take_teacher(model)
        with ActivationStore(self.config.offload_dir) as self.store:
            reports = self._walk(model, targets, plan, progress)
        for r in range(self.config.em_rounds):
            self.em_round(model, progress=progress, label=f"EM round {r + 1}/{self.config.em_rounds}")
        return reports


def batched(batches: list[Batch], size: int) -> list[Batch]:
    """Concatenate one-sample batches into groups of ``size`` along the first dimension (fewer, larger
    model calls); values that are not tensors are taken from the group's first batch."""
    out = []
    for i in range(0, len(batches), size):
        group = batches[i : i + size]
        out.append({k: torch.cat([b[k] for b in group]) if torch.is_tensor(v) else v for k, v in group[0].items()})
    return out
