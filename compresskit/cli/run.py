"""The work behind ``compresskit quantize`` and ``compresskit eval``, with rich progress output; how a model or a
compressed-model directory is opened (``compresskit sample`` too)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from compresskit.cli.output import err_console
from compresskit.errors import CompressKitError


@dataclass(frozen=True)
class QuantizeRequest:
    """The quantize command's arguments, as parsed strings and numbers."""

    model: str | None = None
    adapter: str | None = None
    method: str = "pq"
    bits: int = 3
    params: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    embeddings: bool = False
    out: str | None = None
    overwrite: bool = False
    export: str | None = None
    preset: str = "fast"
    calib_set: dict[str, Any] = field(default_factory=dict)
    calib_data: str | None = None
    calib_samples: int | None = None
    evaluate: bool = True
    eval_data: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stream: bool = False  # block by block from the checkpoint's files, never the whole model in memory
    resume: bool = False  # continue the unfinished streamed run writing ``out`` (implies ``stream``)


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


def pick_adapter(spec: str | None, name: str | None):
    """The adapter named ``name``, or the one that recognises the model ``spec``."""
    from compresskit.adapters import adapter_for, get_adapter

    return (get_adapter(name) if name else adapter_for(spec))()


def build_configs(req: QuantizeRequest, adapter):
    """``(CompressConfig, CalibrationConfig or None, EvalSpec or None)`` for a request: the only place
    the CLI turns strings into the library's typed objects."""
    from compresskit.config import CompressConfig
    from compresskit.rewrite import parse_override

    calib_options = {k: v for k, v in req.options.items() if k in adapter.calib_options}
    eval_options = {k: v for k, v in req.options.items() if k in adapter.eval_options}
    prepare_options = {k: v for k, v in req.options.items() if k in adapter.prepare_options}
    unknown = sorted(set(req.options) - set(calib_options) - set(eval_options) - set(prepare_options))
    if unknown:
        valid = ", ".join([*adapter.calib_options, *adapter.eval_options, *adapter.prepare_options]) or "none"
        raise CompressKitError(f"the {adapter.name!r} adapter has no option {', '.join(map(repr, unknown))}; valid: {valid}")
    adapter.prepare_settings(prepare_options)  # validate now, before anything is loaded
    config = CompressConfig(
        method=req.method, bits=req.bits, params=req.params, include=req.include, exclude=req.exclude,
        overrides=tuple(parse_override(o) for o in req.overrides), include_embeddings=req.embeddings,
        prepare=prepare_options,
    ).validated()
    calibration = None
    if req.preset == "none":
        given = [f for f, v in (("--calib-set", req.calib_set), ("--calib-data", req.calib_data), ("--calib-samples", req.calib_samples)) if v]
        given += [f"--option {k}" for k in calib_options]
        if given:
            raise CompressKitError(f"{', '.join(given)} would do nothing with --preset none (no calibration)")
    else:
        settings = dict(req.calib_set)
        if req.calib_data is not None:
            settings["source"] = req.calib_data
        if req.calib_samples is not None:
            settings["n_samples"] = req.calib_samples
        preset = adapter.calibration_preset(req.preset)
        if calib_options:  # on top of the preset's own options (the gaussians `best` sets calib_size), not instead of them
            settings["options"] = {**preset.options, **calib_options}
        calibration = preset.with_settings(settings)
        adapter.calib_spec(calibration.source, calibration.n_samples, calibration.seed, calibration.options)  # validate now
    eval_spec = None
    if req.evaluate:
        eval_spec = adapter.eval_spec(req.eval_data, options=eval_options)
    elif req.eval_data is not None or eval_options:
        raise CompressKitError("--eval-data and evaluation options would do nothing with --no-eval")
    if req.calib_data is not None and req.eval_data is not None and Path(req.calib_data).resolve() == Path(req.eval_data).resolve():
        raise CompressKitError("--calib-data and --eval-data are the same; evaluation must not see calibration data")
    if req.export not in (None, "dense"):
        raise CompressKitError(f"--export {req.export!r} is not supported; the only export is 'dense'")
    if req.export == "dense" and not adapter.supports("export_dense"):
        raise CompressKitError(f"the {adapter.name!r} adapter has no dense export; leave out --export")
    return config, calibration, eval_spec


def run_quantize(req: QuantizeRequest, quiet: bool = False) -> dict[str, Any] | None:
    """Under torchrun (``WORLD_SIZE`` > 1) every rank runs this; only rank 0 evaluates, saves and
    returns the result, the others return None (``docs/distributed.md``)."""
    from compresskit import distributed

    with distributed.session() as comm:
        if comm is not None and (req.stream or req.resume):
            raise CompressKitError("--stream / --resume cannot run distributed yet; run it in one process (no torchrun)")
        return _run_quantize(req, quiet or (comm is not None and not comm.is_main), comm)


