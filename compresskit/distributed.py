"""Process groups for distributed compression: ``torchrun --nproc-per-node N -m compresskit quantize ...``.

:func:`session` joins the group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; gloo on CPU, nccl when CUDA is there) and yields
a :class:`Comm`, or ``None`` in one process, which is then exactly the single-process code path.
What is distributed and why it stays bit-identical to one process: ``docs/distributed.md``.

A failure on one rank must not leave the others waiting in a collective: the failing rank writes
its one-line error to the rendezvous store, and a watchdog thread on every other rank that sees it
prints that line and ends its process (exit code 2). Collectives also time out
(``COMPRESSKIT_DIST_TIMEOUT`` seconds, default 1800) for a rank that dies silently.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from compresskit.errors import CompressKitError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ABORT_POLL_S = 0.5  # how often each rank's watchdog looks for another rank's failure
ACK_WAIT_S = 10.0  # how long a failing rank waits for the others to read its error before it exits
DEFAULT_TIMEOUT_S = 1800


class Comm:
    """One rank's view of the process group: who it is, who owns what, and the collectives the walk uses.

    ``owner(i)``: the rank that fits the ``i``-th layer (round-robin); ``share(items)``: this rank's
    items ``rank, rank + world, ...`` (calibration batches); every collective runs on every rank in
    the same order.
    """

    def __init__(self, rank: int, world: int, device: torch.device, store=None, prefix: str = "compresskit/"):
        self.rank, self.world, self.device = rank, world, device
        self._store, self._prefix = store, prefix
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, i: int) -> int:
        return i % self.world

    def share(self, items: Sequence) -> list:
        """This rank's items in lock-step steps: step ``s`` holds item ``s * world + rank``."""
        return list(items)[self.rank :: self.world]

    def steps(self, n_items: int) -> int:
        """Lock-step steps over ``n_items`` shared items (the last may leave some ranks idle)."""
        return -(-n_items // self.world)

    # ---- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` (JSON-able) from rank ``src`` to every rank; no pickle."""
        data = json.dumps(obj).encode() if self.rank == src else None
        return json.loads(self._broadcast_bytes(data, src).decode())

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, src: int, meta: Any = None):
        """``(tensors, meta)`` of rank ``src`` on every rank (CPU tensors, exact bytes, any dtype).
        ``tensors`` may be None on ``src`` (then None everywhere)."""
        header = None
        if self.rank == src:
            entries = None if tensors is None else [[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()]
            header = {"tensors": entries, "meta": meta}
        header = self.broadcast_object(header, src)
        if header["tensors"] is None:
            return None, header["meta"]
        if self.rank == src:
            parts = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
            buffer = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        else:
            buffer = None
        buffer = self._broadcast_buffer(buffer, src)
        out, offset = {}, 0
        for key, dtype_name, shape in header["tensors"]:
            dtype = getattr(torch, dtype_name)
            n_bytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            out[key] = buffer[offset : offset + n_bytes].clone().view(dtype).reshape(shape)
            offset += n_bytes
        return out, header["meta"]

    def each_in_rank_order(self, tensors: dict[str, torch.Tensor] | None, meta: Any = None) -> Iterator[tuple]:
        """Every rank's ``(tensors, meta)`` in rank order, on every rank (one broadcast per rank):
        adding them in this order reproduces one process's sequential sum when rank ``r`` holds the
        ``r``-th item of the step. ``tensors`` None: this rank has nothing this step."""
        for src in range(self.world):
            yield self.broadcast_tensors(tensors if src == self.rank else None, src, meta if src == self.rank else None)

    def in_global_order(self, values: list) -> list:
        """Every rank's per-item ``values`` (JSON-able, one per shared item, as :meth:`share` split
        them) gathered into the items' global order, on every rank."""
        lists = [self.broadcast_object(values if src == self.rank else None, src) for src in range(self.world)]
        longest = max(len(v) for v in lists)
        return [lists[r][s] for s in range(longest) for r in range(self.world) if s < len(lists[r])]

    def _broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return bytes(self._broadcast_buffer(buffer if self.rank == src else None, src).numpy())

    def _broadcast_buffer(self, buffer: torch.Tensor | None, src: int) -> torch.Tensor:
        """A uint8 buffer of rank ``src`` on every rank: its length, then its bytes."""
        length = torch.tensor([0 if buffer is None else buffer.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(length, src)
        n = int(length.item())
        if n == 0:
            return torch.empty(0, dtype=torch.uint8)
        moved = buffer.to(self.device) if self.rank == src else torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(moved, src)
        return moved.cpu()

    # ---- failure and teardown -------------------------------------------------------------------
    def start_watchdog(self) -> None:
        if self._store is not None and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="compresskit-abort-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        key = self._prefix + "abort"
        while not self._stop.wait(ABORT_POLL_S):
            try:
                if not self._store.check([key]):
                    continue
                message = self._store.get(key).decode()
                self._store.add(self._prefix + "ack", 1)
            except Exception:  # the store's host has gone: collective errors and timeouts remain
                return
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            os._exit(2)

    def _stop_watchdog(self) -> None:
        self._stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join()
        self._watchdog = None

    def abort(self, err: BaseException) -> CompressKitError | None:
        """Tell every rank that this one failed with ``err`` (the first failure is the one reported).
        Returns the error to raise here instead of ``err`` when another rank failed first (this rank's
        error is then only a consequence), else None."""
        self._stop_watchdog()
        if self._store is None:
            return None
        try:
            first = self._store.add(self._prefix + "failures", 1) == 1
            if not first:
                message = self._store.get(self._prefix + "abort").decode()
                self._store.add(self._prefix + "ack", 1)
                return CompressKitError(message)
            text = " ".join(str(err).split()) or type(err).__name__
            self._store.set(self._prefix + "abort", f"rank {self.rank} of {self.world}: {text}")
            deadline = time.monotonic() + ACK_WAIT_S  # the store may live in this process: let the others read it
            while time.monotonic() < deadline:
                heard = self._store.add(self._prefix + "ack", 0) + self._store.add(self._prefix + "left", 0)
                if heard >= self.world - 1:
                    break
                time.sleep(0.05)
        except Exception:  # the store is gone; the others see their collectives fail or time out
            return None
        return None

    def close(self, clean: bool = True) -> None:
        """Leave the group: stop the watchdog, say so in the store, destroy the process group
        (only after a clean run: with nccl, destroying after a failure can wait on a dead peer)."""
        self._stop_watchdog()
        if clean:
            try:
                if self._store is not None:
                    self._store.add(self._prefix + "left", 1)
            except Exception:
                pass
            if dist.is_initialized():
                dist.destroy_process_group()


def from_env(backend: str | None = None) -> Comm | None:
    """Join the process group torchrun's environment describes; None when ``WORLD_SIZE`` is unset or 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise CompressKitError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1:
        return None
    missing = [k for k in ENV if not os.environ.get(k)]
    if missing:
        raise CompressKitError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set; start the ranks with torchrun")
    try:
        rank, local_rank, port = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["MASTER_PORT"])
        timeout = float(os.environ.get("COMPRESSKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError as err:
        raise CompressKitError(f"the distributed environment is malformed: {err}") from None
    if not 0 <= rank < world:
        raise CompressKitError(f"RANK {rank} is outside 0..{world - 1}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    address = os.environ["MASTER_ADDR"]
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        store = dist.TCPStore(address, port, is_master=False, timeout=timedelta(seconds=60))
    except (RuntimeError, ValueError) as err:
        raise CompressKitError(f"could not join the {backend} process group at {address}:{port}: {' '.join(str(err).split())}") from None
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    comm = Comm(rank, world, device, store, prefix=f"compresskit/{run}/")
    comm.start_watchdog()
    return comm


@contextmanager
def session(backend: str | None = None) -> Iterator[Comm | None]:
    """``with session() as comm``: the :class:`Comm` of this rank (None in one process), torn down on
    the way out; an error on this rank is announced to the others (they exit with its message)."""
    comm = from_env(backend)
    try:
        yield comm
    except BaseException as err:
        if comm is None:
            raise
        instead = comm.abort(err)
        comm.close(clean=False)
        if instead is not None:
            raise instead from None
        raise
    if comm is not None:
        comm.close()
