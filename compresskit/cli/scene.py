"""The work behind ``compresskit render`` and ``compresskit decompress``, one library call each.

Models are opened as ``compresskit eval`` opens them (a compressed-model directory, or a model spec).
``render`` draws a family's evaluation views (the optional ``Adapter.render_pair`` capability: a 3DGS
scene's held-out cameras), with ``compare`` the uncompressed scene's beside them; ``decompress`` writes
the decoded model as one file in its family's standard format (``Adapter.decompress``: a ``.ply``).
Nothing is written on an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresskit.cli.run import _step, load_model, model_adapter
from compresskit.errors import CompressKitError

MAX_VIEWS = 64


@dataclass(frozen=True)
class RenderRequest:
    """The render command's arguments: ``views`` held-out views at most ``size`` pixels on a side."""

    model: str
    out: str
    views: int = 4
    size: int = 128
    compare: bool = False
    adapter: str | None = None
    overwrite: bool = False


def run_render(req: RenderRequest, quiet: bool = False) -> dict[str, Any]:
    """Render ``req.views`` evaluation views of ``req.model`` into one PNG (with ``compare``: the
    uncompressed scene | this one, same cameras). Returns ``out``, ``views``, ``psnr_db`` per view
    (against the uncompressed renders) and the picture's size."""
    from compresskit.cli.sample import title_for
    from compresskit.grid import check_png_path, image_grid, save_png, side_by_side

    if not 1 <= req.views <= MAX_VIEWS:
        raise CompressKitError(f"--views must be between 1 and {MAX_VIEWS}, got {req.views}")
    if not 8 <= req.size <= 2048:
        raise CompressKitError(f"--size must be between 8 and 2048 pixels, got {req.size}")
    check_png_path(req.out, req.overwrite)
    adapter = model_adapter(req.model, req.adapter)
    if not adapter.supports("render_pair"):
        raise CompressKitError(f"{req.model} is a {adapter.name!r} model, which has no views to render; `compresskit render` needs a 3DGS scene")
    loaded = load_model(req.model, adapter, quiet)
    with _step(f"rendering {req.views} views of {req.model}", quiet):
        original, mine = adapter.render_pair(loaded, req.views, req.size)  # [V, 3, H, W] in [0, 1]
    mse = (mine - original).pow(2).flatten(1).mean(1).clamp(min=1e-10)  # identical views: the 100 dB cap
    scores = [float(v) for v in -10 * mse.log10()]
    captions = [f"{p:.1f} dB" for p in scores]
    panel = image_grid(mine * 2 - 1, captions, columns=min(len(captions), 4))
    if req.compare:
        reference = image_grid(original * 2 - 1, [f"view {i}" for i in range(len(captions))], columns=min(len(captions), 4))
        panel = side_by_side([reference, panel], ["uncompressed", title_for(req.model)])
    out = save_png(panel, req.out, overwrite=req.overwrite)
    return {"out": str(out), "model": req.model, "adapter": adapter.name, "views": len(scores), "psnr_db": scores,
            "compare": req.compare, "width": panel.width, "height": panel.height}


def run_decompress(model: str, out: str, adapter_name: str | None = None, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write ``model`` (a compressed directory) decoded, as its family's standard file at ``out``."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise CompressKitError(f"{out} already exists; choose another --out or pass --overwrite")
    if not target.parent.is_dir():
        raise CompressKitError(f"--out {out}: the directory {target.parent} does not exist")
    adapter = model_adapter(model, adapter_name)
    if not adapter.supports("decompress"):
        raise CompressKitError(f"{model} is a {adapter.name!r} model, which has no one-file format; use `compresskit quantize --export dense`")
    loaded = load_model(model, adapter, quiet)
    with _step(f"writing {out}", quiet):
        written = adapter.decompress(loaded, target, overwrite=overwrite)
    return {"model": model, "adapter": adapter.name, "out": str(written), "bytes": written.stat().st_size}
