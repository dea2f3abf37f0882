"""The compressed-model file format: a directory, boring and safe.

::

    out_dir/
      manifest.json        format version, compresskit version, source model, per-layer method,
                           parameters, bits and errors, totals
      model.safetensors    every tensor: compressed-tensor state as ``<target>.<state>`` (codes
                           bit-packed) and the dense rest of the model in its dense dtype (float16
                           by default; tied tensors once). A streamed run (``compresskit.stream``)
                           writes one file per block instead, ``blocks/<block>.safetensors``, and
                           ``model.safetensors`` holds the rest; the manifest lists the files
      architecture/        what the adapter needs to rebuild an empty model (config, tokenizer)

No pickle anywhere: tensors are safetensors, metadata is JSON, and the model is rebuilt from its
config by the adapter (or from a skeleton the caller passes). A directory is written under a
temporary name next to the target and renamed into place, so an interrupted run leaves nothing
half-written behind.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from torch import nn

from compresskit.errors import CompressKitError
from compresskit.files import save_tensors, umask
from compresskit.nn import QuantizedTensor, owners_of, quantize_tensor, quantized_prefixes, quantized_tensors, share_tensor
from compresskit.registry import get_quantizer
from compresskit.report import CompressionReport, unique_dense_tensors
from compresskit.targets import Layout

# 2: each compressed target records its owner module, attribute and layout (bare tensors, stored-
# transposed weights) and the other owners of a tied tensor; 3: the manifest lists the tensor files
# (``tensor_files``: one, or one per block when compressed streaming); versions 1 and 2 still load
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"
ARCHITECTURE = "architecture"
DENSE_EXPORT = "dense"


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise CompressKitError(f"{target} already exists; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it 0o700; the result should read as a mkdir'd one would
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(
    model: nn.Module,
    report: CompressionReport,
    out_dir: str | Path,
    *,
    source: dict[str, Any],
    save_architecture=None,
    export_dense=None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed ``model`` to ``out_dir`` (see module docstring).

    ``source`` describes the original model (``model``, ``resolved``, ``revision``, ``adapter``);
    ``save_architecture(dir)`` writes what the adapter needs to rebuild the empty model;
    ``export_dense(dir)``, if given, writes an ordinary dequantized checkpoint under ``dense/``
    (call it with the model still compressed: it must dequantize a copy, see ``nn.densify``).
    """
    tensors, layers, tied = model_state(model, report)
    manifest = build_manifest(source, layers, tied, report, [TENSORS])
    with atomic_directory(out_dir, overwrite) as tmp:
        save_tensors(tensors, tmp / TENSORS)
        write_manifest(tmp, manifest)
        if save_architecture is not None:
            (tmp / ARCHITECTURE).mkdir()
            save_architecture(tmp / ARCHITECTURE)
        if export_dense is not None:
            (tmp / DENSE_EXPORT).mkdir()
            export_dense(tmp / DENSE_EXPORT)
    return Path(out_dir)


