"""Module rewriting driven by the model graph: find layers, select them, swap them."""
from compresskit.rewrite.graph import LayerGraph, LayerInfo, find_layers, layer_kind
from compresskit.rewrite.replace import replace_module
from compresskit.rewrite.select import Selection, parse_override, select_layers

__all__ = [
    "LayerGraph",
    "LayerInfo",
    "Selection",
    "find_layers",
    "layer_kind",
    "parse_override",
    "replace_module",
    "select_layers",
]
