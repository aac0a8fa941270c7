"""Run write jobs off the trainer thread: in a thread, or in a persistent writer process.

Both executors take the same jobs and report through the same three callbacks, so the
checkpointer neither knows nor cares where the bytes are written:

- ``released(job)``: the shards are written; the staging slot may be reused;
- ``committed(job, outcome)``: the manifest is durable;
- ``failed(job, exc)``: the save is lost; ``exc`` is the cause.

The process executor keeps the trainer's GIL free while a checkpoint is written.  The staging
pool lives in named shared memory that the writer maps once per plan; per save, only a small
message (step, slot, plain-value tree) crosses the process boundary.  The writer needs no
process group and no TCP port, and it exits on its own when its parent dies.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from .errors import WriterDiedError
from .handle import SaveHandle
from .manifest import DTYPES, dtype_name
from .staging import StagingPool, TensorSlot
from .storage import Storage, storage_for
from .writer import BlobTemplate, WriteJob, WriteOutcome, blob_templates, write_and_commit

__all__ = ["Job", "Callbacks", "ThreadExecutor", "ProcessExecutor"]

log = logging.getLogger("asyncckpt")


@dataclass
class Job:
    """One save on its way through an executor."""

    write: WriteJob
    handle: SaveHandle
    pool: StagingPool
    slot: int
    generation: int
    record: dict[str, Any]
    submitted: float = field(default_factory=time.perf_counter)
    released: bool = False


class Callbacks(Protocol):
    def released(self, job: Job) -> None: ...
    def committed(self, job: Job, outcome: WriteOutcome) -> None: ...
    def failed(self, job: Job, exc: BaseException) -> None: ...
    def writer_died(self, exc: BaseException) -> None: ...


class _TemplateCache:
    """Blob templates of the current plan, built on its first write (in the writer)."""

    def __init__(self) -> None:
        self.generation = -1
        self.templates: dict[str, BlobTemplate] = {}

    def get(self, generation: int, entries: Any, buffer: torch.Tensor) -> dict[str, BlobTemplate]:
        if generation != self.generation:
            self.templates = blob_templates(entries, buffer)
            self.generation = generation
        return self.templates


class ThreadExecutor:
    """A single background writer thread in the trainer process; jobs run in order."""

    def __init__(self, storage: Storage, write_threads: int, cb: Callbacks) -> None:
        self.storage = storage
        self.write_threads = write_threads
        self.cb = cb
        self._files = ThreadPoolExecutor(write_threads, "asyncckpt-io") if write_threads > 1 else None
        self._templates = _TemplateCache()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="asyncckpt-writer", daemon=True)
        self._thread.start()

    def set_plan(self, pool: StagingPool, generation: int) -> None:
        pass  # the thread reads the pool's buffers directly

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def failure(self) -> BaseException | None:
        return None if self._thread.is_alive() else WriterDiedError("the writer thread has stopped")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._files is not None:
            self._files.shutdown(wait=True)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job.handle.staged.result()
                job.record["queue_wait_s"] = time.perf_counter() - job.submitted
                templates = self._templates.get(job.generation, job.write.entries, job.write.buffer)
                out = write_and_commit(
                    self.storage,
                    job.write,
                    self._files,
                    self.write_threads,
                    templates,
                    on_shards_written=lambda j=job: self.cb.released(j),  # type: ignore[misc]
                )
            except BaseException as e:
                self.cb.failed(job, e)
            else:
                self.cb.committed(job, out)


# --------------------------------------------------------------------------- process


def _entries_msg(entries: Any) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    return [(e.fqn, dtype_name(e.dtype), e.shape, e.offset, e.nbytes) for e in entries]


class ProcessExecutor:
    """One persistent writer process (spawned), health-checked at start, restarted on death."""

    START_TIMEOUT = 120.0

    def __init__(
        self,
        root: str,
        write_threads: int,
        cb: Callbacks,
        *,
        restart: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self._storage_options = storage_options
        self.write_threads = write_threads
        self.cb = cb
        self.restart = restart
        self._lock = threading.Lock()  # guards _inflight
        self._send_lock = threading.RLock()  # orders sends, plans and restarts
        self._send_failed = False
        self._inflight: dict[int, Job] = {}
        self._plan_msg: tuple[Any, ...] | None = None
        self._closing = False
        self._dead: BaseException | None = None
        self._outbox: queue.Queue[Job | None] = queue.Queue()
        self._start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="asyncckpt-dispatch", daemon=True)
        self._dispatcher.start()

    # -- lifecycle
    def _start(self) -> None:
        # A fresh interpreter, not multiprocessing's spawn: that would re-import the user's
        # __main__ script, which often has no `if __name__ == "__main__"` guard.
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
        # The root and options (credentials) go over the pipe, never on the command line.
        cmd = [
            sys.executable,
            "-m",
            "asyncckpt._writer_proc",
            str(to_child_r),
            str(from_child_w),
            str(os.getpid()),
        ]
        try:
            self.process = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), env=env)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        self._to_child.send(("config", self.root, self.write_threads, self._storage_options))
        if not self._from_child.poll(self.START_TIMEOUT):
            self.process.kill()
            raise WriterDiedError(f"the writer process did not start within {self.START_TIMEOUT:.0f}s")
        try:
            msg = self._from_child.recv()
        except EOFError:
            code = self.process.wait(10)
            raise WriterDiedError(f"the writer process exited during start-up (exit code {code})") from None
        if msg[0] == "error":
            self.process.wait(10)
            raise msg[1]
        if msg[0] != "ready":
            raise WriterDiedError(f"the writer process failed its health check: {msg!r}")
        if self._plan_msg is not None:
            self._to_child.send(self._plan_msg)
        self._listener = threading.Thread(target=self._listen, name="asyncckpt-listen", daemon=True)
        self._listener.start()

    def set_plan(self, pool: StagingPool, generation: int) -> None:
        names = pool.shm_names()
        if names is None:
            raise RuntimeError("the process executor needs a shared-memory staging pool")
        with self._send_lock:
            self._plan_msg = ("plan", generation, names, _entries_msg(pool.plan.entries))
            try:
                self._to_child.send(self._plan_msg)
            except OSError:
                pass  # dead: a restart re-sends the plan

    def submit(self, job: Job) -> None:
        self._outbox.put(job)

    def alive(self) -> bool:
        return self._dead is None and self.process.poll() is None

    def failure(self) -> BaseException | None:
        """The error that ended this executor for good (a dead writer not restarted)."""
        return self._dead

    def close(self) -> None:
        self._closing = True
        self._outbox.put(None)
        self._dispatcher.join()
        try:
            self._to_child.send(("stop",))
        except OSError:
            pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._listener.join(5)
        for c in (self._to_child, self._from_child):
            c.close()

    # -- trainer-side threads
    def _dispatch(self) -> None:
        while (job := self._outbox.get()) is not None:
            try:
                job.handle.staged.result()
            except BaseException as e:
                self.cb.failed(job, e)
                continue
            job.record["queue_wait_s"] = time.perf_counter() - job.submitted
            w = job.write
            msg = (
                "write",
                job.generation,
                job.slot,
                w.root,
                w.step,
                w.tier,
                w.remote,
                (w.rank, w.world_size, w.chunk_offsets, w.global_shapes, w.run_id, w.commit_timeout),
                w.tree,
                w.paths,
                w.metrics,
                w.library_version,
            )
            error: BaseException | None = None
            with self._send_lock:  # never interleaves with a restart or a plan
                if self._dead is not None:
                    error = self._dead
                else:
                    with self._lock:
                        self._inflight[w.step] = job
                    try:
                        self._to_child.send(msg)
                    except OSError as e:
                        self._send_failed = True
                        with self._lock:
                            self._inflight.pop(w.step, None)
                        error = WriterDiedError(
                            f"the writer process is gone ({e}); step {w.step} was not saved"
                        )
            if error is not None:
                self.cb.failed(job, error)

    def _listen(self) -> None:
        conn = self._from_child
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            kind, step = msg[0], msg[1]
            with self._lock:
                job = self._inflight.get(step)
                if kind != "released" and job is not None:
                    del self._inflight[step]
            if job is None:
                continue
            if kind == "released":
                self.cb.released(job)
            elif kind == "committed":
                self.cb.committed(job, msg[2])
            elif kind == "failed":
                self.cb.failed(job, msg[2])
        self._on_death()

    def _on_death(self) -> None:
        with self._send_lock:
            try:
                code: int | None = self.process.wait(5)
            except subprocess.TimeoutExpired:  # pipe closed but still running: make it final
                self.process.kill()
                code = self.process.wait(5)
            with self._lock:
                lost = list(self._inflight.values())
                self._inflight.clear()
            already_told = self._send_failed  # a save whose send failed was told through its handle
            self._send_failed = False
            if self._closing and not lost:
                return
            err = WriterDiedError(
                f"the asyncckpt writer process (pid {self.process.pid}) exited with code {code}; "
                f"{len(lost)} save(s) in flight were lost: steps {[j.write.step for j in lost]}"
            )
            log.error("asyncckpt: %s", err)
        # Tell the trainer exactly once, and before the (slow) restart, so the report lands at
        # its very next call rather than seconds later at an unrelated one.
        for job in lost:
            self.cb.failed(job, err)
        if not lost and not already_told:
            self.cb.writer_died(err)
        if not self.restart or self._closing:
            with self._send_lock:
                self._dead = err
            return
        with self._send_lock:
            try:
                for c in (self._to_child, self._from_child):
                    c.close()
                self._start()
                log.warning("asyncckpt: started a fresh writer process (pid %d)", self.process.pid)
            except BaseException as e:  # noqa: BLE001 - reported on the next call
                self._dead = WriterDiedError(f"{err}; restarting it failed: {e}")
                stranded = list(self._inflight.values())
                self._inflight.clear()
            else:
                return
        for job in stranded:
            self.cb.failed(job, self._dead)


# --------------------------------------------------------------------------- writer side


def _parent_watchdog(parent_pid: int, abort: threading.Event) -> None:
    """Exit soon after the trainer dies: never finish (commit) a save nobody waits for."""
    while True:
        time.sleep(0.2)
        if os.getppid() != parent_pid:
            abort.set()
            time.sleep(3.0)  # let a write in progress notice and clean up its temp dir
            os._exit(0)


def _writer_main(conn_in: Any, conn_out: Any, parent_pid: int) -> None:
    """Entry point of the writer process: maps the pool once per plan, writes, reports."""
    from multiprocessing import resource_tracker, shared_memory

    torch.set_num_threads(1)  # leave the cores to the trainer
    abort = threading.Event()
    threading.Thread(target=_parent_watchdog, args=(parent_pid, abort), daemon=True).start()
    _, root, write_threads, storage_options = conn_in.recv()
    try:
        storage = storage_for(root, storage_options)
    except BaseException as e:
        conn_out.send(("error", _picklable(e)))
        return
    files = ThreadPoolExecutor(write_threads) if write_threads > 1 else None
    templates = _TemplateCache()
    segments: list[Any] = []
    buffers: list[torch.Tensor] = []
    entries: list[TensorSlot] = []
    generation = -1
    send: Callable[[Any], None] = conn_out.send
    send(("ready", os.getpid()))
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        if msg[0] == "stop":
            return
        if msg[0] == "plan":
            _, generation, names, raw_entries = msg
            buffers = []
            for seg in segments:
                try:
                    seg.close()
                except BufferError:
                    pass
            segments = [shared_memory.SharedMemory(name=n) for n in names]
            for seg in segments:
                try:  # the trainer owns (and unlinks) these segments, not this process
                    resource_tracker.unregister(seg._name, "shared_memory")
                except Exception:
                    pass
            buffers = [torch.frombuffer(seg.buf, dtype=torch.uint8) for seg in segments]
            entries = [TensorSlot(f, DTYPES[d], tuple(s), o, n) for f, d, s, o, n in raw_entries]
            continue
        _, gen, slot, job_root, step, tier, remote, ranks, tree, paths, metrics, version = msg
        rank, world_size, chunk_offsets, global_shapes, run_id, commit_timeout = ranks
        try:
            if gen != generation:
                raise RuntimeError(f"plan generation {gen} was never received (have {generation})")
            job = WriteJob(
                job_root,
                step,
                entries,
                buffers[slot],
                tree,
                paths,
                metrics,
                library_version=version,
                tier=tier,
                remote=remote,
                rank=rank,
                world_size=world_size,
                chunk_offsets=chunk_offsets,
                global_shapes=global_shapes,
                run_id=run_id,
                commit_timeout=commit_timeout,
            )
            out = write_and_commit(
                storage,
                job,
                files,
                write_threads,
                templates.get(generation, entries, buffers[slot]),
                on_shards_written=lambda s=step: send(("released", s)),  # type: ignore[misc]
                should_abort=abort.is_set,
            )
        except BaseException as e:
            send(("failed", step, _picklable(e)))
        else:
            send(("committed", step, out))


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.dumps(e)
        return e
    except Exception:
        err = RuntimeError(f"{type(e).__name__}: {e}")
        return err
