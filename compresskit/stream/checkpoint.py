"""A streamed run's unfinished output, and how it resumes after a kill.

While a run goes on, its output lives in ``.<out>.partial/`` next to ``out`` (a fixed name, so a
later ``--resume`` finds it)::

    .<out>.partial/
      progress.json          what the run is (its fingerprint) and how far it got: the blocks done,
                             their reports and output errors, the files written
      blocks/<block>.safetensors   each finished block, written as it finishes
      model.safetensors      the tensors outside the blocks (written before the first block)
      carry-<k>/             the calibration inputs of block k (both streams), when it is next

Every file is written under a temporary name and renamed into place, and ``progress.json`` (also
renamed into place) is updated only after the files it names are complete, so a run killed at any
instant leaves a state it can resume from: the blocks ``progress.json`` lists, and the carry of the
next block. Only the finished run renames the folder to ``out``, so ``out`` never looks complete
when it is not.

The carry holds each recorded block call whole: the first argument (the hidden states, or the
stored reference to them) and every keyword argument (position embeddings, masks...), encoded as
JSON with the tensors in one safetensors file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from compresskit.calib.capture import Call
from compresskit.calib.offload import ActivationStore, Ref
from compresskit.calib.walk import ChainState
from compresskit.errors import CompressKitError
from compresskit.files import save_tensors

PROGRESS = "progress.json"
BLOCKS = "blocks"


def partial_dir(out: Path) -> Path:
    """Where the unfinished output of a run writing ``out`` lives."""
    return out.parent / f".{out.name}.partial"


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, renamed into place (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=_json_default))
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file at ``path``, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    save_tensors(tensors, tmp)
    os.replace(tmp, path)


def read_progress(folder: Path) -> dict[str, Any] | None:
    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CompressKitError(f"{path} is unreadable ({err}); remove {folder} to start over") from None


# ---- the carry: a ChainState on disk ----------------------------------------------------------
def save_carry(folder: Path, state: ChainState, store: ActivationStore) -> Path:
    """Write ``state`` (the next block's calls, both streams) as ``carry-<k>/``; returns its path."""
    tensors: dict[str, torch.Tensor] = {}
    index: dict[int, str] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, Ref):
            key = f"ref:{value.key}"
            tensors.setdefault(key, store.get(value).contiguous())
            return {"ref": value.key}
        if torch.is_tensor(value):
            if id(value) not in index:
                index[id(value)] = f"t{len(index)}"
                tensors[index[id(value)]] = value.detach().cpu().contiguous().clone()
            return {"tensor": index[id(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        if isinstance(value, (tuple, list)):
            return {type(value).__name__: [encode(v) for v in value]}
        if isinstance(value, dict):
            return {"dict": {str(k): encode(v) for k, v in value.items()}}
        raise CompressKitError(f"a block call holds a {type(value).__name__}, which a resumable run cannot write down")

    def calls(cs: list[Call]) -> list:
        return [{"args": encode(c.args), "kwargs": encode(c.kwargs)} for c in cs]

    same = state.fp_calls is state.calls
    record = {"next_block": state.next_block, "calls": calls(state.calls), "fp_calls": None if same else calls(state.fp_calls)}
    final = folder / f"carry-{state.next_block}"
    tmp = folder / f"carry-{state.next_block}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(tensors, tmp / "tensors.safetensors")
    (tmp / "calls.json").write_text(json.dumps(record))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_carry(path: Path, store: ActivationStore) -> ChainState:
    """The :class:`ChainState` :func:`save_carry` wrote; stored tensors go back into ``store``."""
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        record = json.loads((path / "calls.json").read_text())
    except Exception as err:
        raise CompressKitError(f"{path} is unreadable ({err}); remove {path.parent} to start over") from None
    for key, tensor in tensors.items():
        if key.startswith("ref:"):
            store.put(key[4:], tensor)

    def decode(value: dict) -> Any:
        (kind, v), = value.items()
        if kind == "ref":
            return Ref(v)
        if kind == "tensor":
            return tensors[v]
        if kind == "value":
            return v
        if kind in ("tuple", "list"):
            items = [decode(x) for x in v]
            return tuple(items) if kind == "tuple" else items
        return {k: decode(x) for k, x in v.items()}

    def calls(cs: list) -> list[Call]:
        return [Call(decode(c["args"]), decode(c["kwargs"])) for c in cs]

    ours = calls(record["calls"])
    return ChainState(record["next_block"], ours, ours if record["fp_calls"] is None else calls(record["fp_calls"]))


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
