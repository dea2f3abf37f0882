"""Everything the CLI prints: rich tables for people, JSON for machines, errors on stderr."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def error(message: str) -> None:
    # escaped: messages hold brackets ("pip install 'compresskit[lm]'", shapes) that rich would eat as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.2f} MB"


def methods_table(table: dict[str, dict[str, Any]], docs: dict[str, str]) -> None:
    t = Table(title="Registered quantizers")
    t.add_column("method", style="bold")
    t.add_column("parameters (defaults)")
    t.add_column("what it is")
    for name, params in table.items():
        # docstrings hold shapes like [in, in], which rich would read as markup and drop
        t.add_row(escape(name), escape(", ".join(f"{k}={v!r}" for k, v in params.items())), escape(docs.get(name, "")))
    console.print(t)


def size_table(result: dict[str, Any]) -> None:
    shape = "x".join(map(str, result["shape"]))
    t = Table(title=f"{result['method']} on a {shape} weight ({result['n_weights']:,} weights)")
    t.add_column("part")
    t.add_column("bits", justify="right")
    t.add_column("bits/weight", justify="right")
    for part, bits in result["parts_bits"].items():
        t.add_row(part, f"{bits:,}", f"{bits / result['n_weights']:.4f}")
    t.add_row("[bold]total[/]", f"[bold]{result['total_bits']:,}[/]", f"[bold]{result['bits_per_weight']:.4f}[/]")
    console.print(t)


def metrics_table(result: dict[str, Any]) -> None:
    t = Table(title=f"Evaluation of {result.get('model', '')}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, value in result.get("metrics", {}).items():
        t.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(t)


def sample_summary(result: dict[str, Any]) -> None:
    options = ", ".join(f"{k} {v}" for k, v in result["options"].items())
    drawn = " | ".join(m["title"] for m in result["models"])
    console.print(
        f"wrote {escape(result['out'])}: {result['n']} pictures from {escape(drawn)} (seed {result['seed']}, {escape(options)}), "
        f"{result['width']} x {result['height']} px", highlight=False, soft_wrap=True,
    )


def quantize_summary(result: dict[str, Any]) -> None:
    rep = result["report"]
    t = Table(title=f"{result['model']} -> {result['method']}:{result['bits']}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("original size (FP16)", _mb(rep["original_fp16_bytes"]))
    t.add_row("compressed size (all-in)", _mb(rep["compressed_bytes"]))
    t.add_row("ratio", f"{rep['ratio']:.2f}x")
    t.add_row("bits/weight, compressed layers", f"{rep['bits_per_weight_compressed_layers']:.3f}")
    t.add_row("bits/weight, whole model", f"{rep['bits_per_weight_all_in']:.3f}")
    t.add_row("layers compressed", str(rep["n_layers_compressed"]))
    t.add_row("graph", rep["graph_method"] + (f" ({rep['graph_note']})" if rep.get("graph_note") else ""))
    for stage in ("before", "after"):
        for key, value in rep.get("metrics", {}).get(stage, {}).items():
            t.add_row(f"{key} {stage}", f"{value:.3f}" if isinstance(value, float) else str(value))
    for key in ("seconds_compress", "seconds_total"):
        if key in result:
            t.add_row(key.replace("_", " "), f"{result[key]:.1f}")
    if result.get("out"):
        t.add_row("saved to", result["out"])
    streamed = result.get("streamed")
    if streamed:
        if streamed.get("resumed_from_block") is not None:
            t.add_row("resumed from block", str(streamed["resumed_from_block"]))
        t.add_row("evaluation", streamed["evaluation"])
    console.print(t)
    _notes("adapted to their shape", rep.get("notes", {}))
    reasons: dict[str, list[str]] = {}
    for name, why in rep.get("kept_dense", {}).items():
        reasons.setdefault(why, []).append(name)
    _notes("kept dense", {", ".join(names): why for why, names in reasons.items()})


def _notes(title: str, notes: dict[str, str]) -> None:
    """One line per entry under a heading: which targets, and why (whole names, never cut)."""
    if not notes:
        return
    console.print(f"[bold]{title}:[/]")
    for names, why in notes.items():
        console.print(f"  {escape(names)}: {escape(why)}", soft_wrap=True, highlight=False)


def info_table(manifest: dict[str, Any], out: Console | None = None) -> None:
    """Print one row per compressed layer, then the totals, on ``out`` (default: stdout).

    The layer name is what a reader looks for, so it is the one column that never shrinks: at 80 columns
    rich would otherwise cut every row to ``model.layers…``. The numeric columns wrap their headers and
    values instead. Only when the names alone leave no room for the rest do they fold onto more lines,
    whole, rather than push the other columns off the edge of the terminal.
    """
    header = ("layer", "method", "shape", "bits per weight", "rel. error", "PQ error before / after pool")
    rows = [_info_row(name, layer) for name, layer in manifest["layers"].items()]
    out = out or console
    # the narrowest each column gets without breaking a word, plus 3 for its padding and separator; with
    # no outer edge the first and last columns pad on one side only, hence the -3
    narrowest = [max(len(word) for text in column for word in text.split()) for column in zip(header, *rows)]
    whole = sum(narrowest) + 3 * len(narrowest) - 3 <= out.width
    t = Table(title=f"{manifest['source'].get('model', '?')} (format {manifest['format_version']})", show_edge=False, pad_edge=False)
    t.add_column(header[0], no_wrap=whole, min_width=max(len(row[0]) for row in rows) if whole and rows else None, overflow="fold")
    # one short word per cell: these two never need to wrap, so rich takes the room from the wordier columns
    t.add_column(header[1], no_wrap=True, overflow="fold")
    t.add_column(header[2], no_wrap=True, overflow="fold")
    for title in header[3:]:
        t.add_column(title, justify="right", overflow="fold")
    for row in rows:
        t.add_row(*map(escape, row))
    out.print(t)
    totals = manifest["totals"]
    out.print(
        f"total {_mb(totals['compressed_bytes'])} vs {_mb(totals['original_fp16_bytes'])} FP16 "
        f"({totals['ratio']:.2f}x), {totals['bits_per_weight_all_in']:.3f} bits/weight all-in"
    )


def _info_row(name: str, layer: dict[str, Any]) -> tuple[str, ...]:
    q = layer["quantizer"]
    err = layer.get("rel_error")
    pool = f"{q['error_before_pool_']:.4f} / {q['error_after_pool_']:.4f}" if "error_after_pool_" in q else "-"
    return name, q["quantizer"], "x".join(map(str, q["shape_"])), f"{layer['bits_per_weight']:.3f}", "-" if err is None else f"{err:.4f}", pool
