"""The ``compresskit`` command (Typer): quantize, eval, sample, render, decompress, info, methods, estimate.

Every command prints a readable table, or one JSON document with ``--json``. Bad input (unknown
method, bits out of range, missing model, unreadable file) ends with a one-line ``error: ...`` on
stderr and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from compresskit.cli import output
from compresskit.errors import CompressKitError
from compresskit.rewrite.select import parse_value

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress generative models to 1-4 bits per weight.")


def _params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """``["k=256", "pool=false"]`` -> {"k": 256, "pool": False} (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CompressKitError(f"{flag} {item!r} must look like NAME=VALUE, e.g. {flag} k=256")
        out[key] = parse_value(raw)
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
    shape: Optional[str] = typer.Option(None, help="One weight's shape, e.g. 6912x1152 (out x in; more dims for conv kernels)."),
    model: Optional[str] = typer.Option(None, help="A whole model, built without weights where its adapter can: alias (dit-xl-2-256), file or directory."),
    adapter: Optional[str] = typer.Option(None, help="Model family adapter for --model (default: the one that recognises it)."),
    method: str = typer.Option("pq", help="Quantizer name (see `compresskit methods`)."),
    bits: int = typer.Option(3, help="Target bits per weight (the method's nominal bits)."),
    param: Optional[list[str]] = typer.Option(None, help="Extra quantizer parameter NAME=VALUE (repeatable)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="With --model: also compress what the adapter keeps dense as embeddings."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Exact size breakdown of one layer of SHAPE, or of a whole MODEL per layer and in total, without any weights."""
    from compresskit.config import CompressConfig

    if (shape is None) == (model is None):
        raise CompressKitError("pass exactly one of --shape (one weight) or --model (a whole model)")
    if model is not None:
        from rich.markup import escape
        from rich.table import Table

        from compresskit.estimate import estimate_spec

        config = CompressConfig(method=method, bits=bits, params=_params(param), include_embeddings=embeddings)
        result = estimate_spec(model, config, adapter)
        if as_json:
            return output.print_json(result)
        t = Table(title=f"{result['model']} -> {method}:{bits} (weights: {result['weights']}; MB = 10^6 bytes)")
        t.add_column("layer", overflow="fold")  # folded whole, never cut: the name is what a reader looks for
        t.add_column("shape", no_wrap=True)
        for column in ("FP16 MB", "compressed MB", "bits/weight"):
            t.add_column(column, justify="right")
        for layer in result["layers"]:
            t.add_row(escape(layer["name"]), "x".join(map(str, layer["shape"])), f"{layer['fp16_mb']:.3f}", f"{layer['compressed_mb']:.3f}", f"{layer['bits_per_weight']:.3f}")
        totals, counted = result["totals"], result["counted"]
        t.add_row(f"dense rest ({len(result['dense'])} tensors)", "", f"{counted['n_dense_values'] * 2 / 1e6:.3f}", f"{totals['dense_mb']:.3f}", "")
        t.add_row("[bold]total[/]", "", f"[bold]{totals['original_fp16_mb']:.2f}[/]", f"[bold]{totals['compressed_mb']:.2f}[/]", f"[bold]{totals['bits_per_weight_all_in']:.3f}[/]")
        output.console.print(t)
        output.console.print(
            f"counted: {counted['n_parameters']:,} parameters + {counted['n_buffers']:,} buffer values, "
            f"{len(counted['shared_counted_once'])} shared tensors once; ratio {totals['ratio']:.2f}x", highlight=False,
        )
        for note in result["adapter_notes"].values():
            output.console.print(escape(note), highlight=False, soft_wrap=True)
        return None
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
    model: Optional[str] = typer.Option(None, help="Model: alias, HF id (local cache only), local directory or file (default: the default family's default model)."),
    adapter: Optional[str] = typer.Option(None, help="Model family adapter (default: the one that recognises --model)."),
    method: str = typer.Option("pq", help="Quantizer name (see `compresskit methods`)."),
    bits: int = typer.Option(3, help="Target bits per weight (the method's nominal bits)."),
    param: Optional[list[str]] = typer.Option(None, help="Quantizer parameter NAME=VALUE (repeatable)."),
    include: Optional[list[str]] = typer.Option(None, help="Only targets matching this fnmatch pattern (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="Skip targets matching this pattern (repeatable)."),
    override: Optional[list[str]] = typer.Option(None, help="Per-layer method, e.g. 'model.layers.0.*=rtn:4' (repeatable)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Also compress embeddings and output heads (tied tensors once)."),
    out: Optional[str] = typer.Option(None, help="Output directory (default: out/<model>-<method><bits>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    export: Optional[str] = typer.Option(None, help="'dense': also write a plain dequantized checkpoint under OUT/dense."),
    preset: str = typer.Option("fast", help="Calibration: none | fast | best | zero-data (see docs/calibration.md)."),
    calib_set: Optional[list[str]] = typer.Option(None, help="Calibration setting NAME=VALUE on top of the preset, e.g. em_rounds=1 (repeatable)."),
    calib_data: Optional[str] = typer.Option(None, help="Calibration data source (default: the family's own, disjoint from evaluation)."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration samples (default: the preset's, 16)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate before and after compressing."),
    eval_data: Optional[str] = typer.Option(None, help="Evaluation data source (default: the family's own)."),
    option: Optional[list[str]] = typer.Option(None, help="Family option NAME=VALUE for calibration, evaluation or the family's preparation step, e.g. seq_len=512, prune=0.5 (repeatable)."),
    stream: bool = typer.Option(False, "--stream", help="Block by block from the checkpoint's safetensors files, never the whole model in memory (no evaluation; see docs/streaming.md)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished --stream run writing --out from its last finished block (implies --stream)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compress a model, evaluate it before and after, save it, and print the report."""
    from compresskit.cli.run import QuantizeRequest, run_quantize

    request = QuantizeRequest(
        model=model, adapter=adapter, method=method, bits=bits, params=_params(param), include=tuple(include or ()),
        exclude=tuple(exclude or ()), overrides=tuple(override or ()), embeddings=embeddings, out=out, overwrite=overwrite,
        export=export, preset=preset, calib_set=_params(calib_set, "--calib-set"), calib_data=calib_data,
        calib_samples=calib_samples, evaluate=evaluate, eval_data=eval_data, options=_params(option, "--option"),
        stream=stream, resume=resume,
    )
    result = run_quantize(request, quiet=as_json)
    if result is None:  # a distributed run's other ranks: rank 0 prints
        return
    output.print_json(result) if as_json else output.quantize_summary(result)


@app.command("eval")
def evaluate_command(
    model: str = typer.Argument(..., help="A compressed-model directory, or a model spec as for quantize."),
    adapter: Optional[str] = typer.Option(None, help="Model family adapter (default: the one that recognises MODEL)."),
    eval_data: Optional[str] = typer.Option(None, help="Evaluation data source (default: the family's own)."),
    option: Optional[list[str]] = typer.Option(None, help="Family evaluation option NAME=VALUE (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Evaluate a model with its family's metrics (perplexity for language models)."""
    from compresskit.cli.run import run_eval

    result = run_eval(model, adapter, eval_data, _params(option, "--option"), quiet=as_json)
    output.print_json(result) if as_json else output.metrics_table(result)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"0,3,7"`` -> (0, 3, 7); one error for anything that is not integers joined by commas."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CompressKitError(f"{flag} {text!r} must be class ids joined by commas, e.g. {flag} 0,3,7") from None


@app.command()
def sample(
    model: str = typer.Option(..., help="A compressed-model directory, or a model spec as for quantize (an image model: dit, unet)."),
    n: Optional[int] = typer.Option(None, "--n", help="Pictures to draw, 1 to 256 (default: as many as --labels, else 16)."),
    out: str = typer.Option(..., help="The PNG file to write (its directory must exist)."),
    labels: Optional[str] = typer.Option(None, help="Class ids, e.g. 0,3,7, repeated to --n pictures (default: 0, 1, 2, ... over the model's classes)."),
    seed: int = typer.Option(0, help="Seed of the start and step noise: the same seed, the same pictures."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the family's, 50 respaced DDPM steps)."),
    cfg_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the family's, 1.5)."),
    compare: Optional[str] = typer.Option(None, help="A second model drawn with the same labels and seed, shown on the right."),
    adapter: Optional[str] = typer.Option(None, help="Model family adapter (default: the one the manifest records or that recognises MODEL)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Draw pictures from an image model into one PNG grid, each captioned with its class; --compare puts a second model beside it."""
    from compresskit.cli.sample import SampleRequest, run_sample

    options = {k: v for k, v in (("steps", steps), ("cfg_scale", cfg_scale)) if v is not None}
    request = SampleRequest(
        model=model, out=out, n=n, labels=None if labels is None else _int_list(labels, "--labels"), seed=seed,
        options=options, compare=compare, adapter=adapter, overwrite=overwrite,
    )
    result = run_sample(request, quiet=as_json)
    output.print_json(result) if as_json else output.sample_summary(result)


@app.command()
def render(
    model: str = typer.Argument(..., help="A compressed-model directory, or a scene (.ply, ref-scene)."),
    out: str = typer.Option(..., help="The PNG file to write (its directory must exist)."),
    views: int = typer.Option(4, help="Held-out views to draw, 1 to 64."),
    size: int = typer.Option(128, help="Longest side of each view in pixels."),
    compare: bool = typer.Option(False, "--compare", help="Put the uncompressed scene's views on the left."),
    adapter: Optional[str] = typer.Option(None, help="Model family adapter (default: the one the manifest records or that recognises MODEL)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Render a 3DGS scene's held-out views into one PNG, each captioned with its PSNR against the uncompressed scene."""
    from compresskit.cli.scene import RenderRequest, run_render

    result = run_render(RenderRequest(model, out, views, size, compare, adapter, overwrite), quiet=as_json)
    output.print_json(result) if as_json else output.console.print(f"wrote {result['out']} ({result['views']} views, {result['width']}x{result['height']} px)", highlight=False)


@app.command()
def decompress(
    model: str = typer.Argument(..., help="A compressed-model directory."),
    out: str = typer.Option(..., help="The file to write in the family's own format (a 3DGS scene: .ply)."),
    adapter: Optional[str] = typer.Option(None, help="Model family adapter (default: the one the manifest records)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Write a compressed model decoded, as one standard file (a 3DGS scene as the .ply viewers open)."""
    from compresskit.cli.scene import run_decompress

    result = run_decompress(model, out, adapter, overwrite, quiet=as_json)
    output.print_json(result) if as_json else output.console.print(f"wrote {result['out']} ({result['bytes']:,} bytes)", highlight=False)


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

