"""``AsyncCheckpointer``: the one place where state, staging, writer and resume meet."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import layout
from .errors import (
    CheckpointTimeoutError,
    ConfigError,
    StagingError,
    StepExistsError,
    WriteError,
    WriterDiedError,
)
from .executor import Job, ProcessExecutor, ThreadExecutor
from .handle import SaveHandle
from .resume import list_checkpoints
from .resume import resume as _resume
from .staging import StagingPlan, StagingPool, copy_into
from .state import FlatState, flatten_state
from .storage import Storage, storage_for
from .writer import WriteJob, WriteOutcome, encode_metrics

__all__ = ["AsyncCheckpointer"]

log = logging.getLogger("asyncckpt")

_GIB = float(1 << 30)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("asyncckpt")
    except Exception:
        return "0"


class AsyncCheckpointer:
    """Saves training state in the background; the trainer only waits for a host copy.

    Args:
        root: directory that holds the checkpoints (created if missing).
        state: name -> object: modules, optimizers, schedulers (anything with
            ``state_dict``/``load_state_dict``), tensors, nested dicts/lists of them, and plain
            JSON values.  Dicts are updated in place by ``resume``.
        max_inflight: snapshots that may wait on the writer at once; each costs one host
            buffer the size of the state's tensors.
        on_busy: ``"wait"`` blocks ``save_async`` until a buffer frees up; ``"skip"`` returns
            None and saves nothing when all buffers are still being written.
        overlap: return from ``save_async`` as soon as the copy is queued.  A step pre-hook
            on every optimizer waits for the copy (on CUDA-only state, the GPU waits, not the
            CPU); call ``wait_staged()`` before mutating the state any other way.
        write_threads: parallel shard files per save.
        executor: ``"thread"``: a writer thread in this process; ``"process"``: a persistent
            spawned writer process, so writing never competes with training for the GIL.
            The staging buffers then live in shared memory that the writer maps once.
        restart: with ``executor="process"``, start a fresh writer if it dies.  Saves that
            were in flight are reported as ``WriterDiedError``, never silently dropped.
        storage: advanced: the storage backend to write through (default: chosen from
            ``root``).  Tests pass fault-injecting wrappers here.

    Raises:
        ConfigError: an option is invalid.
        TypeError: the state holds something that cannot be saved (the message names it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        state: dict[str, Any],
        *,
        max_inflight: int = 1,
        on_busy: str = "wait",
        overlap: bool = False,
        write_threads: int = 1,
        executor: str = "thread",
        restart: bool = True,
        storage: Storage | None = None,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(f"root must be a directory path, got {root!r}")
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise ConfigError(f"max_inflight must be an int >= 1, got {max_inflight!r}")
        if on_busy not in ("wait", "skip"):
            raise ConfigError(f"on_busy must be 'wait' or 'skip', got {on_busy!r}")
        if not isinstance(overlap, bool):
            raise ConfigError(f"overlap must be True or False, got {overlap!r}")
        if isinstance(write_threads, bool) or not isinstance(write_threads, int) or write_threads < 1:
            raise ConfigError(f"write_threads must be an int >= 1, got {write_threads!r}")
        if executor not in ("thread", "process"):
            raise ConfigError(f"executor must be 'thread' or 'process', got {executor!r}")
        if executor == "process" and storage is not None:
            raise ConfigError(
                "a custom storage object cannot be used with executor='process': the writer "
                "process builds its own storage from the root"
            )
        self.root = os.path.abspath(os.fspath(root))
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"checkpoint root {self.root} exists and is not a directory")
        self.state = state
        self.max_inflight = max_inflight
        self.on_busy = on_busy
        self.overlap = overlap
        self.write_threads = write_threads
        self._storage: Storage = storage if storage is not None else storage_for(self.root)
        flat = flatten_state(state)  # fail on bad state now, not at step 40,000

        self._storage.makedirs(self.root)
        self._sweep_tmp()
        self._committed: set[int] = {c.step for c in list_checkpoints(self.root)}
        self._lock = threading.Lock()
        self._inflight: dict[int, SaveHandle] = {}
        self._errors: list[tuple[SaveHandle, BaseException]] = []
        self._stats: list[dict[str, Any]] = []
        self._closed = False
        self._version = _version()

        self.executor = executor
        self._generation = 0
        self._pool: StagingPool | None = None
        self._executor: ThreadExecutor | ProcessExecutor | None = None
        self._ensure_pool(flat)  # allocate (and fault in) the buffers before training starts
        assert self._pool is not None
        self._cuda_stream: torch.cuda.Stream | None = (
            torch.cuda.Stream() if torch.cuda.is_available() and self._pool.plan.needs_pinned else None
        )
        self._stager: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(1, "asyncckpt-stage") if overlap else None
        )
        if executor == "process":
            self._executor = ProcessExecutor(self.root, write_threads, self, restart=restart)
        else:
            self._executor = ThreadExecutor(self._storage, write_threads, self)
        self._executor.set_plan(self._pool, self._generation)
        self._hooks: list[Any] = self._register_hooks() if overlap else []
        self._last_stage: tuple[SaveHandle, torch.cuda.Event | None, bool] | None = None
        self._atexit: Callable[[], None] = _exit_hook(weakref.ref(self))
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ public API

    def save_async(
        self, step: int, metrics: dict[str, Any] | None = None, force: bool = False
    ) -> SaveHandle | None:
        """Snapshot the state for ``step`` and write it in the background.

        Returns once the snapshot is in host memory (or, with ``overlap=True``, once the copy
        is queued).  Returns None if nothing was saved (``on_busy="skip"`` with all buffers
        busy).  Raises the error of an earlier failed save, as ``WriteError``, if the caller
        has not seen it yet.

        Args:
            step: the training step, an int >= 0 that is not committed yet.
            metrics: JSON values recorded in the manifest (e.g. ``{"loss": 1.7}``).
            force: reserved for save policies; a save always happens in this version.
        """
        t0 = time.perf_counter()
        self._check_open()
        self._raise_pending()
        assert self._executor is not None
        if (dead := self._executor.failure()) is not None:
            raise dead
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        encoded_metrics = encode_metrics(metrics)
        with self._lock:
            if step in self._committed:
                raise StepExistsError(
                    f"step {step} is already committed at "
                    f"{layout.join(self.root, layout.step_dirname(step))}; committed checkpoints "
                    "are never overwritten. Use a new step number or delete that directory"
                )
            if step in self._inflight:
                raise StepExistsError(f"step {step} is already being saved")
        flat = flatten_state(self.state)
        pool = self._ensure_pool(flat)
        slot = pool.acquire(block=self.on_busy == "wait")
        if slot is None:
            log.info("step=%d skipped: all %d staging buffers are still being written", step, pool.slots)
            self._stats.append({"step": step, "skipped": True, "stall_s": time.perf_counter() - t0})
            return None
        t_slot = time.perf_counter()
        handle = SaveHandle(step)
        with self._lock:
            self._inflight[step] = handle
        record: dict[str, Any] = {
            "step": step,
            "staging_bytes": pool.plan.total_bytes,
            "slot_wait_s": t_slot - t0,
        }
        try:
            if self.overlap:
                self._stage_overlapped(flat, pool, slot, handle, record)
            else:
                self._stage(flat, pool, slot, handle, record)
        except BaseException:
            pool.release(slot)
            with self._lock:
                self._inflight.pop(step, None)
            raise
        write = WriteJob(
            root=self.root,
            step=step,
            entries=pool.plan.entries,
            buffer=pool.buffer(slot),
            tree=flat.tree,
            paths=flat.paths,
            metrics=encoded_metrics,
            library_version=self._version,
        )
        assert self._executor is not None
        self._executor.submit(Job(write, handle, pool, slot, self._generation, record))
        record["stall_s"] = time.perf_counter() - t0
        self._stats.append(record)
        return handle

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until every snapshot in flight is in host memory (the state may then change)."""
        for h in self._handles():
            try:
                h.staged.result(timeout)
            except TimeoutError:
                raise CheckpointTimeoutError(f"step {h.step} was not staged within {timeout}s") from None
            except BaseException:
                pass  # surfaced through committed/_raise_pending
        self._raise_pending()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save in flight is committed; re-raise a background error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in self._handles():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = _wait_future(h.committed, left)
            if not done:
                raise CheckpointTimeoutError(
                    f"step {h.step} was not committed within {timeout}s; storage is slow or stuck"
                )
            if self._executor is not None and not self._executor.alive() and not h.committed.done():
                raise WriterDiedError(f"the writer died before step {h.step} committed")
        self._raise_pending()

    def resume(
        self,
        *,
        step: int | None = None,
        strict: bool = True,
        exclude: Sequence[str] = (),
        allow_missing: bool = False,
    ) -> int | None:
        """Load the newest valid checkpoint into the state in place; its step, or None.

        Saves in flight are committed first.  See :func:`asyncckpt.resume` for the options.
        """
        self._check_open()
        self.wait()
        loaded = _resume(
            self.root, self.state, step=step, strict=strict, exclude=exclude, allow_missing=allow_missing
        )
        if loaded is not None:
            # Loading often creates state (an optimizer's moments); size the buffers now rather
            # than inside the next save.
            self._ensure_pool(flatten_state(self.state))
        return loaded

    def stats(self) -> list[dict[str, Any]]:
        """Per-save timings: stall, staging, queue wait, write and commit seconds, throughput."""
        return [dict(r) for r in self._stats]

    def close(self) -> None:
        """Drain every save in flight and stop the background threads; idempotent.

        Raises the error of a failed save the caller has not seen, so a failed final save
        makes the program fail instead of exiting quietly without a checkpoint.
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._shutdown()
        self._raise_pending()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # don't mask the original exception with a save error
            try:
                self.close()
            except Exception as e:
                log.error("asyncckpt: close() after an exception also failed: %s", e)

    def __repr__(self) -> str:
        return (
            f"AsyncCheckpointer(root={self.root!r}, max_inflight={self.max_inflight}, "
            f"on_busy={self.on_busy!r}, overlap={self.overlap}, inflight={len(self._inflight)})"
        )

    # ------------------------------------------------------------------ staging

    def _ensure_pool(self, flat: FlatState) -> StagingPool:
        sig = flat.signature()
        if self._pool is not None and self._pool.plan.signature == sig:
            return self._pool
        if self._pool is not None:
            log.info(
                "asyncckpt: the state's tensors changed (%d tensors now); waiting for saves in "
                "flight, then re-allocating the staging buffers",
                len(flat.tensors),
            )
            self._pool.wait_idle()
            self._pool.close()
        plan = StagingPlan.from_tensors(flat.tensors, sig)
        self._pool = StagingPool(plan, self.max_inflight, shared=self.executor == "process")
        self._generation += 1
        if self._executor is not None:
            self._executor.set_plan(self._pool, self._generation)
        return self._pool

    def _stage(
        self, flat: FlatState, pool: StagingPool, slot: int, handle: SaveHandle, rec: dict[str, Any]
    ) -> None:
        t = time.perf_counter()
        try:
            event = copy_into(pool.views(slot), flat.tensors, self._cuda_stream)
            if event is not None:
                event.synchronize()
        except Exception as e:
            raise StagingError(
                f"copying the state for step {handle.step} into host memory failed: {e}"
            ) from e
        rec["staging_s"] = time.perf_counter() - t
        handle.staged.set_result(None)

    def _stage_overlapped(
        self, flat: FlatState, pool: StagingPool, slot: int, handle: SaveHandle, rec: dict[str, Any]
    ) -> None:
        t = time.perf_counter()
        views = pool.views(slot)
        cuda = {k: v for k, v in flat.tensors.items() if v.device.type == "cuda"}
        cpu = {k: v for k, v in flat.tensors.items() if v.device.type != "cuda"}
        event = copy_into(views, cuda, self._cuda_stream) if cuda else None
        self._last_stage = (handle, event, bool(cpu))

        def run() -> None:
            try:
                copy_into(views, cpu)
                if event is not None:
                    event.synchronize()
            except Exception as e:
                handle.staged.set_exception(
                    StagingError(f"copying the state for step {handle.step} into host memory failed: {e}")
                )
                return
            rec["staging_s"] = time.perf_counter() - t
            handle.staged.set_result(None)

        assert self._stager is not None
        self._stager.submit(run)

    def _register_hooks(self) -> list[Any]:
        # A global hook: any optimizer stepping over these parameters mutates them, whether
        # or not it is part of the checkpointed state.
        return [register_optimizer_step_pre_hook(self._before_optimizer_step)]

    def _before_optimizer_step(self, *_: Any) -> None:
        last = self._last_stage
        if last is None or last[0].staged.done():
            return
        handle, event, has_cpu = last
        if event is not None and not has_cpu:
            torch.cuda.current_stream().wait_event(event)  # GPU-side wait; the CPU runs on
        else:
            handle.staged.result()

    # ------------------------------------------------------------------ executor callbacks

    def released(self, job: Job) -> None:
        """The shards of ``job`` are written: its staging slot may be reused."""
        if not job.released:
            job.released = True
            job.pool.release(job.slot)

    def failed(self, job: Job, exc: BaseException) -> None:
        """``job`` is lost: keep the error for the trainer thread."""
        self.released(job)
        h = job.handle
        if isinstance(exc, WriteError):
            err = exc
        else:
            err = WriteError(f"saving step {h.step} to {self.root} failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
        log.error("asyncckpt: %s", err)
        with self._lock:
            self._errors.append((h, err))
            self._inflight.pop(h.step, None)
        if not h.staged.done():
            h.staged.set_exception(err)
        h.committed.set_exception(err)

    def writer_died(self, exc: BaseException) -> None:
        """The writer died with nothing in flight: tell the trainer at its next call."""
        notice = SaveHandle(-1)
        notice.committed.set_exception(exc)
        with self._lock:
            self._errors.append((notice, exc))

    def committed(self, job: Job, out: WriteOutcome) -> None:
        """``job``'s manifest is durable."""
        self.released(job)
        h, rec = job.handle, job.record
        rec.update(
            write_s=out.write_seconds,
            commit_s=out.commit_seconds,
            bytes_written=out.bytes_written,
            throughput_Bps=out.bytes_written / max(out.write_seconds, 1e-9),
        )
        log.info(
            "step=%d stall=%.3fs write=%.2fs %.2fGiB/s",
            h.step,
            rec.get("stall_s", 0.0),
            out.write_seconds,
            rec["throughput_Bps"] / _GIB,
        )
        with self._lock:
            self._committed.add(h.step)
            self._inflight.pop(h.step, None)
        h.committed.set_result(out.info)

    # ------------------------------------------------------------------ housekeeping

    def _handles(self) -> list[SaveHandle]:
        with self._lock:
            return sorted(self._inflight.values(), key=lambda h: h.committed.done())

    def _raise_pending(self) -> None:
        with self._lock:
            pending = [(h, e) for h, e in self._errors if not h.observed]
            self._errors.clear()
        if not pending:
            return
        h, err = pending[0]
        h.observed = True
        if len(pending) > 1:
            log.error(
                "asyncckpt: %d more saves failed: steps %s",
                len(pending) - 1,
                [p[0].step for p in pending[1:]],
            )
        raise err

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this AsyncCheckpointer is closed; create a new one to save again")

    def _sweep_tmp(self) -> None:
        tmp = layout.join(self.root, layout.TMP_DIR)
        for name in self._storage.listdir(tmp):
            if layout.is_tmp_name(name):
                self._storage.rmtree(layout.join(tmp, name))

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for hk in self._hooks:
            hk.remove()
        if self._stager is not None:
            self._stager.shutdown(wait=True)
        if self._executor is not None:
            self._executor.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        atexit.unregister(self._atexit)

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("asyncckpt: a save failed while draining at interpreter exit: %s", e)


def _wait_future(fut: Any, timeout: float | None) -> tuple[bool, None]:
    import concurrent.futures

    done, _ = concurrent.futures.wait([fut], timeout=timeout)
    return bool(done), None


def _exit_hook(ref: weakref.ref[AsyncCheckpointer]) -> Any:
    """An atexit callback that drains the checkpointer if it is still alive (weakly held)."""

    def hook() -> None:
        ckpt = ref()
        if ckpt is not None:
            ckpt._close_at_exit()

    return hook
