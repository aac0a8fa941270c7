"""The writer process: its typed messages and its main loop (started by ``_writer_proc``).

A fresh interpreter (not multiprocessing's spawn, which would re-import the user's
``__main__``).  It maps the trainer's shared-memory staging pool once per plan, writes and
commits each requested step, and reports back.  It runs in its own session, so a signal to
the trainer's process group (Ctrl-C, a scheduler's SIGTERM) does not kill it: the trainer
alone decides when it stops, and it exits by itself soon after the trainer dies.

Every message, both ways, is one of the typed dataclasses below.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .file_layout import FileImage
from .options import WriterOptions
from .request import SaveOutcome, SaveRequest

__all__ = [
    "Config",
    "Plan",
    "Write",
    "Stop",
    "Ready",
    "StartFailed",
    "Released",
    "Committed",
    "Failed",
    "writer_main",
]


# --------------------------------------------------------------------------- trainer -> writer


@dataclass(frozen=True)
class Config:
    """First message: where to write, and how."""

    root: str
    writer: WriterOptions
    storage_options: dict[str, Any] | None


@dataclass(frozen=True)
class Plan:
    """A staging pool to map: one shared-memory segment per slot, and the tensor layout."""

    generation: int
    shm_names: list[str]
    entries: list[tuple[str, str, tuple[int, ...], int, int]]  # fqn, dtype, shape, offset, nbytes
    files: tuple[FileImage, ...]  # where each shard file lies in a slot


@dataclass(frozen=True)
class Write:
    """Write and commit ``request`` from slot ``slot`` of plan ``generation``."""

    generation: int
    slot: int
    request: SaveRequest


@dataclass(frozen=True)
class Stop:
    """Exit once the current write is done."""


# --------------------------------------------------------------------------- writer -> trainer


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class StartFailed:
    error: BaseException


@dataclass(frozen=True)
class Released:
    """The shards of ``step`` are durable: its slot may be reused."""

    step: int


@dataclass(frozen=True)
class Committed:
    step: int
    outcome: SaveOutcome


@dataclass(frozen=True)
class Failed:
    step: int
    error: BaseException


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _parent_watchdog(parent_pid: int, abort: threading.Event) -> None:
    """Exit soon after the trainer dies: never finish (commit) a save nobody waits for."""
    while True:
        time.sleep(0.2)
        if os.getppid() != parent_pid:
            abort.set()
            time.sleep(3.0)  # let a write in progress notice and clean up its temp dir
            os._exit(0)


def writer_main(conn_in: Connection, conn_out: Connection, parent_pid: int) -> None:
    """Serve :class:`Write` requests until :class:`Stop` or the trainer is gone."""
    from multiprocessing import resource_tracker, shared_memory

    import torch

    from .blob import TensorSlot
    from .chunkstore import PartWriter
    from .commit import write_and_commit
    from .compressed import Compressor
    from .manifest import DTYPES
    from .priority import Pacer
    from .storage import storage_for

    torch.set_num_threads(1)  # leave the cores to the trainer
    abort = threading.Event()
    threading.Thread(target=_parent_watchdog, args=(parent_pid, abort), daemon=True).start()
    config: Config = conn_in.recv()
    opts = config.writer
    try:
        storage = storage_for(config.root, config.storage_options, direct_io=opts.direct_io)
        compressor = Compressor.for_options(
            opts.compression, opts.compression_level, opts.compression_threads
        )
        parts = PartWriter(opts.part_threads, compressor) if opts.incremental else None
    except BaseException as e:
        conn_out.send(StartFailed(_picklable(e)))
        return
    pace = Pacer(opts.max_bandwidth) if opts.max_bandwidth else None
    pool = ThreadPoolExecutor(opts.threads) if opts.threads > 1 else None
    segments: list[Any] = []
    buffers: list[torch.Tensor] = []
    entries: list[TensorSlot] = []
    files: tuple[FileImage, ...] = ()
    generation = -1
    conn_out.send(Ready(os.getpid()))
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        if isinstance(msg, Stop):
            return
        if isinstance(msg, Plan):
            buffers = []
            for seg in segments:
                try:
                    seg.close()
                except BufferError:
                    pass
            segments = [shared_memory.SharedMemory(name=n) for n in msg.shm_names]
            for seg in segments:
                try:  # the trainer owns (and unlinks) these segments, not this process
                    resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
                except Exception:
                    pass
            buffers = [torch.frombuffer(seg.buf, dtype=torch.uint8) for seg in segments]
            entries = [TensorSlot(f, DTYPES[d], tuple(s), o, n) for f, d, s, o, n in msg.entries]
            files = msg.files
            generation = msg.generation
            continue
        assert isinstance(msg, Write)
        step = msg.request.step
        try:
            if msg.generation != generation:
                raise RuntimeError(f"plan generation {msg.generation} was never received (have {generation})")
            buf = buffers[msg.slot]
            out = write_and_commit(
                storage,
                msg.request,
                entries,
                files,
                buf,
                pool,
                on_shards_written=lambda s=step: conn_out.send(Released(s)),  # type: ignore[misc]
                should_abort=abort.is_set,
                pace=pace,
                compressor=compressor,
                parts=parts,
            )
        except BaseException as e:
            conn_out.send(Failed(step, _picklable(e)))
        else:
            conn_out.send(Committed(step, out))
