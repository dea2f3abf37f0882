"""The work behind ``compresskit sample``: draw pictures from a model (and, to compare, from another) into one PNG.

:func:`run_sample` is the whole command as one call. Models are opened as ``compresskit eval`` opens
them (a compressed-model directory, or a model spec); any adapter that declares the optional
:meth:`~compresskit.adapters.base.Adapter.sample` capability can draw. With ``compare``, both models
get the same labels and seed, so the two panels differ only where the models do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compresskit.cli.run import _step, load_model, model_adapter
from compresskit.errors import CompressKitError

DEFAULT_SAMPLES = 16
MAX_SAMPLES = 256


@dataclass(frozen=True)
class SampleRequest:
    """The sample command's arguments. ``n`` defaults to the number of ``labels``, or 16; ``labels``
    are class ids cycled to ``n`` (default: 0, 1, 2, ... over the model's classes); ``options`` are
    the adapter's ``sample_options`` (the diffusion family's ``steps``, ``cfg_scale``)."""

    model: str
    out: str
    n: int | None = None
    labels: tuple[int, ...] | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    compare: str | None = None
    adapter: str | None = None
    overwrite: bool = False


def title_for(spec: str) -> str:
    """A panel's title: the model's name and, for a compressed-model directory, its methods and bits per weight."""
    from compresskit.io import MANIFEST, read_manifest

    name = Path(spec).name or spec
    if not (Path(spec) / MANIFEST).is_file():
        return f"{name}: FP"
    manifest = read_manifest(spec)
    methods = "+".join(sorted({layer["quantizer"]["quantizer"] for layer in manifest["layers"].values()})) or "dense"
    return f"{name}: {methods} {manifest['totals']['bits_per_weight_compressed_layers']:.2f} bits/w"


def _labels(req: SampleRequest, n: int, classes: int, spec: str) -> list[int]:
    base = list(req.labels) if req.labels is not None else list(range(classes))
    bad = [label for label in base if not 0 <= label < classes]
    if bad:
        raise CompressKitError(f"--labels {','.join(map(str, bad))}: {spec} has {classes} classes, ids 0 to {classes - 1}")
    return [base[i % len(base)] for i in range(n)]


def run_sample(req: SampleRequest, quiet: bool = False) -> dict[str, Any]:
    """Sample ``n`` pictures from ``req.model`` (and ``req.compare``) and write them to ``req.out`` as
    one PNG grid, each picture captioned with its class; with ``compare``, two titled panels side by
    side. Everything is checked before any model is loaded where it can be, and nothing is written
    on an error. Returns what was drawn: ``out``, ``n``, ``labels``, ``seed``, ``steps``, ``options``,
    ``models`` (spec, adapter, title each) and the picture's ``width`` / ``height`` in pixels."""
    from compresskit.grid import check_png_path, image_grid, save_png, side_by_side

    n = req.n if req.n is not None else len(req.labels) if req.labels else DEFAULT_SAMPLES
    if not 1 <= n <= MAX_SAMPLES:
        raise CompressKitError(f"--n must be between 1 and {MAX_SAMPLES}, got {n}")
    if req.labels is not None and not req.labels:
        raise CompressKitError("--labels is empty; give class ids such as 0,3,7 or leave it out")
    check_png_path(req.out, req.overwrite)
    specs = [req.model, *([req.compare] if req.compare is not None else [])]
    adapters = [model_adapter(spec, req.adapter) for spec in specs]
    for spec, adapter in zip(specs, adapters):
        if not adapter.supports("sample"):
            raise CompressKitError(f"{spec} is a {adapter.name!r} model, and the {adapter.name!r} adapter cannot sample pictures; `compresskit sample` needs an image model (dit, unet)")
    settings = [adapter.sample_settings(req.options) for adapter in adapters]  # bad options: an error before loading

    panels, models, labels = [], [], None
    for spec, adapter in zip(specs, adapters):
        loaded = load_model(spec, adapter, quiet)
        names = adapter.class_names(loaded)
        labels = labels or _labels(req, n, len(names), spec)
        if max(labels) >= len(names):  # the compared model has fewer classes than the first
            raise CompressKitError(f"{spec} has {len(names)} classes, fewer than {req.model}; compare models of the same classes")
        with _step(f"sampling {n} pictures from {spec}", quiet):
            images = adapter.sample(loaded, torch.tensor(labels), req.seed, req.options)  # [n, C, H, W] in [-1, 1]
        panels.append(image_grid(images, [names[label] for label in labels]))
        models.append({"model": spec, "adapter": adapter.name, "title": title_for(spec)})
        del loaded, images
    picture = panels[0] if len(panels) == 1 else side_by_side(panels, [m["title"] for m in models])
    out = save_png(picture, req.out, overwrite=req.overwrite)
    return {
        "out": str(out), "n": n, "labels": labels, "seed": req.seed, "steps": settings[0].get("steps"), "options": settings[0],
        "models": models, "width": picture.width, "height": picture.height,
    }
