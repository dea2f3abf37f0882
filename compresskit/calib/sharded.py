"""The walk across ranks: statistics combined in batch order, layers fitted by their owner and shared.

Used by :class:`~compresskit.calib.walk.Walk` and :func:`compresskit.compress` when they are given a
:class:`~compresskit.distributed.Comm` (``docs/distributed.md``):

* :class:`StepPartials`: one lock-step's per-batch ``X^T X`` (and ``X_q^T X``) contributions of
  this rank, added into the accumulators in the global batch order on every rank, so the sums are
  the single-process sums bit for bit (float addition is not associative: a plain all-reduce of
  per-rank sums would not be);
* :class:`SharedFits`: the layers of one group (a stage: layers reading the same input) planned on
  every rank, fitted by their owner (round-robin over the whole walk), and their quantizer state and
  report broadcast, so every rank puts the same compressed tensor in place;
* :func:`refuse_undistributed`: the settings that cannot run distributed yet, refused up front.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from compresskit.calib.hessian import HessianAccumulator
from compresskit.errors import CompressKitError
from compresskit.quantizers.sizes import SizeReport
from compresskit.registry import get_quantizer
from compresskit.report import LayerReport


def refuse_undistributed(config) -> None:
    """One-line error naming the first setting of ``config`` (a :class:`CalibrationConfig`) that a
    distributed run cannot honour yet."""
    if config.m_objective is not None:
        raise CompressKitError(f"m_objective {config.m_objective!r} cannot run distributed yet; run it in one process (no torchrun)")
    if config.em_rounds > 0:
        raise CompressKitError("em_rounds > 0 cannot run distributed yet; run it in one process (no torchrun)")
    if config.soft_candidates > 0:
        raise CompressKitError("soft_candidates cannot run distributed yet; run it in one process (no torchrun)")


class StepPartials:
    """This rank's statistics contributions of one lock-step (its one calibration batch), in hook order."""

    def __init__(self):
        self.entries: list[tuple[str, torch.Tensor | None, int, torch.Tensor | None]] = []

    def add(self, name: str, partial: tuple[torch.Tensor | None, int], cross: torch.Tensor | None) -> None:
        """A layer's ``(X^T X, rows)`` (:meth:`HessianAccumulator.partial`) and, when asymmetric, its ``X_q^T X``."""
        self.entries.append((name, partial[0], partial[1], cross))

    def combine(self, comm, accs: dict[str, HessianAccumulator], cross: dict[str, torch.Tensor], ran: bool) -> None:
        """Add every rank's contributions of this step, rank by rank (the global batch order), into
        ``accs`` / ``cross`` on every rank; ``ran``: whether this rank had a batch in this step."""
        tensors, meta = None, None
        if ran:
            tensors, meta = {}, []
            for i, (name, xtx, n_rows, c) in enumerate(self.entries):
                if xtx is not None:
                    tensors[f"{i}h"] = xtx
                if c is not None:
                    tensors[f"{i}c"] = c
                meta.append([name, n_rows, xtx is not None, c is not None])
        self.entries = []
        for got, entries in comm.each_in_rank_order(tensors, meta):
            if got is None:
                continue
            for i, (name, n_rows, has_xtx, has_cross) in enumerate(entries):
                if has_xtx:
                    accs[name].add_partial(got[f"{i}h"], n_rows)
                if has_cross:
                    cross[name] += got[f"{i}c"]


class SharedFits:
    """Layers fitted by their owner rank and handed to every rank.

    :meth:`take` is called for each layer of a group in the group's order on every rank; the first
    call plans every layer of the group (on every rank, in order, so what the plan notes is the same
    everywhere), fits this rank's (``owner(i)`` of a counter over the whole walk, so one-layer
    stages still rotate between ranks), then broadcasts each fitted layer from its owner.
    """

    def __init__(self, comm):
        self.comm = comm
        self.n_fitted = 0
        self.ready: dict[str, tuple[Any, LayerReport | None]] = {}

    def take(self, target, group: list, plan: Callable, fit: Callable) -> tuple[Any, LayerReport | None]:
        """``(quantizer, report)`` for ``target`` of ``group`` (``(None, None)``: kept dense);
        ``plan(target)`` gives a fresh quantizer (None: dense), ``fit(target, quantizer) -> report``
        fits it on the owner."""
        if target.name not in self.ready:
            self._fit_group(group, plan, fit)
        return self.ready.pop(target.name)

    def _fit_group(self, group: list, plan: Callable, fit: Callable) -> None:
        planned = [(t, plan(t)) for t in group]
        owners = {}
        for t, quantizer in planned:
            if quantizer is not None:
                owners[t.name] = self.comm.owner(self.n_fitted)
                self.n_fitted += 1
        mine = {t.name: fit(t, q) for t, q in planned if q is not None and owners[t.name] == self.comm.rank}
        for t, quantizer in planned:
            if quantizer is None:
                self.ready[t.name] = (None, None)
            else:
                self.ready[t.name] = share_fit(self.comm, owners[t.name], quantizer, mine.get(t.name))


def share_fit(comm, src: int, quantizer, report: LayerReport | None):
    """``(quantizer, report)`` fitted on rank ``src``, on every rank: ``src`` keeps its own objects,
    the others rebuild the quantizer from its state (``state_tensors`` + ``state_meta``, as the file
    format does) and the report from JSON."""
    mine = comm.rank == src
    tensors = quantizer.state_tensors() if mine else None
    meta = {"state": quantizer.state_meta(), "report": _report_json(report)} if mine else None
    tensors, meta = comm.broadcast_tensors(tensors, src, meta)
    if mine:
        return quantizer, report
    state = meta["state"]
    return get_quantizer(state["quantizer"]).from_state(tensors, state), _report_from_json(meta["report"])


def _report_json(report: LayerReport) -> dict[str, Any]:
    return {
        "name": report.name, "method": report.method, "params": report.params, "shape": list(report.shape),
        "size": [report.size.n_weights, report.size.parts_bits], "rel_error": report.rel_error,
        "seconds": report.seconds, "extra": report.extra,
    }


def _report_from_json(d: dict[str, Any]) -> LayerReport:
    n_weights, parts = d["size"]
    return LayerReport(d["name"], d["method"], d["params"], tuple(d["shape"]), SizeReport(n_weights, parts), d["rel_error"], d["seconds"], d["extra"])
