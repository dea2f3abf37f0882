"""Streaming compression: a model larger than memory, one block at a time, resumable after a kill.

:func:`compress_streaming` is :func:`compresskit.compress` for a model that is never in memory
whole (see ``docs/streaming.md``):

1. the adapter builds the model with its parameters on the meta device and opens its safetensors
   checkpoint (:meth:`Adapter.load_empty`);
2. the tensors outside the blocks (embeddings, final norm, head) are read; the calibration batches
   run up to the first block, whose inputs are captured; the targets outside the blocks are
   compressed from their weights; all of it is written and freed;
3. each block in turn is read in float32, compressed by the same walk as :func:`compress` (its
   inputs are the previous compressed block's outputs, with the original model's beside them),
   written to its own file, and freed. The next block's inputs are written down too, so a killed run
   resumes from its last finished block (``resume=True``) and ends bit-identical to one that was
   never stopped.

Memory holds one float32 block, its layers' statistics, the calibration activations (on disk with
``offload_dir``) and the tensors outside the blocks while they are read; never the whole model.
The uncompressed copy of a block that asymmetric targets need is read again from the checkpoint
for each statistics pass, not held while layers are fitted; large allocations are kept out of
glibc's heap (:func:`bound_heap`), which otherwise grows by gigabytes on a 7B layer.

Whole-model steps cannot stream: EM rounds (``em_rounds``, ``m_objective`` task / distill) are refused.
The block M-step (``m_objective="block"``) trains block by block and streams.
"""
from __future__ import annotations

import base64
import copy
import ctypes
import functools
import gc
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compresskit.adapters.base import Adapter
from compresskit.calib.config import CalibrationConfig
from compresskit.calib.offload import ActivationStore
from compresskit.compress import Progress, _compress_from_weight, _with_adapter_defaults, choose_targets, layer_report, plan_quantizer
from compresskit.config import CompressConfig
from compresskit.errors import CompressKitError
from compresskit.io import ARCHITECTURE, TENSORS, build_manifest, model_state, write_manifest
from compresskit.quantizers.sizes import SizeReport
from compresskit.report import CompressionReport, LayerReport, dense_size
from compresskit.stream.checkpoint import BLOCKS, PROGRESS, load_carry, partial_dir, read_progress, save_carry, write_json, write_tensors
from compresskit.stream.weights import materialise, release, release_tensors

# (block index, block name, seconds): called after each block is written
OnBlock = Callable[[int, str, float], None]


@dataclass
class StreamResult:
    """What a streamed run did: its report, where it wrote, the seconds each block took (this run's
    blocks only, by name) and the block it resumed from (None: it started afresh). A run stopped
    by ``max_blocks`` has no report yet and ``out`` is its unfinished folder (``finished`` False)."""

    report: CompressionReport | None
    out: Path
    block_seconds: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    finished: bool = True