def _run_quantize(req: QuantizeRequest, quiet: bool, comm) -> dict[str, Any] | None:
    from compresskit import io
    from compresskit.compress import _with_adapter_defaults, compress

    if req.stream or req.resume:
        from compresskit.cli.streamed import run_streamed

        return run_streamed(req, quiet)
    start = time.perf_counter()
    adapter = pick_adapter(req.model, req.adapter)
    config, calibration, eval_spec = build_configs(req, adapter)
    if comm is not None:
        if calibration is not None:
            from compresskit.calib.sharded import refuse_undistributed

            refuse_undistributed(calibration)  # before anything is loaded
        if not comm.is_main:
            eval_spec = None  # rank 0 evaluates and saves
    if req.out is not None and Path(req.out).exists() and not req.overwrite:
        raise CompressKitError(f"{req.out} already exists; choose another --out or pass --overwrite")

    with _step(f"loading {req.model or 'the default model'}", quiet):
        loaded = adapter.load(req.model)
    out = Path(req.out or f"out/{_slug(loaded.source)}-{req.method}{req.bits}")
    if out.exists() and not req.overwrite:
        raise CompressKitError(f"{out} already exists; choose another --out or pass --overwrite")
    metrics: dict[str, dict[str, float]] = {}
    if eval_spec is not None:
        with _step("evaluating the original model", quiet):
            metrics["before"] = adapter.evaluate(loaded, eval_spec)
    progress, update = _layer_progress(quiet)
    t0 = time.perf_counter()
    if progress is not None:
        progress.start()
    try:
        report = compress(loaded, config, adapter=adapter, calibration=calibration, progress=update, comm=comm)
    finally:
        if progress is not None:
            progress.stop()
    seconds_compress = time.perf_counter() - t0
    if comm is not None and not comm.is_main:
        return None
    if eval_spec is not None:
        with _step("evaluating the compressed model", quiet):
            metrics["after"] = adapter.evaluate(loaded, eval_spec)
    report.metrics = metrics
    source = {"model": loaded.source, "resolved": loaded.resolved, "revision": loaded.revision, "adapter": adapter.name}
    with _step(f"saving to {out}", quiet):
        io.save(
            loaded.model, report, out, source=source, overwrite=req.overwrite,
            # an adapter that cannot rebuild its model still gets a loadable directory (load(dir, model=...))
            save_architecture=(lambda d: adapter.save_architecture(loaded, d)) if adapter.supports("save_architecture") else None,
            export_dense=(lambda d: adapter.export_dense(loaded, d)) if req.export == "dense" else None,
        )
    return {
        "model": loaded.source,
        "adapter": adapter.name,
        "method": req.method,
        "bits": req.bits,
        "params": _with_adapter_defaults(config, adapter).params_for(req.method, req.bits, dict(req.params)),
        "primary_metric": adapter.primary_metric,
        "calibration": {"preset": req.preset, **report.calibration},
        "out": str(out),
        "report": report.to_dict(),
        "seconds_compress": seconds_compress,
        "processes": 1 if comm is None else comm.world,
        "seconds_total": time.perf_counter() - start,
    }


def model_adapter(spec: str, adapter_name: str | None):
    """The adapter for ``spec``, nothing loaded: ``adapter_name``'s, else the one a compressed-model
    directory's manifest records, else the one that recognises the model spec."""
    from compresskit.adapters import get_adapter
    from compresskit.io import MANIFEST, read_manifest

    if (Path(spec) / MANIFEST).is_file():
        name = adapter_name or read_manifest(spec)["source"].get("adapter")
        if not name:
            raise CompressKitError(f"{spec} records no adapter to rebuild the model; pass --adapter NAME")
        return get_adapter(name)()
    return pick_adapter(spec, adapter_name)


def load_model(spec: str, adapter, quiet: bool = False):
    """``spec`` loaded by ``adapter``: a compressed-model directory rebuilt and its weights read, else the model spec."""
    from compresskit.io import MANIFEST, load_compressed

    if (Path(spec) / MANIFEST).is_file():
        with _step(f"loading compressed model {spec}", quiet):
            return load_compressed(spec, adapter.name)[0]
    with _step(f"loading {spec}", quiet):
        return adapter.load(spec)


def run_eval(spec: str, adapter_name: str | None, eval_data: str | None, options: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    adapter = model_adapter(spec, adapter_name)
    eval_spec = adapter.eval_spec(eval_data, options=options)
    loaded = load_model(spec, adapter, quiet)
    with _step("evaluating", quiet):
        metrics = adapter.evaluate(loaded, eval_spec)
    return {"model": spec, "adapter": adapter.name, "primary_metric": adapter.primary_metric, "metrics": metrics}


def _slug(spec: str) -> str:
    return Path(spec).name.removesuffix(".gguf").replace("/", "-") or "model"
