"""The one front door: ``compress(model, config)`` replaces layers by compressed ones, in place.

1. find the compressible layers from the model's graph (``compresskit.rewrite``), in execution order;
2. select them (include / exclude / kept dense / per-layer overrides);
3. fit each layer's quantizer on its weight and swap in the compressed module;
4. report sizes (all-in) and weight errors per layer.

Calibration (GPTQ, the EM calibrator) plugs in through ``calibrator``: an object whose
``run(model, layers, make_quantizer, report_layer, compress_plain, progress)`` does step 3 with
activations.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from compresskit.config import CompressConfig
from compresskit.errors import CompressKitError
from compresskit.nn import qmodule_for
from compresskit.report import CompressionReport, LayerReport, dense_size, round_dense
from compresskit.rewrite import find_layers, replace_module, select_layers

# (description, index, total): the layer being compressed (with the latest block's output error when
# the calibrator measures it), then each EM round's M-step with its loss
Progress = Callable[[str, int, int], None]


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    *,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    keep_dense: Sequence[str] = (),
    calibrator=None,
    progress: Progress | None = None,
) -> CompressionReport:
    """Compress ``model`` in place according to ``config``; returns the report.

    ``example_args``/``example_kwargs`` are a small model input used to read the graph
    (``torch.export``); without them layers are found by walking the module tree.
    ``keep_dense`` are fnmatch patterns of layers to leave dense (an adapter's defaults).
    ``calibrator`` (e.g. :class:`compresskit.calib.BlockwiseCalibrator`) compresses the selected
    layers with activation statistics instead of from the weights alone.
    """
    config = (config or CompressConfig()).validated()
    graph = find_layers(
        model, example_args, example_kwargs, include_embeddings=config.include_embeddings, use_graph=bool(example_args or example_kwargs)
    )
    selection = select_layers(
        graph.layers,
        include=config.include or ("*",),
        exclude=config.exclude,
        keep_dense=tuple(keep_dense) + tuple(config.keep_dense),
        overrides=config.overrides,
    )
    if not selection.compress:
        raise CompressKitError("no layer was selected for compression; check the include/exclude patterns")
    def compress_plain(name: str, override: dict[str, Any]) -> LayerReport:
        return _compress_layer(model, name, model.get_submodule(name), config.layer_quantizer(override))

    if calibrator is not None:
        layers = calibrator.run(model, selection.compress, config.layer_quantizer, layer_report, compress_plain, progress)
    else:
        layers = []
        for i, (name, override) in enumerate(selection.compress.items()):
            if progress is not None:
                progress(name, i, len(selection.compress))
            layers.append(compress_plain(name, override))
    if progress is not None:
        progress("", len(selection.compress), len(selection.compress))
    dtype = getattr(torch, config.dense_dtype)
    round_dense(model, dtype)
    report = CompressionReport(layers, dense_size(model, torch.finfo(dtype).bits), graph.method, graph.fallback_reason)
    report.kept_dense = dict(selection.dense)
    report.dense_dtype = config.dense_dtype
    return report


def _compress_layer(model: nn.Module, name: str, module: nn.Module, quantizer) -> LayerReport:
    qcls = qmodule_for(module)
    if qcls is None:
        raise CompressKitError(f"layer {name!r} is a {type(module).__name__}, which compresskit cannot compress; exclude it")
    start = time.perf_counter()
    W = module.weight.detach()
    try:
        qmodule = qcls.from_module(module, quantizer)
    except CompressKitError as err:
        raise CompressKitError(f"layer {name!r}: {err}") from None
    replace_module(model, name, qmodule)
    return layer_report(name, qmodule.quantizer, W, time.perf_counter() - start)


def layer_report(name: str, quantizer, W: torch.Tensor, seconds: float) -> LayerReport:
    W_hat = quantizer.inverse_transform().float()
    err = float((W_hat - W.float()).pow(2).sum() / W.float().pow(2).sum().clamp(min=1e-30))
    extra = {k: getattr(quantizer, k) for k in ("error_before_pool_", "error_after_pool_", "share_") if hasattr(quantizer, k)}
    params = {k: v for k, v in quantizer.get_params().items() if not (isinstance(v, float) and math.isnan(v))}
    return LayerReport(name, quantizer.name, params, tuple(W.shape), quantizer.size_report(), err, seconds, extra)