def model_state(model: nn.Module, report: CompressionReport, prefix: str = "", exclude: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """What :func:`save` writes of ``model``: ``(tensors, layers, tied)`` — every tensor by key
    (compressed state as ``<target>.<state>``, the dense rest in the report's dense dtype), each
    compressed target's manifest entry, and tied dense names with the name stored in their place.

    ``prefix``: ``model`` is the submodule of that name (e.g. ``"model.layers.3."``) of a larger model,
    and every key and owner gets it (streaming compression writes a block at a time this way);
    ``exclude``: submodules left out (the blocks, when it writes the rest).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    by_name = {r.name: r for r in report.layers}
    for name, (owner, attr, qt) in quantized_tensors(model).items():
        name, owner = prefix + name, prefix + owner
        quantizer = qt.bind()
        for key, tensor in quantizer.state_tensors().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu", tensor.dtype if not tensor.is_floating_point() else quantizer.stored_float_dtype()).contiguous()
        layer = by_name.get(name)
        also = [f"{prefix}{o}:{a}" for o, a in owners_of(model, qt) if (prefix + o, a) != (owner, attr)]
        layers[name] = {
            "quantizer": quantizer.state_meta(),
            "owner": owner,
            "attr": attr,
            "layout": qt.layout.to_json(),
            **({"also": also} if also else {}),
            "bits_per_weight": quantizer.size_report().bits_per_weight,
            "size_bits": quantizer.size_report().parts_bits,
            "rel_error": None if layer is None else layer.rel_error,
            **({} if layer is None else {"extra": layer.extra}),
        }
    tied: dict[str, str] = {}
    dense_dtype = getattr(torch, report.dense_dtype)
    dense = unique_dense_tensors(model, exclude)
    by_ptr = {(t.data_ptr(), t.numel()): n for n, t in dense.items()}
    outside = tuple(f"{name}." for name in exclude)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if outside and name.startswith(outside):
            continue
        if name in dense:
            t = tensor.detach().to("cpu")
            tensors[prefix + name] = (t.to(dense_dtype) if t.is_floating_point() else t).contiguous()
        else:
            twin = by_ptr.get((tensor.data_ptr(), tensor.numel()))
            if twin is not None and twin != name:
                tied[prefix + name] = prefix + twin
    return tensors, layers, tied


def build_manifest(source: dict[str, Any], layers: dict[str, Any], tied: dict[str, str], report: CompressionReport, tensor_files: list[str]) -> dict[str, Any]:
    """The manifest of a directory whose tensors are in ``tensor_files`` (paths relative to it)."""
    from compresskit import __version__

    return {
        "format_version": FORMAT_VERSION,
        "compresskit_version": __version__,
        "source": source,
        "tensor_files": list(tensor_files),
        "layers": layers,
        "tied": tied,
        "totals": {k: v for k, v in report.to_dict().items() if k != "layers"},
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a compressed-model directory, with a one-line error if it is not one."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CompressKitError(f"{path} is not a compresskit model directory (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CompressKitError(f"{manifest_path} is unreadable: {err}") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CompressKitError(
            f"{path} has format version {manifest.get('format_version')!r}; this compresskit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return manifest


def load_into(model: nn.Module, path: str | Path, cache: bool | None = None) -> nn.Module:
    """Fill ``model`` (an uncompressed skeleton of the same architecture) from a saved directory.

    ``cache``: keep each rebuilt dense tensor after its first use under ``torch.no_grad`` (fast
    repeated calls, the dense model's memory) or rebuild it at every call (the compressed model's
    memory). ``None``: cache when the dense float32 tensors take at most half of the memory this
    machine has available now (a 7B model's 27 GB does not: it is rebuilt layer by layer).
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in manifest.get("tensor_files", [TENSORS]):
        try:
            tensors.update(load_file(str(path / file)))
        except Exception as err:  # safetensors raises several types for a damaged or missing file
            raise CompressKitError(f"{path / file} is unreadable: {err}") from None
    modules = dict(model.named_modules())
    made: list[QuantizedTensor] = []
    for name, layer in manifest["layers"].items():
        meta = layer["quantizer"]
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix) :].endswith("_")}
        owner, attr = layer.get("owner", name), layer.get("attr", "weight")
        holders = [(owner, attr)] + [tuple(h.rsplit(":", 1)) for h in layer.get("also", [])]
        for o, a in holders:
            if o not in modules or not isinstance(getattr(modules[o], a, None), torch.Tensor):
                raise CompressKitError(f"{path}: target {name!r} ({o}.{a}) does not exist in the model being loaded; wrong architecture?")
        quantizer = get_quantizer(meta["quantizer"]).from_state(state, meta)
        try:
            qt = quantize_tensor(modules[owner], attr, quantizer, Layout.from_json(layer.get("layout")))
        except CompressKitError as err:
            raise CompressKitError(f"{path}: target {name!r}: {err}; wrong architecture?") from None
        for o, a in holders[1:]:
            share_tensor(modules[o], a, qt)
        made.append(qt)
    if cache is None:
        cache = dense_fits(sum(math.prod(qt.quantizer.shape_) for qt in made) * 4)
    for qt in made:
        qt.cache = cache
    dense = {k: v for k, v in tensors.items() if not _is_layer_state(k, manifest["layers"])}
    for name, twin in manifest.get("tied", {}).items():
        dense.setdefault(name, dense[twin])
    own = model.state_dict()
    for key, value in dense.items():
        if key in own and own[key].is_floating_point():
            dense[key] = value.to(own[key].dtype)
    del tensors  # what is still needed is in dense and in the compressed tensors
    # a skeleton on the meta device (load_compressed builds one) takes the read tensors themselves
    empty = any(t.is_meta for t in own.values())
    shared = _shared_parameters(model) if empty else []
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=empty)
    for names in shared:  # assigning gave each name its own Parameter: one object again, as before
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    skip = tuple(quantized_prefixes(model))
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise CompressKitError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def dense_fits(n_bytes: int) -> bool:
    """Do ``n_bytes`` take at most half of the memory available now (``MemAvailable``)? True where unknown."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return n_bytes <= available // 2


def _shared_parameters(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that more than one module holds (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def load_compressed(path: str | Path, adapter_name: str | None = None, lut: bool = False, cache: bool | None = None):
    """Rebuild a saved model with its adapter (the one recorded, or ``adapter_name``): returns
    ``(LoadedModel, adapter)``. ``lut``: serve token-by-token calls of codebook-compressed Linear
    layers with the lookup-table kernel (:func:`compresskit.nn.lut.enable_lut`, ``docs/inference.md``).
    ``cache``: as for :func:`load_into`."""
    from compresskit.adapters import get_adapter
    from compresskit.stream.weights import empty_parameters

    path = Path(path)
    manifest = read_manifest(path)
    name = adapter_name or manifest["source"].get("adapter")
    if not name:
        raise CompressKitError(f"{path} records no adapter to rebuild the model; use compresskit.load(dir, model=your_skeleton)")
    adapter = get_adapter(name)()
    # parameters on the meta device: a compressed 7B model loads without its float32 skeleton (27 GB)
    with empty_parameters():
        loaded = adapter.load_architecture(path / ARCHITECTURE)
    load_into(loaded.model, path, cache=cache)
    if lut:
        from compresskit.nn.lut import enable_lut

        enable_lut(loaded.model)
    loaded.source = str(path)
    loaded.resolved = str(path)
    return loaded, adapter


def load(path: str | Path, model: nn.Module | None = None, lut: bool = False, cache: bool | None = None) -> nn.Module:
    """Load a compressed model directory.

    With ``model`` (an uncompressed skeleton of the right architecture, e.g. your own module
    freshly constructed) the saved state is loaded into it; without, the adapter recorded in the
    manifest rebuilds the architecture from the directory. ``lut``: as for :func:`load_compressed`;
    ``cache``: as for :func:`load_into`.
    """
    if model is not None:
        model = load_into(model, path, cache=cache)
        if lut:
            from compresskit.nn.lut import enable_lut

            enable_lut(model)
        return model
    return load_compressed(path, lut=lut, cache=cache)[0].model


def _is_layer_state(key: str, layers: dict[str, Any]) -> bool:
    prefix, _, attr = key.rpartition(".")
    return prefix in layers and attr.endswith("_")


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
