"""A model that never is in memory whole: parameters on the meta device, read one module at a time.

* :func:`empty_parameters` builds a model whose parameters are on the meta device (no memory) while
  its buffers are real, so what a model computes in its constructor (LLaMA's rotary frequencies)
  is there without any checkpoint.
* :class:`ShardedWeights` reads single tensors from a checkpoint's safetensors files (one file, or
  the shards a ``model.safetensors.index.json`` maps), each read opening its file lazily and
  closing it, so no shard stays mapped.
* :func:`materialise` fills one module (a block, or the tensors outside every block) from it, in
  float32; :func:`release` puts the meta tensors back, so that module's memory is freed.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from compresskit.errors import CompressKitError

INDEX = "model.safetensors.index.json"


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to the meta device as it is registered.

    The tensor a layer's constructor allocates (``torch.empty``, never touched) is dropped at once,
    so building a 7B model this way costs no memory; initialisation on meta tensors does nothing.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is kept as it is: tying assigns the same object twice
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class ShardedWeights:
    """The tensors of a safetensors checkpoint in ``directory``, read one at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        self.files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CompressKitError(f"{index} is unreadable: {err}") from None
            self.files = {key: self.directory / name for key, name in weight_map.items()}
            missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
            if missing:
                raise CompressKitError(f"{index} names a shard that is not there: {missing[0]}")
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise CompressKitError(f"{self.directory} has no .safetensors weights to stream from")
            for shard in shards:
                for key in self._keys(shard):
                    self.files[key] = shard

    @staticmethod
    def _keys(shard: Path) -> list[str]:
        try:
            with safe_open(str(shard), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # safetensors raises several types for a damaged file
            raise CompressKitError(f"{shard} is unreadable: {err}") from None

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored (its own dtype), in ordinary memory."""
        if key not in self.files:
            raise CompressKitError(f"{self.directory}: the checkpoint has no tensor {key!r}; streaming reads checkpoints whose names are the model's state_dict keys")
        try:
            with safe_open(str(self.files[key]), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as err:
            raise CompressKitError(f"{self.files[key]}: cannot read {key!r}: {err}") from None


def _named_tensors(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """Persistent tensors of ``module`` outside the submodules ``skip``, by tensor: each with every
    ``(state_dict key, owner, attr, is_parameter)`` holding it (a tied tensor has several)."""
    out: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        if any(owner_name == s or owner_name.startswith(s + ".") for s in skip):
            continue
        persistent = [n for n in owner._buffers if n not in owner._non_persistent_buffers_set]
        items = [(n, t, True) for n, t in owner._parameters.items()] + [(n, owner._buffers[n], False) for n in persistent]
        for attr, tensor, is_param in items:
            if tensor is not None:
                out.setdefault(id(tensor), []).append((f"{owner_name}.{attr}".lstrip("."), owner, attr, is_param))
    return out


def materialise(module: nn.Module, prefix: str, weights: ShardedWeights, skip: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> int:
    """Read ``module``'s persistent tensors (keys ``prefix + name``; not those under ``skip``) from
    ``weights``; float ones become ``dtype``. A tied tensor is read once, under whichever of its
    names the checkpoint has, and stays one tensor. Returns the bytes now held."""
    held = 0
    for holders in _named_tensors(module, skip).values():
        key = next((prefix + k for k, *_ in holders if prefix + k in weights), prefix + holders[0][0])
        tensor = weights.read(key)
        _, owner, attr, is_param = holders[0]
        expected = tuple((owner._parameters if is_param else owner._buffers)[attr].shape)
        if tuple(tensor.shape) != expected:
            raise CompressKitError(f"{key}: the checkpoint's shape {tuple(tensor.shape)} is not the model's {expected}; wrong config?")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        value = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
        for _, o, a, p in holders:
            (o._parameters if p else o._buffers)[a] = value
        held += tensor.numel() * tensor.element_size()
    return held


def release(model: nn.Module, name: str, template: nn.Module) -> None:
    """Put ``template`` (a meta copy kept aside) in place of ``model``'s submodule ``name``, so the
    real one and everything it holds is freed."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = template


def release_tensors(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Move ``module``'s persistent tensors outside ``skip`` back to the meta device (tied ones stay tied)."""
    for holders in _named_tensors(module, skip).values():
        _, owner, attr, is_param = holders[0]
        meta = (owner._parameters if is_param else owner._buffers)[attr].detach().to("meta")
        value = nn.Parameter(meta, requires_grad=False) if is_param else meta
        for _, o, a, p in holders:
            (o._parameters if p else o._buffers)[a] = value
