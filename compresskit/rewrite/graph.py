"""Find a model's compression targets (layers, and bare tensors an adapter names), in the order its forward pass runs them.

Three paths, tried in this order (see ``docs/rewriting.md``):

1. ``torch.fx.symbolic_trace``: cheap and needs no inputs, but rejects Python control flow on
   tensors, ``*args`` signatures and most real LLaMA / DiT / U-Net code.
2. ``torch.export.export(..., strict=False)`` on example inputs: traces real models down to aten ops;
   every node carries ``meta["nn_module_stack"]``, the chain of modules that was running, from which
   the innermost compressible module is read back.
3. The module tree (``named_modules`` order) when no graph can be had: no example inputs, both
   tracers failed, or ``use_graph=False``. The reason is kept in ``TargetGraph.fallback_reason``.

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
from compresskit.nn import is_quantized
from compresskit.targets import Layout, Target, module_layout

Layouts = dict[type[nn.Module], tuple[str, Layout]]


@dataclass(frozen=True)
class TargetGraph:
    """The targets found, in execution order, and how they were found."""

    targets: tuple[Target, ...]
    method: str  # "symbolic_trace" | "export" | "module_tree"
    fallback_reason: str | None = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def __iter__(self) -> Iterator[Target]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


def layer_kind(module: nn.Module, layouts: Layouts | None = None) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"`` (or a registered kind), None when not a
    layer or compressed already."""
    found = None if is_quantized(module, "weight") else module_layout(module, layouts)
    return None if found is None else found[0]


def find_targets(
    model: nn.Module,
    example_args: tuple | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    include_embeddings: bool = False,
    use_graph: bool = True,
    layouts: Layouts | None = None,
    tensors: dict[str, Layout] | None = None,
) -> TargetGraph:
    """The compression targets of ``model`` in execution order; the model is not modified.

    Layers are found by ``isinstance`` (Linear, Conv1d, Conv2d, Embedding and subclasses) and by
    ``layouts`` (an adapter's own layer types); ``tensors`` adds bare parameters or buffers
    (``{"owner.attr": layout}``), listed after the layers. ``example_args`` / ``example_kwargs`` are
    what ``model(*args, **kwargs)`` accepts, needed only by the ``torch.export`` path (a lone tensor
    is one argument); pass ``use_cache=False`` to transformers models.
    """
    if not isinstance(model, nn.Module):
        raise CompressKitError(f"find_targets expects a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    if isinstance(example_args, torch.Tensor):  # a lone input, not a tuple of them
        example_args = (example_args,)
    tree = _Tree(model, include_embeddings, layouts or {}, tensors or {})
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
    """Names, aliases and tensor ties of the targets, read from the module tree."""

    def __init__(self, model: nn.Module, include_embeddings: bool, layouts: Layouts, tensors: dict[str, Layout]):
        self.include_embeddings = include_embeddings
        self.layouts = layouts
        self.by_name: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
        self.kinds: dict[int, tuple[str, Layout] | None] = {}
        self.canonical: dict[int, str] = {}  # id(module) -> first name in named_modules order
        self.aliases: dict[str, list[str]] = {}  # canonical name -> the module's other names
        for name, module in self.by_name.items():
            first = self.canonical.setdefault(id(module), name)
            if first != name and self.kind(module) is not None:
                self.aliases.setdefault(first, []).append(name)
        self.tree_order = [name for name, module in model.named_modules() if self.kind(module)]
        self.tensors = self._bare_tensors(model, tensors)
        sharing: dict[int, list[str]] = {}  # id(tensor) -> canonical names of the targets holding it
        for name in self.tree_order:
            sharing.setdefault(id(self.by_name[name].weight), []).append(name)
        for name, (owner, attr, _) in self.tensors.items():
            sharing.setdefault(id(getattr(self.by_name[owner], attr)), []).append(name)
        self.tied = {name: [n for n in group if n != name] for group in sharing.values() for name in group}

    def kind(self, module: nn.Module) -> tuple[str, Layout] | None:
        """The layer's kind and layout; None for a module that is no layer or is compressed already."""
        key = id(module)
        if key not in self.kinds:
            self.kinds[key] = None if is_quantized(module, "weight") else module_layout(module, self.layouts)
        return self.kinds[key]

    def _bare_tensors(self, model: nn.Module, tensors: dict[str, Layout]) -> dict[str, tuple[str, str, Layout]]:
        out = {}
        for name, layout in tensors.items():
            owner, _, attr = name.rpartition(".")
            module = self.by_name.get(owner)
            if module is None or not isinstance(getattr(module, attr, None), torch.Tensor):
                raise CompressKitError(f"tensor target {name!r} is not a parameter or buffer of the model")
            out[name] = (owner, attr, layout)
        return out

    def compressible(self, module: nn.Module) -> str | None:
        """The canonical name of ``module`` if it is a layer to report, else None."""
        found = self.kind(module)
        if found is None or (found[0] == "embedding" and not self.include_embeddings):
            return None
        return self.canonical[id(module)]

    def resolve(self, path: str) -> nn.Module | None:
        return self.by_name.get(path)

    def result(self, graph_order: list[str], method: str, reason: str | None) -> TargetGraph:
        seen = set(graph_order)
        dead = [n for n in self.tree_order if n not in seen and self.compressible(self.by_name[n])]
        targets = []
        for order, name in enumerate(graph_order + dead):
            module = self.by_name[name]
            kind, layout = self.kind(module)
            targets.append(
                Target(
                    name=name, owner=name, attr="weight", kind=kind, shape=tuple(module.weight.shape), layout=layout,
                    order=order, tied_to=tuple(self.tied.get(name, ())), aliases=tuple(self.aliases.get(name, ())),
                    in_graph=name in seen,
                )
            )
        for name, (owner, attr, layout) in self.tensors.items():
            tensor = getattr(self.by_name[owner], attr)
            targets.append(
                Target(name=name, owner=owner, attr=attr, kind="tensor", shape=tuple(tensor.shape), layout=layout,
                       order=len(targets), tied_to=tuple(self.tied.get(name, ())), in_graph=False)
            )
        return TargetGraph(tuple(targets), method, reason)


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
        owner = next((m for m in reversed(modules) if m is not None and tree.kind(m)), None)
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
