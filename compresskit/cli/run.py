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
    calib: str = "data"
    calib_data: str | None = None
    calib_samples: int = 16
    calib_seq_len: int = 512
    local_rounds: int = 2
    offload_dir: str | None = None
    em_rounds: int = 0
    m_steps: int = 0
    m_objective: str = "task"
    soft_candidates: int = 0
    lr: float = 1e-4
    m_samples: int = 0  # 0: the M-step trains on the calibration sequences
    m_batch: int = 8
    asymmetric: bool = True
    sequential: bool = True


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
    from compresskit.config import CompressConfig
    from compresskit.rewrite import parse_override

    start = time.perf_counter()
    adapter = get_adapter(req.adapter)()
    overrides = tuple(parse_override(o) for o in req.overrides)
    params = {**adapter.method_defaults.get(req.method, ({}, ""))[0], **req.params}  # the user's word wins
    config = CompressConfig(
        method=req.method, bits=req.bits, params=params, include=req.include, exclude=req.exclude, overrides=overrides
    ).validated()
    out = Path(req.out or f"out/{_slug(req.model or 'smollm2-135m')}-{req.method}{req.bits}")
    if out.exists() and not req.overwrite:
        raise CompressKitError(f"{out} already exists; choose another --out or pass --overwrite")
    if req.export not in (None, "dense"):
        raise CompressKitError(f"--export {req.export!r} is not supported; the only export is 'dense'")
    if req.calib not in ("none", "data", "zero-data"):
        raise CompressKitError(f"--calib {req.calib!r} is not one of none, data, zero-data")
    if req.calib_data is not None and req.calib != "data":
        raise CompressKitError("--calib-data needs --calib data")
    if req.calib_samples < 1 or req.calib_seq_len < 2:
        raise CompressKitError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    if req.m_samples < 0 or req.m_batch < 1:
        raise CompressKitError("--m-samples must be >= 0 and --m-batch >= 1")
    calib_config = _calib_config(req)

    with _step(f"loading {req.model or 'the default model'}", quiet):
        loaded = adapter.load(req.model)
    metrics: dict[str, dict[str, float]] = {}
    if req.eval_tokens:
        with _step("evaluating the original model", quiet):
            metrics["before"] = adapter.evaluate(loaded, req.eval_data, n_tokens=req.eval_tokens)
    args, kwargs = adapter.example_inputs(loaded)
    calibrator = None
    if req.calib != "none":
        with _step(f"preparing {req.calib_samples} calibration sequences ({req.calib})", quiet):
            calibrator = _calibrator(adapter, loaded, req, calib_config)
    progress, update = _layer_progress(quiet)
    t0 = time.perf_counter()
    if progress is not None:
        progress.start()
    try:
        report = compress(
            loaded.model, config, example_args=args, example_kwargs=kwargs,
            keep_dense=[p for p, _ in adapter.keep_dense], calibrator=calibrator, progress=update,
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
        "params": params,
        "calibration": {"mode": req.calib, "samples": req.calib_samples, "seq_len": req.calib_seq_len,
                        "local_rounds": req.local_rounds, "em_rounds": req.em_rounds, "m_steps": req.m_steps, "m_objective": calib_config.m_objective,
                        "m_samples": req.m_samples or req.calib_samples, "m_batch": req.m_batch, "lr": req.lr,
                        "soft_candidates": req.soft_candidates, "asymmetric": calibrator.asymmetric,
                        "sequential": calib_config.sequential}
        if req.calib != "none" else {"mode": "none"},
        "out": str(out),
        "report": report.to_dict(),
        "seconds_compress": seconds_compress,
        "seconds_total": time.perf_counter() - start,
    }


def _calib_config(req: QuantizeRequest):
    from compresskit.calib.stream import CalibConfig

    objective = "block" if req.calib == "zero-data" else req.m_objective  # no labels in noise: match blocks
    if req.soft_candidates and objective != "block":
        raise CompressKitError("--soft-candidates trains in the block M-step: use --m-objective block or --calib zero-data")
    return CalibConfig(
        offload_dir=req.offload_dir, local_rounds=req.local_rounds, em_rounds=req.em_rounds, m_steps=req.m_steps,
        m_objective=objective, soft_candidates=req.soft_candidates, lr=req.lr, asymmetric=req.asymmetric,
        sequential=req.sequential,
    ).validated()


def _calibrator(adapter, loaded, req: QuantizeRequest, config):
    from compresskit.adapters.base import Adapter
    from compresskit.calib.stream import BlockwiseCalibrator

    if req.calib == "zero-data":
        batches = adapter.noise_batches(loaded, req.calib_samples, req.calib_seq_len, seed=config.seed)
    else:
        batches = adapter.calibration_batches(loaded, req.calib_data, req.calib_samples, req.calib_seq_len, seed=config.seed)
        if req.calib_data is not None and req.eval_data is not None and Path(req.calib_data).resolve() == Path(req.eval_data).resolve():
            raise CompressKitError("--calib-data and --eval-data are the same file; evaluation must not see calibration text")
    m_batches = None
    whole_model = config.m_objective in ("task", "distill")
    if req.m_samples and req.calib == "data" and whole_model:
        # its own draw (seed + 1) from the same calibration region: never the evaluation text
        m_batches = adapter.calibration_batches(loaded, req.calib_data, req.m_samples, req.calib_seq_len, seed=config.seed + 1)
    elif whole_model:
        m_batches = batches
    m_batches = _batched(m_batches, req.m_batch) if m_batches else None
    distill = None
    if config.m_objective == "distill":
        if type(adapter).distill_loss is Adapter.distill_loss:
            raise CompressKitError(f"the {adapter.name!r} adapter has no distillation loss; use --m-objective task or block")
        distill = (adapter.distill_targets, adapter.distill_loss)
    return BlockwiseCalibrator(
        adapter.blocks(loaded.model), _batched(batches), adapter.task_loss, config, m_batches=m_batches, distill=distill
    )


def _batched(batches: list, size: int = 8) -> list:
    """Concatenate single-sequence batches into groups of ``size`` (fewer, larger forward passes)."""
    import torch

    out = []
    for i in range(0, len(batches), size):
        group = batches[i : i + size]
        out.append({k: torch.cat([b[k] for b in group]) if torch.is_tensor(v) else v for k, v in group[0].items()})
    return out


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
