"""``compresskit quantize --stream / --resume``: the streamed run behind the same command."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from compresskit.cli.run import QuantizeRequest, _layer_progress, _slug, build_configs, pick_adapter
from compresskit.errors import CompressKitError


def run_streamed(req: QuantizeRequest, quiet: bool = False) -> dict[str, Any]:
    """Compress ``req.model`` block by block into ``req.out`` (see :mod:`compresskit.stream`).

    The model is never whole in memory, so nothing is evaluated here (``compresskit eval OUT``
    does it afterwards, if the compressed model fits).
    """
    from compresskit.compress import _with_adapter_defaults
    from compresskit.stream import compress_streaming

    start = time.perf_counter()
    adapter = pick_adapter(req.model, req.adapter)
    if req.export is not None:
        raise CompressKitError("--export needs the whole model in memory; it cannot go with --stream / --resume")
    if req.eval_data is not None:
        raise CompressKitError("--eval-data would do nothing: a streamed run does not evaluate (run compresskit eval OUT afterwards)")
    config, calibration, _ = build_configs(QuantizeRequest(**{**req.__dict__, "evaluate": False}), adapter)
    out = Path(req.out or f"out/{_slug(req.model or 'model')}-{req.method}{req.bits}")
    progress, update = _layer_progress(quiet)
    if progress is not None:
        progress.start()
    try:
        result = compress_streaming(req.model, out, config, adapter=adapter, calibration=calibration, resume=req.resume, overwrite=req.overwrite, progress=update)
    finally:
        if progress is not None:
            progress.stop()
    seconds = time.perf_counter() - start
    return {
        "model": req.model,
        "adapter": adapter.name,
        "method": req.method,
        "bits": req.bits,
        "params": _with_adapter_defaults(config, adapter).params_for(req.method, req.bits, dict(req.params)),
        "primary_metric": adapter.primary_metric,
        "calibration": {"preset": req.preset, **result.report.calibration},
        "out": str(result.out),
        "report": result.report.to_dict(),
        "streamed": {"resumed_from_block": result.resumed_from, "block_seconds": result.block_seconds,
                     "evaluation": f"not run while streaming; run `compresskit eval {result.out}`"},
        "seconds_compress": seconds,
        "seconds_total": seconds,
    }
