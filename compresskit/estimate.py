"""Size of a whole model under a :class:`CompressConfig`, from its shapes alone: no weights, no fitting.

``estimate_model(model, config, adapter=None)`` sizes what :func:`compresskit.compress` with the
same arguments would produce, counted the way its report counts: the same targets (found from the
module tree), the adapter's kept-dense targets, embeddings and method defaults, the same quantizer
per target after ``adapt_to_shape``, sized by ``Quantizer.estimate(shape, **params)``; everything
else (biases, norms, buffers such as a fixed positional table, layers kept dense) at the dense dtype
(floats; integers at their own width). A tensor held by several modules or names is counted once,
as the file stores it once. A model on the meta device works the same.

What a fitted quantizer may store differently: a PQ pool holds at most ``N'`` entries and fewer
when k-means centroids merge, so for PQ the estimate is an upper bound (equal in practice).

``estimate_spec(spec, config)`` asks the adapter for the architecture without weights when it can
(an adapter with ``meta_model(spec)``, see :class:`BuildsMetaModel`), else loads the model.
Sizes in bytes and in MB are decimal: 1 MB = 10^6 bytes.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from compresskit.adapters.base import Adapter, LoadedModel
from compresskit.compress import _with_adapter_defaults, choose_targets, plan_quantizer
from compresskit.config import CompressConfig
from compresskit.errors import CompressKitError
from compresskit.report import BASELINE_BITS

MB = 1e6  # bytes


@runtime_checkable
class BuildsMetaModel(Protocol):
    """An adapter that can build a model's architecture on the meta device (shapes, no weights)."""

    def meta_model(self, spec: str | None) -> LoadedModel: ...


def estimate_spec(spec: str | None, config: CompressConfig | None = None, adapter: Adapter | str | None = None) -> dict[str, Any]:
    """:func:`estimate_model` of the model named by ``spec`` (alias, file, directory, hub id), built
    without weights when its adapter can (``result["weights"]`` says "none" or "loaded")."""
    from compresskit.adapters import adapter_for, get_adapter

    if isinstance(adapter, str):
        adapter = get_adapter(adapter)()
    adapter = adapter or adapter_for(spec)()
    meta = isinstance(adapter, BuildsMetaModel)
    loaded = adapter.meta_model(spec) if meta else adapter.load(spec)
    result = estimate_model(loaded, config, adapter=adapter)
    notes = {}
    if loaded.extras.get("shared"):
        notes["shared"] = f"{len(loaded.extras['shared'])} copies tied to one module by the adapter ({loaded.extras.get('shared_how')}): {loaded.extras['shared']}"
    return {"model": loaded.source, "resolved": loaded.resolved, "adapter": adapter.name, "weights": "none" if meta else "loaded", **result,
            "adapter_notes": notes}


def estimate_model(model: nn.Module | LoadedModel, config: CompressConfig | None = None, adapter: Adapter | None = None) -> dict[str, Any]:
    """Sizes of ``model`` compressed with ``config``: per target, the dense rest, and totals.

    Returns ``{"method", "bits", "params", "layers": [...], "dense": [...], "kept_dense", "notes",
    "counted", "totals"}``: each layer with its shape, quantizer parameters, ``parts_bits`` and MB
    before (FP16) and after; each dense tensor with its shape and bits; ``counted`` the numbers of
    values (parameters and buffers, compressed and dense) and the names that share a tensor counted
    once; ``totals`` as :meth:`CompressionReport.to_dict` names them, plus MB.
    """
    module = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(module, nn.Module):
        raise CompressKitError(f"estimate_model expects a torch.nn.Module or a LoadedModel, got {type(module).__name__}")
    config = _with_adapter_defaults(config or CompressConfig(), adapter).validated()
    graph, selection = choose_targets(module, config, adapter)  # the module tree: no inputs on meta
    by_name = {t.name: t for t in graph.targets}
    dense_reasons, notes = dict(selection.dense), {}
    layers, compressed_keys, done = [], set(), set()
    for name, override in selection.compress.items():
        target = by_name[name]
        if done.intersection((name, *target.tied_to)):
            continue  # a tied tensor once, from its first holder, as compress does
        done.add(name)
        adapted = plan_quantizer(config, target, override, dense_reasons, notes)
        if adapted is None:
            continue
        size = type(adapted).estimate(target.weight_shape, **adapted.get_params())
        compressed_keys.add(_key(getattr(module.get_submodule(target.owner), target.attr)))
        planned = adapted.planned_params(tuple(target.weight_shape))  # automatic choices (PQ's share) resolved
        params = {k: v for k, v in planned.items() if not (isinstance(v, float) and math.isnan(v))}
        layers.append({
            "name": name, "shape": list(target.weight_shape), "method": adapted.name, "params": params,
            **({"shared_with": list(target.tied_to)} if target.tied_to else {}),
            **size.to_dict(), "fp16_mb": size.n_weights * BASELINE_BITS / 8 / MB, "compressed_mb": size.total_bytes / MB,
        })
    dense, counted = _dense(module, compressed_keys, torch.finfo(getattr(torch, config.dense_dtype)).bits)
    return {
        "method": config.method, "bits": config.bits, "params": config.layer_quantizer(None).get_params(),
        "graph_method": graph.method, "layers": layers, "dense": dense, "kept_dense": dense_reasons, "notes": notes,
        "counted": counted, "totals": _totals(layers, dense),
    }


