"""The one front door: ``compress(model, config, adapter=..., calibration=...)``, in place.

1. apply the adapter's method defaults (the user's parameters win) and kept-dense targets;
2. find the targets from the model's graph (``compresskit.rewrite``), in execution order, and select
   them (include / exclude / kept dense / per-layer overrides);
3. plan each target's quantizer; one too small for it gets a smaller codebook or stays dense, and
   the report says which and why (an explicit per-layer override that cannot work is an error);
4. fit the quantizers — from the weights alone, or with the calibrator built from the typed
   :class:`CalibrationConfig` on the adapter's data (or ``calibration_data``) — and put each
   compressed tensor in place (``compresskit.nn``);
5. report sizes (all-in) and weight errors per target.

Before 1, the adapter's preparation step (``Adapter.prepare`` with ``CompressConfig.prepare``) may
change the model: a 3DGS scene pruned and fine-tuned. Its record goes to ``report.preparation``.

The CLI parses strings into exactly these arguments and calls this function.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from compresskit.adapters.base import Adapter, LoadedModel
from compresskit.calib.config import CalibrationConfig
from compresskit.config import CompressConfig
from compresskit.errors import CompressKitError
from compresskit.nn import quantize_tensor, share_tensor
from compresskit.report import CompressionReport, LayerReport, dense_size, round_dense
from compresskit.rewrite import find_targets, select_targets
from compresskit.targets import Target

if TYPE_CHECKING:
    from compresskit.calib.calibrator import Calibrator

# (description, index, total): the target being compressed (with the latest block's output error when
# the calibrator measures it), then each EM round's M-step with its loss
Progress = Callable[[str, int, int], None]


def compress(
    model: nn.Module | LoadedModel,
    config: CompressConfig | None = None,
    *,
    adapter: Adapter | None = None,
    calibration: "CalibrationConfig | Calibrator | None" = None,
    calibration_data: Sequence[dict[str, Any]] | None = None,
    example_inputs: tuple[tuple, dict[str, Any]] | None = None,
    progress: Progress | None = None,
    comm=None,
) -> CompressionReport:
    """Compress ``model`` (a module, or the :class:`LoadedModel` an adapter returned) in place.

    ``adapter``: the family's kept-dense targets, method defaults, layouts, blocks and data.
    ``calibration``: how to calibrate (``None``: from the weights alone); its data comes from the
    adapter (then ``model`` must be the ``LoadedModel``) unless ``calibration_data`` is given: a list
    of keyword-argument dicts for ``model(**batch)``, used as they are (one model call each). A
    :class:`~compresskit.calib.Calibrator` built by hand may be passed instead of a config, to keep
    its measurements (``block_errors``) at hand.
    ``example_inputs``: ``(args, kwargs)`` of one forward call, to read the graph with
    ``torch.export`` (default: the adapter's); without any, targets come from the module tree.
    ``comm``: this rank's :class:`~compresskit.distributed.Comm` in a distributed run (torchrun): the
    work is shared between the ranks and every rank ends with the same compressed model, bit for bit
    the one a single process makes (``docs/distributed.md``); None: one process.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.model if loaded is not None else model
    if not isinstance(module, nn.Module):
        raise CompressKitError(f"compress expects a torch.nn.Module or a LoadedModel, got {type(module).__name__}")
    config = _with_adapter_defaults(config or CompressConfig(), adapter).validated()
    if isinstance(calibration, CalibrationConfig):
        calibration = calibration.validated()  # a bad setting fails before a long preparation
    preparation = _prepare(loaded, config, adapter, progress, comm)
    if example_inputs is None and adapter is not None and loaded is not None:
        example_inputs = adapter.example_inputs(loaded)
    args, kwargs = example_inputs or ((), {})
    graph, selection = choose_targets(module, config, adapter, args, kwargs)
    by_name = {t.name: t for t in graph.targets}
    selected = [by_name[n] for n in selection.compress]
    dense = dict(selection.dense)
    notes: dict[str, str] = {}

    def plan(target: Target):
        """A fresh quantizer for ``target``, adapted to its shape; None keeps it dense."""
        return plan_quantizer(config, target, selection.compress[target.name], dense, notes)

    def compress_plain(target: Target) -> LayerReport | None:
        quantizer = plan(target)
        return None if quantizer is None else _compress_from_weight(module, target, quantizer, by_name)

    from compresskit.calib.calibrator import Calibrator

    calibrator = calibration if isinstance(calibration, Calibrator) else None
    if isinstance(calibration, CalibrationConfig):
        from compresskit.calib.build import build_calibrator

        calibrator = build_calibrator(module, loaded, adapter, calibration.validated(), calibration_data, comm=comm)
    elif calibration is not None and calibrator is None:
        raise CompressKitError(f"calibration must be a CalibrationConfig (or a Calibrator), got {type(calibration).__name__}")
    elif calibrator is not None and calibrator.comm is not comm:
        raise CompressKitError("the Calibrator was built for another process group than compress's comm; pass the same comm= to both")
    if calibrator is not None:
        _check_settings_apply(config, calibrator.config, selected)
    tied = [t for t in selected if t.tied_to]
    untied = [t for t in selected if not t.tied_to]
    if calibrator is not None:
        reports = calibrator.run(module, untied, plan, compress_plain, layer_report, progress)
    elif comm is not None:
        reports = _compress_shared_weights(comm, module, untied, plan, progress, len(selected))
    else:
        reports = []
        for i, target in enumerate(untied):
            if progress is not None:
                progress(target.name, i, len(selected))
            reports.append(compress_plain(target))
    done = {t.name for t in untied}
    for target in tied:  # a tied tensor once, from its first holder, shared with the others
        if not done.intersection((target.name, *target.tied_to)):
            done.add(target.name)
            reports.append(compress_plain(target))
    if progress is not None:
        progress("", len(selected), len(selected))
    if comm is not None:
        comm.barrier()  # every rank has the whole compressed model: the others may leave now
    dtype = getattr(torch, config.dense_dtype)
    round_dense(module, dtype)
    report = CompressionReport([r for r in reports if r is not None], dense_size(module, torch.finfo(dtype).bits), graph.method, graph.fallback_reason)
    report.kept_dense = dense
    report.notes = notes
    report.dense_dtype = config.dense_dtype
    report.calibration = {} if calibrator is None else {**calibrator.config.to_dict(), "asymmetric_used": calibrator.asymmetric}
    report.preparation = preparation
    return report


def _prepare(loaded: LoadedModel | None, config: CompressConfig, adapter: Adapter | None, progress, comm) -> dict[str, Any]:
    """Run the family's preparation step (:meth:`Adapter.prepare`) with ``config.prepare``; its record."""
    if adapter is None:
        if config.prepare:
            raise CompressKitError(f"preparation options {', '.join(map(repr, config.prepare))} need the model family's adapter: compress(loaded, config, adapter=...)")
        return {}
    settings = adapter.prepare_settings(config.prepare)  # unknown names, wrong types and ranges: one line each
    if not adapter.supports("prepare"):
        return {}
    if loaded is None:
        if config.prepare:
            raise CompressKitError("preparing the model needs the LoadedModel the adapter returned: compress(loaded, ...)")
        return {}
    if comm is not None and config.prepare:
        raise CompressKitError("preparation options cannot run distributed yet; run them in one process (no torchrun)")
    return adapter.prepare(loaded, settings, progress)


def choose_targets(module: nn.Module, config: CompressConfig, adapter: Adapter | None, args: tuple = (), kwargs: dict | None = None):
    """``(TargetGraph, Selection)``: the targets found (from the graph when example inputs are given)
    and which of them to compress, with the adapter's layouts, bare tensors and kept-dense entries."""
    graph = find_targets(
        module, args, kwargs or {}, include_embeddings=config.include_embeddings, use_graph=bool(args or kwargs),
        layouts=adapter.layouts() if adapter else None, tensors=adapter.extra_targets(module) if adapter else None,
    )
    family = tuple((pattern, spec) for pattern, spec, _ in adapter.target_methods) if adapter else ()
    selection = select_targets(
        graph.targets, include=config.include or ("*",), exclude=config.exclude,
        keep_dense=_kept_dense(module, config, adapter), overrides=family + config.overrides,  # the user's win: the last match counts
    )
    if not selection.compress:
        raise CompressKitError("no layer was selected for compression; check the include/exclude patterns")
    return graph, selection


def plan_quantizer(config: CompressConfig, target: Target, override: dict, dense: dict[str, str], notes: dict[str, str]):
    """A fresh quantizer for ``target`` (its override, or the config's), adapted to its shape; None
    keeps it dense. What was adapted, or why it stays dense, goes to ``notes`` / ``dense``; an
    explicit override that cannot fit is an error."""
    quantizer = config.layer_quantizer(override)
    adapted, why = quantizer.adapt_to_shape(target.weight_shape)
    if adapted is quantizer:
        return quantizer
    if override:
        raise CompressKitError(f"layer {target.name!r}: the override {override} cannot be applied: {why}")
    if adapted is None:
        dense[target.name] = why
    else:
        notes[target.name] = why
    return adapted


def _with_adapter_defaults(config: CompressConfig, adapter: Adapter | None) -> CompressConfig:
    """``config`` with the adapter's ``method_defaults`` under its own. An adapter's defaults at one
    width (``"pq:1"``) are a layout: where the config's own defaults for that method set any of its
    keys, the adapter's layout is left out whole (as :meth:`CompressConfig.params_for` does for user parameters)."""
    if adapter is None or not adapter.method_defaults:
        return config
    defaults = {key: dict(params) for key, (params, _) in adapter.method_defaults.items()}
    for key in [k for k in defaults if ":" in k]:
        if set(defaults[key]) & set(config.method_defaults.get(key.split(":", 1)[0], {})):
            del defaults[key]
    for method, params in config.method_defaults.items():
        defaults[method] = {**defaults.get(method, {}), **params}
    return replace(config, method_defaults=defaults)


def _kept_dense(model: nn.Module, config: CompressConfig, adapter: Adapter | None) -> list[tuple[str, str]]:
    keep = [(pattern, "kept dense by the user") for pattern in config.keep_dense]
    if adapter is not None:
        keep += list(adapter.keep_dense)
        if not config.include_embeddings:
            keep += [(name, f"{why}; compress it with include_embeddings=True (CLI --embeddings)") for name, why in adapter.embeddings(model).items()]
    return keep


def _check_settings_apply(config: CompressConfig, calibration: CalibrationConfig, targets: list[Target]) -> None:
    """Layer-objective settings that no selected quantizer can use would do nothing: refuse them (not those a
    family's recipe chose, ``calibration.from_family``: a recipe serves every method the family runs)."""
    changed = [k for k in ("e_sweeps", "e_init", "local_rounds", "cg_iters") if k in calibration.changed_by_caller()]
    if not changed:
        return
    if not any(config.layer_quantizer(o).supports_codebook_update for o in [None, *(o for _, o in config.overrides)]):
        raise CompressKitError(f"{', '.join(changed)} would do nothing: they tune codebook quantizers, and {config.method!r} is not one")


def _compress_from_weight(model: nn.Module, target: Target, quantizer, by_name: dict[str, Target]) -> LayerReport:
    """Fit ``quantizer`` on the target's weight alone and put it in place (on every holder of a tied tensor)."""
    start = time.perf_counter()
    W = _fit_weight(model, target, quantizer)
    owner = model.get_submodule(target.owner)
    holders = [by_name[n] for n in target.tied_to if n in by_name]
    qt = quantize_tensor(owner, target.attr, quantizer, target.layout)
    for other in holders:
        if other.layout.out_axis != target.layout.out_axis:  # how inputs reach them may differ (embedding, head)
            raise CompressKitError(f"{target.name!r} and {other.name!r} share a tensor stored in different layouts; keep one of them dense")
        share_tensor(model.get_submodule(other.owner), other.attr, qt)
    report = layer_report(target, quantizer, W, time.perf_counter() - start)
    if holders:
        report.extra["shared_with"] = [o.name for o in holders]
    return report


def _fit_weight(model: nn.Module, target: Target, quantizer) -> torch.Tensor:
    """Fit ``quantizer`` on the target's weight alone; returns that weight (as rows)."""
    W = target.layout.to_rows(getattr(model.get_submodule(target.owner), target.attr)).detach()
    try:
        quantizer.fit(W)
    except CompressKitError as err:
        raise CompressKitError(f"layer {target.name!r}: {err}") from None
    return W


def _compress_shared_weights(comm, model: nn.Module, targets: list[Target], plan, progress, total: int) -> list:
    """Weights only, distributed: each rank fits the targets it owns, every rank puts all in place."""
    from compresskit.calib.sharded import SharedFits

    def fit(target: Target, quantizer) -> LayerReport:
        start = time.perf_counter()
        W = _fit_weight(model, target, quantizer)
        return layer_report(target, quantizer, W, time.perf_counter() - start)

    shared, reports = SharedFits(comm), []
    for i, target in enumerate(targets):
        if progress is not None:
            progress(target.name, i, total)
        quantizer, report = shared.take(target, targets, plan, fit)
        if quantizer is not None:
            quantize_tensor(model.get_submodule(target.owner), target.attr, quantizer, target.layout)
        reports.append(report)
    return reports


def layer_report(target: Target, quantizer, W: torch.Tensor, seconds: float) -> LayerReport:
    W_hat = quantizer.inverse_transform().float()
    err = float((W_hat - W.float()).pow(2).sum() / W.float().pow(2).sum().clamp(min=1e-30))
    extra = quantizer.diagnostics()
    params = {k: v for k, v in quantizer.get_params().items() if not (isinstance(v, float) and math.isnan(v))}
    return LayerReport(target.name, quantizer.name, params, tuple(W.shape), quantizer.size_report(), err, seconds, extra)