def compress_streaming(
    spec: str | None,
    out: str | Path,
    config: CompressConfig | None = None,
    *,
    adapter: Adapter,
    calibration: CalibrationConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_block: OnBlock | None = None,
    max_blocks: int | None = None,
) -> StreamResult:
    """Compress the model ``spec`` (as ``adapter.load_empty`` reads it) block by block into ``out``.

    ``calibration``: as for :func:`compresskit.compress` (None: from the weights alone). ``resume``:
    continue the unfinished run writing ``out`` (its settings must be the same); without it an
    unfinished run is an error, and ``overwrite`` starts over (also replacing a finished ``out``).
    ``max_blocks``: stop (resumably) after compressing that many blocks in this call.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressKitError(f"{out} already exists; choose another --out or pass --overwrite")
    if not adapter.supports("load_empty"):
        adapter.load_empty(spec)  # raises the adapter's one-line refusal
    config = _with_adapter_defaults(config or CompressConfig(), adapter).validated()
    if config.prepare:
        raise CompressKitError("preparation options (CompressConfig.prepare, --option) need the whole model in memory; they cannot go with --stream / --resume")
    if calibration is not None:
        calibration = calibration.validated()
        if calibration.em_rounds or calibration.m_objective in ("task", "distill"):
            raise CompressKitError("streaming compresses block by block; whole-model EM rounds (em_rounds, m_objective task or distill) need the whole model: use the preset fast, zero-data or none")
    bound_heap()
    loaded, weights = adapter.load_empty(spec)
    model = loaded.model
    blocks = list(adapter.blocks(model) or [])
    if not blocks:
        raise CompressKitError(f"{loaded.source}: streaming needs the model's blocks, and the {adapter.name!r} adapter finds none")
    graph, selection = choose_targets(model, config, adapter)
    by_name = {t.name: t for t in graph.targets}
    selected = [by_name[n] for n in selection.compress]
    in_block = {t.name: next((b for b in blocks if t.owner == b or t.owner.startswith(b + ".")), None) for t in selected}
    for t in selected:
        if in_block[t.name] is not None and t.tied_to:
            raise CompressKitError(f"{t.name!r} shares its tensor with {t.tied_to[0]!r}; streaming cannot compress a tied tensor inside a block: keep it dense")
    by_block = {b: [t for t in selected if in_block[t.name] == b] for b in blocks}
    outside = [t for t in selected if in_block[t.name] is None]
    dense_kept, notes = dict(selection.dense), {}

    def plan(target):
        return plan_quantizer(config, target, selection.compress[target.name], dense_kept, notes)

    def compress_plain(target):
        quantizer = plan(target)
        return None if quantizer is None else _compress_from_weight(model, target, quantizer, by_name)

    fingerprint = _roundtrip({
        "source": loaded.resolved, "adapter": adapter.name, "blocks": blocks,
        "config": asdict(config), "calibration": None if calibration is None else calibration.to_dict(),
    })
    folder = partial_dir(out)
    record = read_progress(folder) if folder.exists() else None
    resumed_from = None
    if record is not None and not overwrite:
        if not resume:
            raise CompressKitError(f"an unfinished run writing {out} is in {folder}; pass --resume to continue it, or --overwrite to start over")
        if record["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if fingerprint[k] != record["fingerprint"].get(k))
            raise CompressKitError(f"the unfinished run in {folder} was started with other settings ({', '.join(changed)}); run it with the same ones, or pass --overwrite to start over")
        resumed_from = record["blocks_done"]
    else:
        shutil.rmtree(folder, ignore_errors=True)
        (folder / BLOCKS).mkdir(parents=True)
        record = {"fingerprint": fingerprint, "rest_done": False, "blocks_done": 0, "reports": [], "layers": {}, "tied": {},
                  "dense": [0, 0], "block_errors": {}, "block_seconds": {}, "notes": {}, "kept_dense": {}}

    dtype = getattr(torch, config.dense_dtype)
    skeleton = CompressionReport([], SizeReport(0, {}), graph.method, dense_dtype=config.dense_dtype)
    total = len(selected)
    timings: dict[str, float] = {}
    templates: dict[str, torch.nn.Module] = {}  # the block being compressed, as a meta copy
    calibrator = None
    with ActivationStore(calibration.offload_dir if calibration is not None else None) as store:
        # the tensors outside the blocks: read for the calibration inputs (and noise statistics)
        materialise(model, "", weights, skip=tuple(blocks))
        state = None
        if calibration is not None:
            from compresskit.calib.build import build_calibrator

            calibrator = build_calibrator(model, loaded, adapter, calibration)
            walk = calibrator.walk
            walk.store = store
            walk.original_block = _reread_original(templates, weights)
            walk.begin(plan, compress_plain, layer_report, progress, total=total, done=len(record["reports"]))
            walk.block_errors.update(record["block_errors"])
        if not record["rest_done"]:
            if calibrator is not None:
                state = calibrator.walk.chain_start(model)
            reports = [compress_plain(t) for t in outside if not t.tied_to] + _compress_tied(outside, compress_plain)
            skeleton.layers = [r for r in reports if r is not None]
            tensors, layers, tied = model_state(model, skeleton, exclude=tuple(blocks))
            write_tensors(folder / TENSORS, tensors)
            dense = dense_size(model, torch.finfo(dtype).bits, exclude=tuple(blocks))
            if state is not None:
                save_carry(folder, state, store)
            record.update(rest_done=True, reports=[r.to_dict() for r in skeleton.layers], layers=layers, tied=tied, dense=[dense.n_weights, dense.total_bits])
            _save_record(folder, record, dense_kept, notes)
        else:
            if calibrator is not None:
                state = load_carry(folder / f"carry-{record['blocks_done']}", store)
                calibrator.walk.asymmetric = calibrator.config.asymmetric  # what chain_start sets
            torch.set_rng_state(torch.tensor(list(base64.b64decode(record["rng"])), dtype=torch.uint8))
        release_tensors(model, skip=tuple(blocks))
        _free_memory()

        stop = len(blocks) if max_blocks is None else min(len(blocks), record["blocks_done"] + max_blocks)
        for i in range(record["blocks_done"], stop):
            start = time.perf_counter()
            name = blocks[i]
            templates[name] = copy.deepcopy(model.get_submodule(name))  # meta: costs nothing
            block = model.get_submodule(name)
            materialise(block, name + ".", weights)
            if state is not None:
                reports = calibrator.walk.chain_step(model, state, by_block[name])
            else:
                reports = []
                for target in by_block[name]:
                    if progress is not None:
                        progress(target.name, len(record["reports"]) + len(reports), total)
                    reports.append(compress_plain(target))
            skeleton.layers = [r for r in reports if r is not None]
            tensors, layers, tied = model_state(block, skeleton, prefix=name + ".")
            write_tensors(folder / BLOCKS / f"{name}.safetensors", tensors)
            dense = dense_size(block, torch.finfo(dtype).bits)
            if state is not None:
                save_carry(folder, state, store)
                record["block_errors"] = dict(calibrator.walk.block_errors)
            timings[name] = time.perf_counter() - start
            record["reports"] += [r.to_dict() for r in skeleton.layers]
            record["layers"].update(layers)
            record["tied"].update(tied)
            record["dense"] = [record["dense"][0] + dense.n_weights, record["dense"][1] + dense.total_bits]
            record["blocks_done"] = i + 1
            record["block_seconds"][name] = timings[name]
            _save_record(folder, record, dense_kept, notes)
            shutil.rmtree(folder / f"carry-{i}", ignore_errors=True)
            release(model, name, templates.pop(name))
            del block, reports, tensors
            _free_memory()
            if on_block is not None:
                on_block(i, name, timings[name])
    if record["blocks_done"] < len(blocks):
        return StreamResult(None, folder, timings, resumed_from, finished=False)
    if progress is not None:
        progress("", total, total)

    report = CompressionReport(
        [_layer_report(d) for d in record["reports"]], SizeReport(record["dense"][0], {"dense": record["dense"][1]}),
        graph.method, graph.fallback_reason,
    )
    report.kept_dense = {**record["kept_dense"], **dense_kept}
    report.notes = {**record["notes"], **notes}
    report.dense_dtype = config.dense_dtype
    report.calibration = {} if calibrator is None else {**calibrator.config.to_dict(), "asymmetric_used": calibrator.asymmetric}
    source = {"model": loaded.source, "resolved": loaded.resolved, "revision": loaded.revision, "adapter": adapter.name, "streamed": True}
    files = [TENSORS] + [f"{BLOCKS}/{b}.safetensors" for b in blocks]
    write_manifest(folder, build_manifest(source, record["layers"], record["tied"], report, files))
    if adapter.supports("save_architecture"):
        (folder / ARCHITECTURE).mkdir(exist_ok=True)
        adapter.save_architecture(loaded, folder / ARCHITECTURE)
    for leftover in [folder / PROGRESS, *folder.glob("carry-*")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    _move_into_place(folder, out)
    return StreamResult(report, out, timings, resumed_from)


def _reread_original(templates: dict[str, torch.nn.Module], weights) -> Callable:
    """The walk's ``original_block`` for a streamed run: the uncompressed block is read again from
    the checkpoint for each statistics pass that needs it and dropped after it, instead of a float32
    copy held while the block's layers are fitted (the same values: the same reads)."""

    def original_block(block_name: str, block: torch.nn.Module):
        @contextmanager
        def opened():
            fresh = copy.deepcopy(templates[block_name])  # meta
            materialise(fresh, block_name + ".", weights)
            try:
                yield fresh
            finally:
                del fresh
                _free_memory()

        return opened

    return original_block


