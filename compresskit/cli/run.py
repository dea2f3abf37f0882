"""The work behind ``compresskit quantize`` and ``compresskit eval``, with rich progress output."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from compresskit.cli.output import err_console
from compresskit.errors import CompressKitError


@dataclass(frozen=True)
class QuantizeRequest:
    model: str | None
    method: str
    bits: int
    out: str | None
    overwrite: bool
    params: dict[str, Any]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    overrides: tuple[str, ...]
    adapter: str
    export: str | None
    eval_tokens: int
    eval_data: str | None


@contextmanager
def _step(description: str, quiet: bool) -> Iterator[None]:
    """A spinner for one step that takes more than a moment (on stderr, so --json stays clean)."""
    if quiet:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True) as p:
        p.add_task(description, total=None)
        yield
    err_console.print(f"[green]done[/] {description}")


def _layer_progress(quiet: bool):
    if quiet:
        return None, None
    progress = Progress(
        TextColumn("compressing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=err_console, transient=True,
    )
    task = progress.add_task("", total=None)

    def update(name: str, i: int, total: int) -> None:
        progress.update(task, completed=i, total=total, description=name)

    return progress, update


def run_quantize(req: QuantizeRequest, quiet: bool = False) -> dict[str, Any]:
    from compresskit import io
    from compresskit.adapters import get_adapter
    from compresskit.compress import compress
    from compresskit.config import CompressConfig, parse_method
    from compresskit.rewrite import parse_override

    start = time.perf_counter()
    adapter = get_adapter(req.adapter)()
    overrides = tuple(parse_override(o) for o in req.overrides)
    config = CompressConfig(
        method=req.method, bits=req.bits, params=req.params, include=req.include, exclude=req.exclude, overrides=overrides
    ).validated()
    parse_method(f"{req.method}:{req.bits}")
    out = Path(req.out or f"out/{_slug(req.model or 'smollm2-135m')}-{req.method}{req.bits}")
    if out.exists() and not req.overwrite:
        raise CompressKitError(f"{out} already exists; choose another --out or pass --overwrite")
    if req.export not in (None, "dense"):
        raise CompressKitError(f"--export {req.export!r} is not supported; the only export is 'dense'")

    with _step(f"loading {req.model or 'the default model'}", quiet):
        loaded = adapter.load(req.model)
    metrics: dict[str, dict[str, float]] = {}
    if req.eval_tokens:
        with _step("evaluating the original model", quiet):
            metrics["before"] = adapter.evaluate(loaded, req.eval_data, n_tokens=req.eval_tokens)
    args, kwargs = adapter.example_inputs(loaded)
    progress, update = _layer_progress(quiet)
    t0 = time.perf_counter()
    if progress is not None:
        progress.start()
    try:
        report = compress(
            loaded.model, config, example_args=args, example_kwargs=kwargs,
            keep_dense=[p for p, _ in adapter.keep_dense], progress=update,
        )
    finally:
        if progress is not None:
            progress.stop()
    seconds_compress = time.perf_counter() - t0
    if req.eval_tokens:
        with _step("evaluating the compressed model", quiet):
            metrics["after"] = adapter.evaluate(loaded, req.eval_data, n_tokens=req.eval_tokens)
    report.metrics = metrics
    source = {"model": loaded.source, "resolved": loaded.resolved, "revision": loaded.revision, "adapter": adapter.name}
    with _step(f"saving to {out}", quiet):
        io.save(
            loaded.model, report, out, source=source, overwrite=req.overwrite,
            save_architecture=lambda d: adapter.save_architecture(loaded, d),
            export_dense=(lambda d: adapter.export_dense(loaded, d)) if req.export == "dense" else None,
        )
    return {
        "model": loaded.source,
        "method": req.method,
        "bits": req.bits,
        "out": str(out),
        "report": report.to_dict(),
        "seconds_compress": seconds_compress,
        "seconds_total": time.perf_counter() - start,
    }


def run_eval(spec: str, adapter_name: str, tokens: int, eval_data: str | None, quiet: bool = False) -> dict[str, Any]:
    from compresskit.adapters import get_adapter
    from compresskit.io import MANIFEST, load_compressed

    if (Path(spec) / MANIFEST).is_file():
        with _step(f"loading compressed model {spec}", quiet):
            loaded, adapter = load_compressed(spec)
    else:
        adapter = get_adapter(adapter_name)()
        with _step(f"loading {spec}", quiet):
            loaded = adapter.load(spec)
    with _step("evaluating", quiet):
        metrics = adapter.evaluate(loaded, eval_data, n_tokens=tokens)
    return {"model": spec, "metrics": metrics}


def _slug(spec: str) -> str:
    return Path(spec).name.removesuffix(".gguf").replace("/", "-") or "model"