def _key(tensor: torch.Tensor) -> tuple:
    """One key per stored tensor: its storage on a real device; the object itself on meta (no storage)."""
    if tensor.is_meta or not tensor.numel():
        return ("object", id(tensor))
    return ("storage", tensor.data_ptr(), tensor.numel())


def _dense(module: nn.Module, compressed: set[tuple], float_bits: int) -> tuple[list[dict], dict[str, Any]]:
    """Every state-dict tensor not compressed, once each, and what was counted."""
    parameters = {id(p) for p in module.parameters()}
    seen: dict[tuple, dict] = {}
    n_params = n_buffers = 0
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = _key(tensor)
        if key in seen:
            seen[key].setdefault("also", []).append(name)
            continue
        is_param = id(tensor) in parameters
        n_params += tensor.numel() if is_param else 0
        n_buffers += 0 if is_param else tensor.numel()
        bits = float_bits if tensor.is_floating_point() else tensor.element_size() * 8
        entry = {"name": name, "shape": list(tensor.shape), "n_values": tensor.numel(), "kind": "parameter" if is_param else "buffer",
                 "bits": tensor.numel() * bits, "compressed": key in compressed}
        seen[key] = entry
    dense = [e for e in seen.values() if not e.pop("compressed")]
    shared = {e["name"]: e["also"] for e in seen.values() if "also" in e}
    counted = {
        "n_parameters": n_params, "n_buffers": n_buffers, "n_values": n_params + n_buffers,
        "n_dense_values": sum(e["n_values"] for e in dense), "dense_float_bits": float_bits,
        "shared_counted_once": shared,  # a tensor's first name -> its other names
    }
    return dense, counted


def _totals(layers: list[dict], dense: list[dict]) -> dict[str, Any]:
    parts: dict[str, int] = {}
    for layer in layers:
        for part, bits in layer["parts_bits"].items():
            parts[part] = parts.get(part, 0) + bits
    dense_bits = sum(e["bits"] for e in dense)
    n_compressed = sum(layer["n_weights"] for layer in layers)
    n_total = n_compressed + sum(e["n_values"] for e in dense)
    compressed_bits = sum(parts.values())
    total_bits = compressed_bits + dense_bits
    original = n_total * BASELINE_BITS
    return {
        "n_layers_compressed": len(layers), "n_weights_compressed": n_compressed, "n_values": n_total,
        "parts_bits": {**parts, "dense": dense_bits}, "compressed_layers_bits": compressed_bits, "dense_bits": dense_bits,
        "total_bits": total_bits, "original_fp16_bytes": original / 8, "compressed_bytes": total_bits / 8,
        "original_fp16_mb": original / 8 / MB, "compressed_mb": total_bits / 8 / MB,
        "compressed_layers_mb": compressed_bits / 8 / MB, "dense_mb": dense_bits / 8 / MB,
        "ratio": original / max(1, total_bits), "bits_per_weight_all_in": total_bits / n_total if n_total else 0.0,
        "bits_per_weight_compressed_layers": compressed_bits / n_compressed if n_compressed else 0.0,
    }