def _free_memory() -> None:
    """Collect what the last block left and hand freed heap pages back to the system (glibc's
    ``malloc_trim``), so the next block's peak is not stacked on the last one's leftover arenas."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameter, and the size from which allocations get their own mapping
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def bound_heap() -> bool:
    """Make every allocation of ``MMAP_THRESHOLD`` bytes or more its own memory mapping (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``), returned to the system the moment it is freed; True if set.

    glibc raises that threshold as large blocks are freed (up to 32 MiB), after which the E-step's
    per-subspace temporaries (1 to 32 MiB each, thousands per layer) come from the heap, which
    fragments and is not handed back while the layer is fitted. Measured on one 11008 x 4096 layer
    of the ``fast`` walk: 10.1 GiB peak with the default, 2.6 GiB with this, 5% slower. The setting
    is process-wide; a streamed run makes it, since bounded memory is what it is for.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


@functools.cache
def _glibc():
    """The C library when it is glibc (loaded once), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        for name in ("malloc_trim", "mallopt"):  # both must be there
            getattr(libc, name)
        return libc
    except (OSError, AttributeError):  # not glibc: its allocator is left as it is
        return None


def _compress_tied(targets: list, compress_plain) -> list:
    """Tied targets once each, from the first holder (shared with the others), as compress does."""
    done: set[str] = set()
    reports = []
    for target in [t for t in targets if t.tied_to]:
        if not done.intersection((target.name, *target.tied_to)):
            done.add(target.name)
            reports.append(compress_plain(target))
    return reports


def _save_record(folder: Path, record: dict[str, Any], dense_kept: dict[str, str], notes: dict[str, str]) -> None:
    record["kept_dense"] = {**record["kept_dense"], **dense_kept}
    record["notes"] = {**record["notes"], **notes}
    record["rng"] = base64.b64encode(bytes(torch.get_rng_state().tolist())).decode()
    write_json(folder / PROGRESS, record)


def _layer_report(d: dict[str, Any]) -> LayerReport:
    size = SizeReport(d["size"]["n_weights"], d["size"]["parts_bits"])
    return LayerReport(d["name"], d["method"], d["params"], tuple(d["shape"]), size, d["rel_error"], d["seconds"], d.get("extra", {}))


def _roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON (what a resumed run compares against)."""
    import json

    return json.loads(json.dumps(value, default=str))


def _move_into_place(folder: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(folder, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, out)
