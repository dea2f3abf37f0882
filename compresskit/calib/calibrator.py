"""The calibrator: the walk (``walk.py``) and the objectives (``objectives.py``) composed, on data.

It holds a :class:`Walk` (which uses a :class:`BlockObjective` when the block objective is chosen)
and a :class:`ModelObjective` for the EM rounds after it; the parts share the per-target statistics
the walk records for the EM rounds' E-step.

:func:`compresskit.compress` builds one from a :class:`CalibrationConfig` and the family's data and
calls :meth:`Calibrator.run`; the calibrator never names a family or a quantizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from compresskit.calib.capture import Clean
from compresskit.calib.config import CalibrationConfig
from compresskit.calib.objectives import BlockObjective, ModelObjective
from compresskit.calib.sharded import refuse_undistributed
from compresskit.calib.walk import Walk
from compresskit.errors import CompressKitError

Batch = dict[str, Any]
Distill = tuple[Callable[[nn.Module, Batch], Any], Callable[[nn.Module, Batch, Any], torch.Tensor]]


class Calibrator:
    """Compresses targets with activation statistics, then runs the configured EM rounds.

    ``blocks``: dotted names of the repeated blocks in execution order, or ``None`` (layer by layer);
    ``batches``: model-call kwargs (already grouped into model calls); ``task_loss(model, batch)``: the
    family's loss (task M-step); ``m_batches``: what the task / distill M-step trains on (default:
    ``batches``); ``distill``: ``(targets_fn, loss_fn)`` for ``m_objective="distill"``; ``clean``: the
    adapter's ``clean_block_call``; ``comm``: this rank's :class:`~compresskit.distributed.Comm`
    for a distributed walk (None: one process; ``docs/distributed.md``); ``latent_lr(target name)``:
    a target's learning rate in quantization in the loop (``latent_steps``; None: ``config.latent_lr``).
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
        loss_keys: Sequence[str] = (),
        comm=None,
        latent_lr: Callable[[str], float | None] | None = None,
    ):
        if not batches:
            raise CompressKitError("calibration needs at least one calibration batch")
        self.config = config = (config or CalibrationConfig()).validated()
        if comm is not None:
            refuse_undistributed(config)
            if not blocks:
                raise CompressKitError("calibration layer by layer (a model without blocks) cannot run distributed yet; run it in one process (no torchrun)")
        self.comm = comm
        self.blocks = list(blocks or [])
        self.batches = list(batches)
        if config.m_objective == "task" and task_loss is None:
            raise CompressKitError("m_objective 'task' needs the family's task loss; pass an adapter that has one")
        if config.m_objective == "distill" and distill is None:
            raise CompressKitError("m_objective 'distill' needs the family's distill_targets and distill_loss")
        if config.m_objective == "block" and not self.blocks:
            raise CompressKitError("m_objective 'block' needs the model's blocks; this model has none (pass an adapter with blocks)")
        # per codebook target, its Hessian and original weight, kept only for whole-model EM rounds
        # (O(sum of n^2 + m n) floats, which is why they are not kept otherwise)
        self.hessians: dict[str, torch.Tensor] = {}
        self.originals: dict[str, torch.Tensor] = {}
        # with latent_steps, every target's tensor before compression: where its float latent starts
        self.initial: dict[str, torch.Tensor] = {}
        # the walk calls the model on the batches without the entries only the task loss reads
        model_batches = [{k: v for k, v in b.items() if k not in loss_keys} for b in self.batches]
        self.walk = Walk(config, self.blocks, model_batches, clean, BlockObjective(config), self.hessians, self.originals, comm=comm)
        self.model_objective = ModelObjective(
            config, self.batches, list(m_batches) if m_batches else self.batches, task_loss, distill, self.hessians, self.originals,
            initial=self.initial, latent_lr=latent_lr,
        )

    # what the parts measured, for callers that keep the calibrator
    @property
    def block_errors(self) -> dict[str, float]:
        return self.walk.block_errors

    @property
    def block_losses(self) -> dict[str, float]:
        return self.walk.block_losses

    @property
    def asymmetric(self) -> bool:
        return self.walk.asymmetric

    @property
    def m_batches(self) -> list[Batch]:
        return self.model_objective.m_batches

    @property
    def m_teacher(self) -> dict[int, Any]:
        return self.model_objective.m_teacher

    def run(self, model: nn.Module, targets: list, plan, compress_plain, report, progress=None) -> list:
        """Compress ``targets`` of ``model``; returns one report per compressed target.

        ``plan(target)`` gives a fresh quantizer for a target (None: keep it dense), ``compress_plain(target)``
        compresses one from its weight alone, ``report(target, quantizer, W, seconds)`` describes a
        compressed one (all three come from :func:`compresskit.compress`).
        """
        if self.model_objective.distilling():
            self.model_objective.take_teacher(model)
        if self.config.latent_steps:
            with torch.no_grad():
                for t in targets:
                    self.initial[t.name] = t.layout.to_rows(getattr(model.get_submodule(t.owner), t.attr)).detach().float().clone()
        reports = self.walk.run(model, targets, plan, compress_plain, report, progress)
        for r in range(self.config.em_rounds):
            self.em_round(model, progress=progress, label=f"EM round {r + 1}/{self.config.em_rounds}")
        return sized_as_stored(model, reports) if self.config.em_rounds else reports

    def em_round(self, model: nn.Module, progress=None, label: str = "EM round") -> float:
        """One whole-model EM round (:meth:`ModelObjective.em_round`)."""
        return self.model_objective.em_round(model, progress=progress, label=label)


def sized_as_stored(model: nn.Module, reports: list) -> list:
    """``reports`` with each compressed tensor's size (and diagnostics) as its quantizer now stores it.
    An EM round changes codes, and a variable-rate coding (``morton``: gaps between Morton keys) costs
    what the codes it ends with cost; for every other quantizer the size is the same."""
    from compresskit.nn import quantized_tensors

    live = {name: qt.quantizer for name, (_, _, qt) in quantized_tensors(model).items()}
    return [r if r is None or r.name not in live
            else dataclasses.replace(r, size=live[r.name].size_report(), extra={**r.extra, **live[r.name].diagnostics()})
            for r in reports]


def batched(batches: list[Batch], size: int) -> list[Batch]:
    """Concatenate one-sample batches into groups of ``size`` along the first dimension (fewer, larger
    model calls); values that are not tensors are taken from the group's first batch."""
    out = []
    for i in range(0, len(batches), size):
        group = batches[i : i + size]
        out.append({k: torch.cat([b[k] for b in group]) if torch.is_tensor(v) else v for k, v in group[0].items()})
    return out
