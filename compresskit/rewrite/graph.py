"""Find a model's compressible layers, in the order its forward pass runs them.

Three paths, tried in this order (see ``docs/rewriting.md``):

1. ``torch.fx.symbolic_trace``: cheap and needs no inputs, but rejects Python control flow on
   tensors, ``*args`` signatures and most real LLaMA / DiT / U-Net code.
2. ``torch.export.export(..., strict=False)`` on example inputs: traces real models down to aten ops;
   every node carries ``meta["nn_module_stack"]``, the chain of modules that was running, from which
   the innermost compressible module is read back.
3. The module tree (``named_modules`` order) when no graph can be had: no example inputs, both
   tracers failed, or ``use_graph=False``. The reason is kept in ``LayerGraph.fallback_reason``.

Execution order matters to block-by-block calibration; a layer called twice is listed once, at its
first call, and layers the forward never calls ("dead" layers) are appended with ``in_graph=False``
so nothing is silently skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from compresskit.errors import CompressKitError

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "linear"),
    (nn.Conv1d, "conv1d"),
    (nn.Conv2d, "conv2d"),
    (nn.Embedding, "embedding"),
)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer.

    ``aliases`` are other names of this very module object (it is reachable twice in the tree);
    ``tied_to`` are *other* modules whose weight is the same tensor (e.g. ``lm_head`` and
    ``model.embed_tokens`` in a tied LLaMA). ``in_graph`` is False for a layer the traced forward
    never called and for every layer found by the module-tree fallback.
    """

    name: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "embedding"
    weight_shape: tuple[int, ...]
    order: int
    tied_to: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    in_graph: bool = True


