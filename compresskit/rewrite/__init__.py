"""Finding what to compress from the model graph, and choosing it by name."""
from compresskit.rewrite.graph import TargetGraph, find_targets, layer_kind
from compresskit.rewrite.select import Selection, parse_override, select_targets

__all__ = ["Selection", "TargetGraph", "find_targets", "layer_kind", "parse_override", "select_targets"]
