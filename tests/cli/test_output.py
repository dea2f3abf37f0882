"""CLI output: `compresskit info` shows whole layer names at 80 columns, with every other column still there."""
import io

import pytest
from rich.console import Console

from compresskit.cli import output

NAMES = [
    "model.embed_tokens",
    "model.layers.29.self_attn.o_proj",  # SmolLM2's longest: 32 characters
    "model.layers.29.mlp.down_proj",
    "model.layers.0.self_attn.k_proj",
    "lm_head",
]


def manifest(names):
    layers = {}
    for i, name in enumerate(names):
        q = {"quantizer": "pq", "shape_": [576, 1536]}
        if i % 2:
            q.update(error_before_pool_=0.0123, error_after_pool_=0.0234)
        layers[name] = {"quantizer": q, "bits_per_weight": 3.3512, "rel_error": 0.1235}
    totals = {"compressed_bytes": 5.6e7, "original_fp16_bytes": 2.7e8, "ratio": 4.82, "bits_per_weight_all_in": 3.35}
    return {"source": {"model": "smollm2-135m"}, "format_version": 1, "layers": layers, "totals": totals}


def render(m, width):
    buf = io.StringIO()
    output.info_table(m, Console(file=buf, width=width, color_system=None))
    return buf.getvalue()


def test_info_table_keeps_whole_layer_names_at_80_columns():
    text = render(manifest(NAMES), 80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    for name in NAMES:
        assert any(name in line for line in lines), f"{name!r} is cut in:\n{text}"
    # the names did not push the other columns off the edge
    assert text.count("3.351") == len(NAMES) and text.count("0.1235") == len(NAMES)
    assert "0.0123" in text and "pool" in text and "4.82x" in text


@pytest.mark.parametrize("width", [120, 200])
def test_info_table_one_line_per_layer_when_there_is_room(width):
    lines = render(manifest(NAMES), width).splitlines()
    for name in NAMES:
        (row,) = [line for line in lines if name in line]
        assert "576x1536" in row and "3.351" in row


def test_names_wider_than_the_terminal_fold_whole_instead_of_being_cut():
    name = "transformer.encoder.layers.11.attention.self.query_key_value.base_layer"  # 72 characters
    text = render(manifest([name, "lm_head"]), 60)
    assert max(map(len, text.splitlines())) <= 60
    assert "…" not in text
    # every character of the name is printed, in order, down the first column
    first_column = "".join(line.split("│")[0].strip() for line in text.splitlines() if "│" in line)
    assert name in first_column
    assert text.count("3.351") == 2