@dataclass(frozen=True)
class LayerGraph:
    """The layers found, in execution order, and how they were found."""

    layers: tuple[LayerInfo, ...]
    method: str  # "symbolic_trace" | "export" | "module_tree"
    fallback_reason: str | None = None

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``, or None when not compressible."""
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return None


def find_layers(
    model: nn.Module,
    example_args: tuple | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    include_embeddings: bool = False,
    use_graph: bool = True,
) -> LayerGraph:
    """The compressible layers of ``model`` in execution order; the model is not modified.

    ``example_args`` / ``example_kwargs`` are what ``model(*args, **kwargs)`` accepts; they are only
    needed by the ``torch.export`` path (a lone tensor is taken as one argument); pass
    ``use_cache=False`` to transformers models, whose cache object is not exportable.
    """
    if not isinstance(model, nn.Module):
        raise CompressKitError(f"find_layers expects a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    if isinstance(example_args, torch.Tensor):  # a lone input, not a tuple of them
        example_args = (example_args,)
    tree = _Tree(model, include_embeddings)
    if not use_graph:
        return tree.result([], "module_tree", "use_graph=False")

    reasons = []
    try:
        order = _order_from_symbolic_trace(model, tree)
    except Exception as err:  # any tracer failure means "no graph this way"; the reason is kept
        reasons.append(f"symbolic_trace failed: {_one_line(err)}")
    else:
        return tree.result(order, "symbolic_trace", None)

    if not example_args and not example_kwargs:
        reasons.append("export skipped: no example inputs given")
        return tree.result([], "module_tree", "; ".join(reasons))
    try:
        order = _order_from_export(model, tuple(example_args), dict(example_kwargs or {}), tree)
    except Exception as err:
        reasons.append(f"torch.export failed: {_one_line(err)}")
        return tree.result([], "module_tree", "; ".join(reasons))
    return tree.result(order, "export", reasons[0])

class _Tree:
    """Names, aliases and weight ties of the compressible modules, read from the module tree."""

    def __init__(self, model: nn.Module, include_embeddings: bool):
        self.include_embeddings = include_embeddings
        self.by_name: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
        self.canonical: dict[int, str] = {}  # id(module) -> first name in named_modules order
        self.aliases: dict[str, list[str]] = {}  # canonical name -> the module's other names
        for name, module in self.by_name.items():
            first = self.canonical.setdefault(id(module), name)
            if first != name and layer_kind(module) is not None:
                self.aliases.setdefault(first, []).append(name)
        self.tree_order = [name for name, module in model.named_modules() if layer_kind(module)]
        sharing: dict[int, list[str]] = {}  # id(weight) -> canonical names of modules using it
        for name in self.tree_order:
            sharing.setdefault(id(self.by_name[name].weight), []).append(name)
        self.tied = {name: [n for n in group if n != name] for group in sharing.values() for name in group}

    def compressible(self, module: nn.Module) -> str | None:
        """The canonical name of ``module`` if it is a layer to report, else None."""
        kind = layer_kind(module)
        if kind is None or (kind == "embedding" and not self.include_embeddings):
            return None
        return self.canonical[id(module)]

    def resolve(self, path: str) -> nn.Module | None:
        return self.by_name.get(path)

    def result(self, graph_order: list[str], method: str, reason: str | None) -> LayerGraph:
        seen = set(graph_order)
        dead = [n for n in self.tree_order if n not in seen and self.compressible(self.by_name[n])]
        layers = []
        for order, name in enumerate(graph_order + dead):
            module = self.by_name[name]
            layers.append(
                LayerInfo(
                    name=name,
                    kind=layer_kind(module),
                    weight_shape=tuple(module.weight.shape),
                    order=order,
                    tied_to=tuple(self.tied.get(name, ())),
                    aliases=tuple(self.aliases.get(name, ())),
                    in_graph=name in seen,
                )
            )
        return LayerGraph(tuple(layers), method, reason)


class _FirstUse:
    """Canonical layer names in order of first use; later uses are ignored."""

    def __init__(self, tree: _Tree):
        self.tree = tree
        self.names: list[str] = []
        self._seen: set[str] = set()

    def add(self, module: nn.Module | None) -> bool:
        name = None if module is None else self.tree.compressible(module)
        if name is None:
            return False
        if name not in self._seen:
            self._seen.add(name)
            self.names.append(name)
        return True


def _order_from_symbolic_trace(model: nn.Module, tree: _Tree) -> list[str]:
    graph = torch.fx.symbolic_trace(model).graph
    found = _FirstUse(tree)
    for node in graph.nodes:
        if node.op == "call_module":
            module = tree.resolve(node.target)
            if not found.add(module) and module is not None:
                # A leaf the tracer did not enter (e.g. nn.MultiheadAttention owns out_proj):
                # its compressible children run here, in module-tree order.
                for child in module.modules():
                    found.add(child)
        elif node.op == "get_attr" and node.target.endswith(".weight"):
            found.add(tree.resolve(node.target.rsplit(".", 1)[0]))  # weight used functionally
    return found.names


def _order_from_export(model: nn.Module, args: tuple, kwargs: dict[str, Any], tree: _Tree) -> list[str]:
    training = [(module, module.training) for module in model.modules()]
    try:
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs=kwargs, strict=False)
    finally:
        for module, mode in training:  # export must leave the model as it found it
            module.training = mode
    params = program.graph_signature.inputs_to_parameters  # placeholder name -> parameter FQN
    found = _FirstUse(tree)
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        modules = [tree.resolve(_normalize_path(path)) for path, _cls in stack.values()]
        owner = next((m for m in reversed(modules) if m is not None and layer_kind(m)), None)
        if owner is not None:  # innermost layer running this op (it may be an unreported embedding)
            found.add(owner)
            continue
        for arg in node.all_input_nodes:  # a weight used outside its module's forward
            param = params.get(arg.name, "")
            module = tree.resolve(param.removesuffix(".weight")) if param.endswith(".weight") else None
            if module is not None and not tree.tied.get(tree.canonical[id(module)]):  # tied: ambiguous
                found.add(module)
    return found.names


_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def _normalize_path(path: str) -> str:
    """``"L['self'].layers[0].fc"`` or ``"layers.0.fc"`` -> ``"layers.0.fc"``."""
    path = path.removeprefix("L['self']").removeprefix("L__self__")
    return _INDEX.sub(r".\1", path).strip(".")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
