"""The ``compresskit`` command (Typer): quantize, eval, info, methods, estimate.

Every command prints a readable table, or one JSON document with ``--json``. Bad input (unknown
method, bits out of range, missing model, unreadable file) ends with a one-line ``error: ...`` on
stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from compresskit.cli import output
from compresskit.errors import CompressKitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress generative models to 1-4 bits per weight.")


def _params(items: list[str] | None) -> dict[str, Any]:
    """``["k=256", "pool=false"]`` -> {"k": 256, "pool": False} (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CompressKitError(f"--param {item!r} must look like NAME=VALUE, e.g. --param k=256")
        try:
            out[key] = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List every registered quantizer with its parameters and defaults."""
    from compresskit.registry import available_quantizers

    table = {name: cls.param_defaults() for name, cls in available_quantizers().items()}
    docs = {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in available_quantizers().items()}
    if as_json:
        output.print_json({name: {"doc": docs[name], "params": params} for name, params in table.items()})
    else:
        output.methods_table(table, docs)


@app.command()
def estimate(
    shape: str = typer.Option(..., help="Weight shape, e.g. 6912x1152 (out x in; more dims for conv kernels)."),
    method: str = typer.Option("pq", help="Quantizer name (see `compresskit methods`)."),
    bits: int = typer.Option(2, help="Target bits per weight (the method's nominal bits)."),
    param: Optional[list[str]] = typer.Option(None, help="Extra quantizer parameter NAME=VALUE (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Exact size breakdown of one layer of SHAPE, without any weights."""
    from compresskit.config import CompressConfig

    try:
        dims = tuple(int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise CompressKitError(f"--shape {shape!r} must be integers joined by 'x', e.g. 6912x1152") from None
    quantizer = CompressConfig(method=method, bits=bits).quantizer_for(method, bits, _params(param))
    report = type(quantizer).estimate(dims, **quantizer.get_params())
    result = {"shape": list(dims), "method": method, "params": quantizer.get_params(), **report.to_dict()}
    output.print_json(result) if as_json else output.size_table(result)


@app.command()
def quantize(
    model: Optional[str] = typer.Option(None, help="HF id, local directory, .gguf file or alias (default: smollm2-135m)."),
    method: str = typer.Option("pq", help="Quantizer name (see `compresskit methods`)."),
    bits: int = typer.Option(3, help="Target bits per weight (the method's nominal bits)."),
    out: Optional[str] = typer.Option(None, help="Output directory (default: out/<model>-<method><bits>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    param: Optional[list[str]] = typer.Option(None, help="Quantizer parameter NAME=VALUE (repeatable)."),
    include: Optional[list[str]] = typer.Option(None, help="Only layers matching this fnmatch pattern (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="Skip layers matching this pattern (repeatable)."),
    override: Optional[list[str]] = typer.Option(None, help="Per-layer method, e.g. 'model.layers.0.*=rtn:4' (repeatable)."),
    adapter: str = typer.Option("llama", help="Model family adapter."),
    export: Optional[str] = typer.Option(None, help="'dense': also write a plain dequantized checkpoint under OUT/dense."),
    eval_tokens: int = typer.Option(8192, help="Tokens of evaluation text (0: skip evaluation)."),
    eval_data: Optional[str] = typer.Option(None, help="Evaluation text file (default: Python's pydoc topics)."),
    calib: str = typer.Option("data", help="Calibration: data (default) | none | zero-data (Gaussian-noise inputs)."),
    calib_data: Optional[str] = typer.Option(None, help="Calibration text file (default: pydoc topics, disjoint from evaluation)."),
    calib_samples: int = typer.Option(16, help="Calibration sequences."),
    calib_seq_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    offload_activations: Optional[str] = typer.Option(None, help="Keep calibration activations in files under this directory instead of memory (large models)."),
    local_rounds: int = typer.Option(2, help="Layer-wise EM rounds per codebook layer (output-optimal centroids and row scales, then codes)."),
    em_rounds: int = typer.Option(0, help="Whole-model EM rounds after the block walk (M-step, dead-centroid re-init, E-step)."),
    m_steps: int = typer.Option(0, help="AdamW steps per M-step (task loss; see --m-objective)."),
    m_objective: str = typer.Option(
        "task", help="M-step loss: task (next-token) | distill (KL to the uncompressed model's predictions) | block."
    ),
    soft_candidates: int = typer.Option(0, help="VQ4DiT soft assignments over N candidate centroids in the block M-step (0: hard codes)."),
    lr: float = typer.Option(1e-4, help="M-step learning rate (AdamW, weight decay 0)."),
    m_samples: int = typer.Option(0, help="Sequences the task-loss M-step trains on, drawn from the calibration text (0: the calibration sequences)."),
    m_batch: int = typer.Option(8, help="Sequences per task-loss M-step (AdamW step)."),
    asymmetric: bool = typer.Option(True, "--asymmetric/--symmetric", help="Each layer matches the original model's outputs from the compressed model's inputs (chained blocks, e.g. LLaMA), or only its own uncompressed output."),
    sequential: bool = typer.Option(True, "--sequential/--one-stage", help="Compress a block's layers stage by stage (q/k/v, o, gate/up, down), each calibrated on the earlier stages compressed."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compress a model, evaluate it before and after, save it, and print the report."""
    from compresskit.cli.run import QuantizeRequest, run_quantize

    request = QuantizeRequest(
        model=model, method=method, bits=bits, out=out, overwrite=overwrite, params=_params(param),
        include=tuple(include or ()), exclude=tuple(exclude or ()), overrides=tuple(override or ()), adapter=adapter,
        export=export, eval_tokens=eval_tokens, eval_data=eval_data, calib=calib, calib_data=calib_data,
        calib_samples=calib_samples, calib_seq_len=calib_seq_len, local_rounds=local_rounds, offload_dir=offload_activations, em_rounds=em_rounds, m_steps=m_steps,
        m_objective=m_objective, soft_candidates=soft_candidates, lr=lr, m_samples=m_samples, m_batch=m_batch,
        asymmetric=asymmetric, sequential=sequential,
    )
    result = run_quantize(request, quiet=as_json)
    output.print_json(result) if as_json else output.quantize_summary(result)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="A compressed-model directory, or a model spec as for quantize."),
    adapter: str = typer.Option("llama", help="Model family adapter (for an uncompressed model)."),
    tokens: int = typer.Option(8192, help="Tokens of evaluation text."),
    eval_data: Optional[str] = typer.Option(None, help="Evaluation text file (default: Python's pydoc topics)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Evaluate a model (perplexity for language models)."""
    from compresskit.cli.run import run_eval

    result = run_eval(model, adapter, tokens, eval_data, quiet=as_json)
    output.print_json(result) if as_json else output.metrics_table(result)


@app.command()
def info(
    path: str = typer.Argument(..., help="A compressed-model directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Per-layer table of a compressed model: method, bits/weight, error; and the totals."""
    from compresskit.io import read_manifest

    manifest = read_manifest(path)
    output.print_json(manifest) if as_json else output.info_table(manifest)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning CompressKitError into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except CompressKitError as err:
        output.error(str(err))
        sys.exit(2)
    except typer.Abort:
        output.error("aborted")
        sys.exit(130)
    except Exception as err:
        # click usage errors (unknown option, missing argument) carry their own exit code; typer
        # >= 0.29 vendors click, so its exceptions are not click's: recognise them by their API
        message, code = getattr(err, "format_message", None), getattr(err, "exit_code", None)
        if callable(message) and isinstance(code, int):
            text = " ".join(message().split())
            if text:  # empty for a bare `compresskit`: the help it printed says it all
                output.error(text)
            sys.exit(code)
        raise

