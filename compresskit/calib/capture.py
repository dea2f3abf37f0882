"""Capture: what calibration records of a forward pass, with hooks, one pass at a time.

* :func:`capture_calls` records the inputs (positional and keyword arguments) of one or more modules
  for every calibration batch, in **one** forward pass per batch, which stops as soon as the last of
  them has been reached. With one module that is "the inputs of the first block"; with every block
  of an unchained model (a U-Net, whose skip connections feed later blocks) it is all their inputs
  at once, so nothing re-runs a prefix of the model per block.
* :func:`is_chained` checks on one batch whether each block's output is the next block's input.
* :func:`layer_rows` turns a layer's input into the rows ``X`` with ``output = X @ W2d.T``.

The large first positional tensor of each call goes to the :class:`ActivationStore` (memory or
disk); the rest is kept as it is. ``clean`` is the adapter's ``clean_block_call`` (an LM drops its KV
cache, which every replay would otherwise append to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from compresskit.calib.hessian import conv_inputs
from compresskit.calib.offload import ActivationStore
from compresskit.errors import CompressKitError
from compresskit.targets import Layout

Clean = Callable[[tuple, dict], tuple[tuple, dict]]


@dataclass
class Call:
    """One recorded module call: its positional and keyword arguments (tensors possibly stored as refs)."""

    args: tuple
    kwargs: dict[str, Any]

    def with_input(self, first) -> "Call":
        """The same call with another first positional argument (the next block's input)."""
        return Call((first,) + self.args[1:], self.kwargs)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


def _no_change(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, kwargs


def capture_calls(
    model: nn.Module,
    modules: Sequence[nn.Module],
    batches: Sequence[dict],
    store: ActivationStore,
    tag: str,
    clean: Clean | None = None,
) -> list[list[Call]]:
    """The inputs of each of ``modules`` for every batch: ``calls[i][j]`` is module i's call on batch j.

    One forward pass per batch, stopped once the last module has run. A module reached more than once
    in a pass keeps its first call. Stored tensors are keyed ``{tag}{i}_{j}``.
    """
    clean = clean or _no_change
    calls: list[list[Call]] = [[] for _ in modules]
    pending: set[int] = set()

    def hook_for(i: int):
        def hook(_module, args, kwargs):
            if i not in pending:
                return None
            args, kwargs = clean(tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
            if args and torch.is_tensor(args[0]):
                args = (store.put(f"{tag}{i}_{len(calls[i])}", args[0]),) + tuple(args[1:])
            calls[i].append(Call(tuple(args), dict(kwargs)))
            pending.discard(i)
            if not pending:
                raise _Stop
            return None

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in batches:
                pending.update(range(len(modules)))
                try:
                    model(**batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if any(len(c) != len(batches) for c in calls):
        raise CompressKitError("a block was not reached by every calibration batch; wrong block names?")
    return calls


def is_chained(model: nn.Module, blocks: Sequence[str], batch: dict) -> bool:
    """Is each block's output the next block's first input (LLaMA decoder layers are)? Checked on one batch."""
    seen: dict[str, tuple] = {}
    handles = []
    for name in blocks:

        def hook(_m, args, output, name=name):
            seen.setdefault(name, (args[0] if args else None, output[0] if isinstance(output, (tuple, list)) else output))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(blocks, blocks[1:]):
        out, nxt = seen.get(a, (None, None))[1], seen.get(b, (None, None))[0]
        if not (torch.is_tensor(out) and torch.is_tensor(nxt) and out.shape == nxt.shape and torch.equal(out, nxt)):
            return False
    return True


def run_call(module: nn.Module, call: Call, store: ActivationStore) -> torch.Tensor:
    """``module``'s (first) output on one recorded call."""
    out = module(*(store.resolve(a) for a in call.args), **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_rows(module: nn.Module, layout: Layout, x: torch.Tensor) -> torch.Tensor:
    """A layer's input ``x`` as rows ``[N, n]`` such that its output is ``rows @ W2d.T`` (``W2d``: the
    weight as the quantizer sees it, flattened to ``[out, n]``)."""
    if layout.inputs == "conv2d":
        return conv_inputs(x, module)
    if layout.inputs == "conv1d":
        k, pad, stride = module.kernel_size[0], module.padding[0], module.stride[0]
        cols = torch.nn.functional.unfold(x.unsqueeze(-1), (k, 1), padding=(pad, 0), stride=(stride, 1))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if layout.inputs == "linear":
        return x.reshape(-1, x.shape[-1])
    raise CompressKitError(f"a {type(module).__name__} target has no input activations to calibrate on")
