"""Run saves off the trainer thread: in a thread, or in a persistent writer process.

Both executors have one method that matters, as DCP's async executor does::

    released, committed = executor.submit(request, lease)

``released`` resolves once the shards are durable (the staging slot may be reused);
``committed`` resolves to the :class:`~asyncckpt.request.SaveOutcome` once the manifest is
durable, or fails with the cause.  Nothing is called back: whoever submits chains on the
futures.  A writer that dies with nothing in flight leaves a notice, which
:meth:`take_notices` hands out exactly once.

The process executor keeps the trainer's GIL free while a checkpoint is written.  The staging
pool lives in named shared memory that the writer maps once per plan; per save, only a small
typed message crosses the process boundary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from . import writer_proc as msgs
from .chunkstore import PartWriter
from .commit import write_and_commit
from .compressed import Compressor
from .errors import WriterDiedError
from .manifest import dtype_name
from .options import WriterOptions
from .priority import Pacer, writer_priority
from .request import SaveOutcome, SaveRequest
from .staging import Lease
from .storage import Storage

__all__ = ["ThreadExecutor", "ProcessExecutor"]

log = logging.getLogger("asyncckpt")


@dataclass
class _Job:
    request: SaveRequest
    lease: Lease
    released: Future[None] = field(default_factory=Future)
    committed: Future[SaveOutcome] = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    queue_wait_s: float = 0.0

    def release(self) -> None:
        if not self.released.done():
            self.released.set_result(None)

    def commit(self, out: SaveOutcome) -> None:
        self.release()
        self.committed.set_result(dataclasses.replace(out, queue_wait_s=self.queue_wait_s))

    def fail(self, exc: BaseException) -> None:
        self.release()  # the slot is free again either way
        if not self.committed.done():
            self.committed.set_exception(exc)


class ThreadExecutor:
    """A single background writer thread in the trainer process; saves run in order."""

    def __init__(self, storage: Storage, opts: WriterOptions) -> None:
        self.storage = storage
        self.opts = opts
        self._lower = lower = writer_priority(opts.cpu_nice, opts.io_priority)  # the trainer's, lowered
        self._files = (
            ThreadPoolExecutor(opts.threads, "asyncckpt-io", initializer=lower) if opts.threads > 1 else None
        )
        self._pace = Pacer(opts.max_bandwidth) if opts.max_bandwidth else None
        self._compressor = Compressor.for_options(
            opts.compression, opts.compression_level, opts.compression_threads, initializer=lower
        )
        self._parts = (
            PartWriter(opts.part_threads, self._compressor, initializer=lower) if opts.incremental else None
        )
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="asyncckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, request: SaveRequest, lease: Lease) -> tuple[Future[None], Future[SaveOutcome]]:
        job = _Job(request, lease)
        self._queue.put(job)
        return job.released, job.committed

    def failure(self) -> BaseException | None:
        """The error that ended this executor for good, or None."""
        return None if self._thread.is_alive() else WriterDiedError("the writer thread has stopped")

    def take_notices(self) -> list[BaseException]:
        return []

    def close(self, wait: bool = True) -> None:
        """Finish the queued saves and stop; ``wait=False`` leaves a stuck writer (a daemon
        thread) behind."""
        self._queue.put(None)
        if not wait:
            return
        self._thread.join()
        if self._files is not None:
            self._files.shutdown(wait=True)
        if self._parts is not None:
            self._parts.close()
        if self._compressor is not None:
            self._compressor.close()

    def _loop(self) -> None:
        self._lower()  # this thread; its helpers inherit it (and their pools set it again)
        while (job := self._queue.get()) is not None:
            try:
                # with write_during_copy the writer starts now and waits per piece; otherwise
                # once the snapshot is in (its memory traffic would slow the trainer's copy)
                copied = job.lease.copied if self.opts.write_during_copy else None
                if copied is None:
                    job.lease.staged.result()
                job.queue_wait_s = time.perf_counter() - job.submitted
                plan = job.lease.pool.plan
                out = write_and_commit(
                    self.storage,
                    job.request,
                    plan.entries,
                    plan.files,
                    job.lease.buffer,
                    self._files,
                    on_shards_written=job.release,
                    pace=self._pace,
                    compressor=self._compressor,
                    parts=self._parts,
                    # the copy may still be running: each write waits for its bytes
                    ready=copied.wait if copied is not None else None,
                )
            except BaseException as e:
                job.fail(e)
            else:
                job.commit(out)


# --------------------------------------------------------------------------- process


class ProcessExecutor:
    """One persistent writer process, health-checked at start, restarted on death."""

    START_TIMEOUT = 120.0

    def __init__(
        self, root: str, opts: WriterOptions, *, storage_options: dict[str, Any] | None = None
    ) -> None:
        self._config = msgs.Config(root, opts, storage_options)
        self.restart = opts.restart
        self._lock = threading.Lock()  # guards _inflight and _notices
        self._send_lock = threading.RLock()  # orders sends, plans and restarts
        self._send_failed = False
        self._inflight: dict[int, _Job] = {}
        self._plan: msgs.Plan | None = None
        self._closing = False
        self._dead: BaseException | None = None
        self._notices: list[BaseException] = []
        self._outbox: queue.Queue[_Job | None] = queue.Queue()
        self._start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="asyncckpt-dispatch", daemon=True)
        self._dispatcher.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- lifecycle
    def _start(self) -> None:
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
            str(self._config.writer.cpu_nice),  # set first thing, before the writer starts threads
            self._config.writer.io_priority,
        ]
        try:
            self.process = subprocess.Popen(
                cmd, pass_fds=(to_child_r, from_child_w), env=env, start_new_session=True
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        self._to_child.send(self._config)
        if not self._from_child.poll(self.START_TIMEOUT):
            self.process.kill()
            raise WriterDiedError(f"the writer process did not start within {self.START_TIMEOUT:.0f}s")
        try:
            msg = self._from_child.recv()
        except EOFError:
            code = self.process.wait(10)
            raise WriterDiedError(f"the writer process exited during start-up (exit code {code})") from None
        if isinstance(msg, msgs.StartFailed):
            self.process.wait(10)
            raise msg.error
        if not isinstance(msg, msgs.Ready):
            raise WriterDiedError(f"the writer process failed its health check: {msg!r}")
        if self._plan is not None:
            self._to_child.send(self._plan)
        self._listener = threading.Thread(target=self._listen, name="asyncckpt-listen", daemon=True)
        self._listener.start()

    def submit(self, request: SaveRequest, lease: Lease) -> tuple[Future[None], Future[SaveOutcome]]:
        job = _Job(request, lease)
        self._outbox.put(job)
        return job.released, job.committed

    def failure(self) -> BaseException | None:
        """The error that ended this executor for good (a dead writer not restarted)."""
        return self._dead

    def take_notices(self) -> list[BaseException]:
        """Deaths of the writer with nothing in flight, each handed out once."""
        with self._lock:
            out, self._notices = self._notices, []
        return out

    def close(self, wait: bool = True) -> None:
        """Finish the queued saves and stop the writer; ``wait=False`` kills a stuck one."""
        self._closing = True
        self._outbox.put(None)
        if not wait:
            self.process.kill()
        self._dispatcher.join(None if wait else 5)
        try:
            self._to_child.send(msgs.Stop())
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
    def _plan_for(self, lease: Lease) -> msgs.Plan | None:
        """The plan message for ``lease``'s pool if the writer has not mapped it yet."""
        if self._plan is not None and self._plan.generation == lease.generation:
            return None
        names = lease.pool.shm_names()
        if names is None:
            raise RuntimeError("the process executor needs a shared-memory staging pool")
        entries = [(e.fqn, dtype_name(e.dtype), e.shape, e.offset, e.nbytes) for e in lease.pool.plan.entries]
        return msgs.Plan(lease.generation, names, entries, lease.pool.plan.files)

    def _dispatch(self) -> None:
        while (job := self._outbox.get()) is not None:
            try:
                job.lease.staged.result()
            except BaseException as e:
                job.fail(e)
                continue
            job.queue_wait_s = time.perf_counter() - job.submitted
            step = job.request.step
            error: BaseException | None = None
            with self._send_lock:  # never interleaves with a restart
                if self._dead is not None:
                    error = self._dead
                else:
                    with self._lock:
                        self._inflight[step] = job
                    try:
                        plan = self._plan_for(job.lease)
                        if plan is not None:
                            self._plan = plan
                            self._to_child.send(plan)
                        self._to_child.send(msgs.Write(job.lease.generation, job.lease.slot, job.request))
                    except OSError as e:
                        self._send_failed = True
                        with self._lock:
                            self._inflight.pop(step, None)
                        error = WriterDiedError(
                            f"the writer process is gone ({e}); step {step} was not saved"
                        )
            if error is not None:
                job.fail(error)

    def _listen(self) -> None:
        conn = self._from_child
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                job = self._inflight.get(msg.step)
                if not isinstance(msg, msgs.Released) and job is not None:
                    del self._inflight[msg.step]
            if job is None:
                continue
            if isinstance(msg, msgs.Released):
                job.release()
            elif isinstance(msg, msgs.Committed):
                job.commit(msg.outcome)
            elif isinstance(msg, msgs.Failed):
                job.fail(msg.error)
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
            already_told = self._send_failed  # a save whose send failed was told through its future
            self._send_failed = False
            if self._closing and not lost:
                return
            err = WriterDiedError(
                f"the asyncckpt writer process (pid {self.process.pid}) exited with code {code}; "
                f"{len(lost)} save(s) in flight were lost: steps {[j.request.step for j in lost]}"
            )
            log.error("asyncckpt: %s", err)
        # Tell the trainer exactly once, and before the (slow) restart, so the report lands at
        # its very next call rather than seconds later at an unrelated one.
        for job in lost:
            job.fail(err)
        if not lost and not already_told:
            with self._lock:
                self._notices.append(err)
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
                return
            except BaseException as e:  # noqa: BLE001 - reported on the next call
                self._dead = WriterDiedError(f"{err}; restarting it failed: {e}")
                with self._lock:
                    stranded = list(self._inflight.values())
                    self._inflight.clear()
        for job in stranded:
            job.fail(self._dead)
