"""Swap a submodule by its dotted name, keeping shared modules consistent.

A module object reachable under several names (``model.a is model.b``) is one layer: by default
every name is pointed at the new module, so no path keeps running the old one. Pass
``all_aliases=False`` to replace only the given name (deliberately untying it).

Weight ties between *distinct* modules (``lm_head.weight is embed_tokens.weight``) are not aliases:
replacing ``lm_head`` leaves ``embed_tokens`` and its dense weight in place, and the tie is broken.
``find_layers`` reports such ties in ``LayerInfo.tied_to`` and ``select_layers`` keeps tied layers
dense unless all of them are compressed.
"""
from __future__ import annotations

from torch import nn

from compresskit.errors import CompressKitError


def replace_module(model: nn.Module, name: str, new_module: nn.Module, *, all_aliases: bool = True) -> nn.Module:
    """Put ``new_module`` at ``name`` (e.g. ``"model.layers.0.mlp.up_proj"``); return the old module."""
    if not isinstance(new_module, nn.Module):
        raise CompressKitError(f"the replacement for {name!r} must be a torch.nn.Module, got {type(new_module).__name__}")
    if not name:
        raise CompressKitError("cannot replace the model itself; give the dotted name of a submodule")
    old = _get(model, name)
    names = [name]
    if all_aliases:
        names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for target in names:
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, new_module)  # ModuleList / Sequential accept "0", "1", ... as attributes
    return old


def _get(model: nn.Module, name: str) -> nn.Module:
    module = model
    for i, part in enumerate(name.split(".")):
        child = module._modules.get(part)
        if child is None:
            where = ".".join(name.split(".")[:i]) or type(model).__name__
            raise CompressKitError(
                f"{where} has no submodule {part!r} (looking up {name!r}); check the name against model.named_modules()"
            )
        module = child
    return module
