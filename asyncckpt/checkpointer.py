"""``AsyncCheckpointer``: the one place where state, staging, writer and resume meet."""

from __future__ import annotations

import atexit
import concurrent.futures
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

from . import distributed, layout
from .errors import (
    CheckpointTimeoutError,
    ConfigError,
    StagingError,
    StepExistsError,
    WriteError,
    WriterDiedError,
)
from .executor import Job, ProcessExecutor, ThreadExecutor
from .handle import CheckpointInfo, SaveHandle
from .policy import EveryNSteps, KeepLast, Never, RetentionPolicy, SaveContext, SavePolicy
from .resume import _root as normalize_root
from .resume import list_in, resume_in
from .retention import Retention
from .staging import StagingPlan, StagingPool, copy_into
from .state import FlatState, flatten_state, select_state
from .storage import Storage, is_url, storage_for
from .tiers import Uploader
from .triggers import SaveTriggers
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
        save_policy: when to save: a policy from ``asyncckpt.policy`` (``EveryNSteps``,
            ``EveryNSeconds``, ``PerEpoch``, ``AtSteps``, ``Schedule``, ``Custom``, combined
            with ``|``), or an int N for every N steps.  None: every ``save_async`` saves.
        keep: what to keep: a retention policy, a list of them (a checkpoint survives if any
            keeps it), or an int k for the last k.  None keeps everything.  The newest
            checkpoint, steps in flight and ``protect()``-ed steps are never deleted.
        total_steps: the last step of training; ``save_async(total_steps)`` always saves.
        mode: None, ``"disabled"`` (nothing is written, no thread or process is started,
            ``resume`` returns None) or ``"final_only"`` (only the final step is saved).
        save_final: ``close()`` saves the last step passed to ``save_async`` if the policy
            skipped it, so the end of training is never lost.
        snapshot_every: also keep a fast rolling tier: every N steps (when no permanent save
            happens) a snapshot goes to ``root/snapshots``; only the newest
            ``snapshot_slots`` are kept, and an old one is deleted only after a newer one
            committed.  ``resume`` considers both tiers.
        snapshot_slots: how many rolling snapshots to keep (default 2).
        include: fqn patterns to save (fnmatch or prefix, e.g. ``["model"]``); default all.
        exclude: fqn patterns to leave out of every save (e.g. ``["optim"]``).
        model_only: save only the ``nn.Module`` entries of ``state``.
        save_dtype: cast floating-point tensors to this dtype (``torch.bfloat16`` or
            ``torch.float16``) in the saved copy; the live state is untouched.
        save_on_signal: signals (e.g. ``[signal.SIGTERM, signal.SIGUSR1]``) that request a
            save at the next ``save_async`` call, whatever the policy.  The handler only sets
            a flag (``signal_received``), so the save happens at a step boundary; the signal
            no longer terminates the process, so check ``signal_received`` to stop.
        trigger_file: if this file exists at a ``save_async`` call, that call saves and the
            file is removed.
        storage_options: fsspec options for a URL root such as ``s3://bucket/run7``
            (credentials, ``client_kwargs={"endpoint_url": ...}``).  They are redacted
            wherever they are shown; the writer process builds its own filesystem from them.
        local_dir: a local-first tier: permanent checkpoints (and snapshots) commit to this
            fast local directory, where ``committed`` resolves; each permanent one is then
            uploaded to ``root`` in the background (``SaveHandle.uploaded``).  Local
            retention keeps what is still uploading; ``resume`` prefers the local copy and
            falls back to ``root`` when the local disk is empty (a new machine).  With
            several ranks each rank commits its own part under ``local_dir/rankNNNNN`` and
            rank 0 commits the joined step on ``root``, which ``resume`` then reads.
        commit_timeout: with several ranks: how long rank 0 waits for every rank's shards, and
            the other ranks for rank 0's manifest, before the save fails naming who is missing.
        on_stats: called with each save's stats record (the dict ``stats()`` lists) once it
            committed, and again with ``upload_s`` added once a local-first upload finished;
            forward it to TensorBoard, W&B, ...  Runs on a background thread; exceptions are
            logged, never raised.
        storage: advanced: the storage backend of ``root`` (default: chosen from ``root``).
            Tests pass fault-injecting wrappers here.

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
        save_policy: SavePolicy | int | None = None,
        keep: RetentionPolicy | Sequence[RetentionPolicy] | int | None = None,
        total_steps: int | None = None,
        mode: str | None = None,
        save_final: bool = True,
        snapshot_every: int | None = None,
        snapshot_slots: int = 2,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        model_only: bool = False,
        save_dtype: torch.dtype | None = None,
        save_on_signal: Sequence[int] = (),
        trigger_file: str | None = None,
        commit_timeout: float = 600.0,
        storage_options: dict[str, Any] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
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
        if mode not in (None, "disabled", "final_only"):
            raise ConfigError(f"mode must be None, 'disabled' or 'final_only', got {mode!r}")
        self._save_policy = _as_save_policy(save_policy)
        if mode == "final_only":
            self._save_policy = Never()
        self._keep = _as_retention(keep)
        self.total_steps = _opt_int("total_steps", total_steps, 0)
        self.snapshot_every = _opt_int("snapshot_every", snapshot_every, 1)
        if _opt_int("snapshot_slots", snapshot_slots, 1) is None:
            raise ConfigError("snapshot_slots must be an int >= 1")
        if save_dtype is not None and save_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(
                f"save_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {save_dtype!r}"
            )
        for name, pats in (("include", include or ()), ("exclude", exclude)):
            if isinstance(pats, str) or not all(isinstance(p, str) for p in pats):
                raise ConfigError(f"{name} must be a list of fqn patterns such as ['model'], got {pats!r}")
        self.root = normalize_root(root)
        self.remote_root: str | None = None
        if local_dir is not None:  # root is the remote tier; saves land locally first
            self.remote_root, self.root = self.root, os.path.abspath(os.fspath(local_dir))
        if not is_url(self.root) and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"checkpoint root {self.root} exists and is not a directory")
        self.state = state
        self.mode = mode
        self.max_inflight = max_inflight
        self.on_busy = on_busy
        self.overlap = overlap
        self.write_threads = write_threads
        self.save_final = save_final
        self.save_dtype = save_dtype
        self._include = list(include) if include is not None else None
        if model_only:
            modules = [k for k, v in state.items() if isinstance(v, torch.nn.Module)]
            if not modules:
                raise ConfigError("model_only=True but the state holds no nn.Module")
            self._include = modules if self._include is None else [*self._include, *modules]
        self._exclude = list(exclude)
        self._closed = False
        self._stats: list[dict[str, Any]] = []
        self._on_stats = on_stats
        # (step, metrics, whether a permanent save was attempted) of the last save_async call
        self._last_seen: tuple[int, dict[str, Any], bool] | None = None
        self._start_time = time.monotonic()
        self._last_saved: tuple[int, float] | None = None  # last permanent save: (step, monotonic)
        flat = self._flatten()  # fail on bad state now, not at step 40,000
        if mode == "disabled":
            self._disabled = True  # nothing else: no files, threads or processes
            return
        self._disabled = False
        root_storage = (
            storage if storage is not None else storage_for(self.remote_root or self.root, storage_options)
        )
        self._remote: Storage | None = None
        if self.remote_root is not None:
            self._remote = root_storage
            self._storage: Storage = storage_for(self.root)
            storage_options = None  # the writer (thread or process) only sees the local tier
        else:
            self._storage = root_storage
        self._triggers = (
            SaveTriggers(save_on_signal, trigger_file) if (save_on_signal or trigger_file) else None
        )

        self._dist = distributed.current()
        # several ranks with a local-first tier: each rank keeps its own part of every step in
        # its own directory (local disks are per node), and the parts are joined on the remote
        self._pieces = self._dist is not None and local_dir is not None
        if self._pieces:
            assert self._dist is not None
            if snapshot_every is not None:
                raise ConfigError(
                    "snapshot_every with local_dir and several ranks is not supported: a rolling "
                    "snapshot must be loadable from one root; drop local_dir or snapshot_every"
                )
            self.root = os.path.join(self.root, f"rank{self._dist.rank:05d}")
        self.commit_timeout = float(commit_timeout)
        self._assignment: tuple[Any, set[str]] | None = None
        self._chunk_meta: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]] = ({}, {})
        self._storage.makedirs(self.root)
        if (check := getattr(self._storage, "check_root", None)) is not None:
            check(self.root)  # a missing bucket fails now, not at the first save
        if self._dist is None or self._dist.coordinator or self._pieces:
            self._sweep_tmp()
        # every rank constructs the checkpointer together: agree on the run id (after the sweep)
        self._run_id = distributed.agree_run_id() if self._dist is not None else ""
        existing = list_in(self._storage, self.root)
        self._uploader: Uploader | None = None
        self._remote_retention: Retention | None = None
        if self._remote is not None and self.remote_root is not None:
            if (check_remote := getattr(self._remote, "check_root", None)) is not None:
                check_remote(self.remote_root)
            if self._dist is None or self._dist.coordinator:  # one rank deletes remotely
                self._remote_retention = Retention(
                    self._remote,
                    self.remote_root,
                    self._keep,
                    snapshot_slots,
                    list_in(self._remote, self.remote_root),
                )
            self._uploader = Uploader(
                self._storage,
                self._remote,
                self.remote_root,
                self._on_uploaded,
                self._on_upload_failed,
                commit_timeout=self.commit_timeout,
            )
            # a crash may have interrupted uploads: finish them now (one rank alone: a step of
            # several ranks commits only if every rank uploads its part, so those are dropped)
            for info in existing if not self._pieces else ():
                if info.upload == "pending":
                    self._uploader.submit(SaveHandle(info.step), info)
        self._committed: set[int] = {c.step for c in existing if c.tier == "permanent"}
        self._snapshots: set[int] = {c.step for c in existing if c.tier == "snapshot"}
        # only one rank deletes from a shared root: rank 0 (the others keep no policies and
        # unlimited snapshot slots); each rank prunes its own local pieces
        coordinator = self._dist is None or self._dist.coordinator or self._pieces
        self._retention = Retention(
            self._storage,
            self.root,
            self._keep if coordinator else [],
            snapshot_slots if coordinator else 1 << 62,
            existing,
        )
        self._lock = threading.Lock()
        self._inflight: dict[int, SaveHandle] = {}
        self._errors: list[tuple[SaveHandle, BaseException]] = []
        self._version = _version()

        self.executor = executor
        self._generation = 0
        self._pool: StagingPool | None = None
        self._executor: ThreadExecutor | ProcessExecutor | None = None
        self._ensure_pool(self._staged(flat))  # allocate and fault in the buffers before training
        assert self._pool is not None
        self._cuda_stream: torch.cuda.Stream | None = (
            torch.cuda.Stream() if torch.cuda.is_available() and self._pool.plan.needs_pinned else None
        )
        self._stager: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(1, "asyncckpt-stage") if overlap else None
        )
        if executor == "process":
            self._executor = ProcessExecutor(
                self.root, write_threads, self, restart=restart, storage_options=storage_options
            )
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
        """Snapshot the state for ``step`` and write it in the background, if it is due.

        Returns once the snapshot is in host memory (or, with ``overlap=True``, once the copy
        is queued).  Returns None if nothing was saved: the save policy skipped this step,
        the checkpointer is disabled, or ``on_busy="skip"`` found every buffer busy.  Raises
        the error of an earlier failed save, as ``WriteError``, if the caller has not seen it.

        Args:
            step: the training step, an int >= 0 that is not committed yet.
            metrics: JSON values recorded in the manifest (e.g. ``{"loss": 1.7}``); retention
                by metric (``KeepBest``) reads them.
            force: save whatever the policy says.
        """
        t0 = time.perf_counter()
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        encoded_metrics = encode_metrics(metrics)
        if self._disabled:
            return None
        self._raise_pending()
        assert self._executor is not None
        if (dead := self._executor.failure()) is not None:
            raise dead
        tier = self._decide(step, encoded_metrics, force, consume=True)
        self._last_seen = (step, encoded_metrics, tier == "permanent")
        if tier is None:
            return None
        with self._lock:
            done = self._committed if tier == "permanent" else self._snapshots
            if step in done:
                raise StepExistsError(
                    f"step {step} is already committed at "
                    f"{layout.join(self._tier_root(tier), layout.step_dirname(step))}; committed "
                    "checkpoints are never overwritten. Use a new step number or delete that directory"
                )
            if step in self._inflight:
                raise StepExistsError(f"step {step} is already being saved")
        if tier == "permanent":
            self._last_saved = (step, time.monotonic())
        flat = self._staged(self._flatten())
        pool = self._ensure_pool(flat)
        slot = pool.acquire(block=self.on_busy == "wait")
        if slot is None:
            log.info("step=%d skipped: all %d staging buffers are still being written", step, pool.slots)
            self._stats.append({"step": step, "skipped": True, "stall_s": time.perf_counter() - t0})
            return None
        t_slot = time.perf_counter()
        handle = SaveHandle(step)
        if self._uploader is not None and tier == "permanent":
            handle.uploaded = concurrent.futures.Future()  # resolved by the uploader
        with self._lock:
            self._inflight[step] = handle
        record: dict[str, Any] = {
            "step": step,
            "tier": tier,
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
        remote = None
        if self.remote_root is not None and tier == "permanent":
            remote = layout.join(self.remote_root, layout.step_dirname(step))
        write = WriteJob(
            root=self._tier_root(tier),
            tier=tier,
            remote=remote,
            step=step,
            entries=pool.plan.entries,
            buffer=pool.buffer(slot),
            tree=flat.tree,
            paths=flat.paths,
            metrics=encoded_metrics,
            library_version=self._version,
            rank=self._dist.rank if self._dist else 0,
            world_size=self._dist.world_size if self._dist else 1,
            chunk_offsets=self._chunk_meta[0],
            global_shapes=self._chunk_meta[1],
            run_id=self._run_id,
            commit_timeout=self.commit_timeout,
        )
        assert self._executor is not None
        self._executor.submit(Job(write, handle, pool, slot, self._generation, record))
        record["stall_s"] = time.perf_counter() - t0
        self._stats.append(record)
        return handle

    def should_save(self, step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Whether ``save_async(step)`` would save now (permanent or snapshot); no side effects."""
        if self._disabled or self._closed:
            return False
        return self._decide(step, encode_metrics(metrics), False, consume=False) is not None

    def protect(self, step: int) -> None:
        """Never let retention delete ``step`` (recorded under the root, for later runs too)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"protect() takes a step (int >= 0), got {step!r}")
        if not self._disabled:
            self._retention.protect(step)

    @property
    def signal_received(self) -> int | None:
        """The last signal from ``save_on_signal`` that arrived, or None."""
        return None if self._disabled or self._triggers is None else self._triggers.signal_received

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until every snapshot in flight is in host memory (the state may then change)."""
        if self._disabled:
            return
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
        if self._disabled:
            return
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
        if self._disabled:
            return None
        self.wait()
        sources = [] if self._pieces else [(self._storage, self.root)]  # a piece is not loadable
        if self._remote is not None and self.remote_root is not None:
            sources.append((self._remote, self.remote_root))
        loaded = resume_in(
            sources,
            self.state,
            step=step,
            strict=strict,
            exclude=exclude,
            allow_missing=allow_missing,
        )
        if loaded is not None:
            # Loading often creates state (an optimizer's moments); size the buffers now rather
            # than inside the next save.
            self._ensure_pool(self._staged(self._flatten()))
        return loaded

    def stats(self) -> list[dict[str, Any]]:
        """Per-save timings: stall, staging, queue wait, write and commit seconds, throughput."""
        return [dict(r) for r in self._stats]

    def close(self, final_step: int | None = None) -> None:
        """Save the final step if needed, drain every save in flight, stop; idempotent.

        Args:
            final_step: save this step now unless it is already committed.  Without it, the
                last step passed to ``save_async`` is saved if the policy skipped it
                (``save_final=True``, the default).

        Raises the error of a failed save the caller has not seen, so a failed final save
        makes the program fail instead of exiting quietly without a checkpoint.
        """
        if self._closed:
            return
        if self._disabled:
            self._closed = True
            return
        try:
            self.wait()  # a snapshot of the final step may still be in flight
            target = final_step
            last = self._last_seen
            if target is None and self.save_final and last is not None and not last[2]:
                target = last[0]  # the policy skipped the last step: save it now
            if target is not None and target not in self._committed and target not in self._inflight:
                metrics = last[1] if last is not None and last[0] == target else None
                self.save_async(target, metrics=metrics, force=True)
            self.wait()
            if self._uploader is not None:
                self._uploader.wait()  # the final checkpoint must reach the remote tier
        finally:
            self._shutdown()
        self._raise_pending()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # training failed: drain, but don't save its (possibly broken) last state
            self.save_final = False
            try:
                self.close()
            except Exception as e:  # don't mask the original exception with a save error
                log.error("asyncckpt: close() after an exception also failed: %s", e)

    def __repr__(self) -> str:
        return (
            f"AsyncCheckpointer(root={self.root!r}, max_inflight={self.max_inflight}, "
            f"on_busy={self.on_busy!r}, overlap={self.overlap}, inflight={len(self._inflight)})"
        )

    # ------------------------------------------------------------------ decisions

    def _decide(self, step: int, metrics: dict[str, Any], force: bool, consume: bool) -> str | None:
        """'permanent', 'snapshot' or None for ``step``."""
        if force or step == self.total_steps:
            return "permanent"
        if self._triggers is not None and consume:
            reason = self._triggers.fired()
            if reason is not None:
                log.warning("asyncckpt: saving step %d because of %s", step, reason)
                return "permanent"
        ctx = SaveContext(
            step=step,
            now=time.monotonic(),
            last_saved_step=self._last_saved[0] if self._last_saved else None,
            last_saved_time=self._last_saved[1] if self._last_saved else None,
            start_time=self._start_time,
            metrics=metrics,
        )
        if self._save_policy is None or self._save_policy.should_save(ctx):
            return "permanent"
        if self.snapshot_every is not None and step % self.snapshot_every == 0:
            return "snapshot"
        return None

    def _tier_root(self, tier: str) -> str:
        return self.root if tier == "permanent" else layout.join(self.root, layout.SNAPSHOT_DIR)

    def _staged(self, flat: FlatState) -> FlatState:
        """What this rank stages: its local shards, minus replicas another rank writes.

        The first time a structure is seen, ranks exchange their chunk lists (a collective, on
        this trainer thread, in a call every rank makes) so each chunk has one writer.
        """
        if self._dist is None and not any(distributed.is_dtensor(t) for t in flat.tensors.values()):
            return flat
        local, offsets, shapes, sizes = {}, {}, {}, {}
        for fqn, t in flat.tensors.items():
            lt, off, gshape = distributed.local_chunk(t)
            local[fqn], offsets[fqn], shapes[fqn] = lt, off, gshape
            sizes[fqn] = (off, lt.numel() * lt.element_size())
        sig = flat.signature()
        if self._dist is None:  # one process (perhaps DTensors on a 1-rank mesh): it writes all
            self._assignment = (sig, set(flat.tensors))
        elif self._assignment is None or self._assignment[0] != sig:
            self._assignment = (sig, distributed.assign_writers(sizes, self._dist))
        mine = self._assignment[1]
        self._chunk_meta = ({k: offsets[k] for k in mine}, {k: shapes[k] for k in mine})
        tensors = {k: v for k, v in local.items() if k in mine}
        return FlatState(
            tensors=tensors, tree=flat.tree, paths={k: v for k, v in flat.paths.items() if k in mine}
        )

    def _flatten(self) -> FlatState:
        flat = flatten_state(self.state)
        if self._include is not None or self._exclude:
            flat = select_state(flat, self._include, self._exclude)
        return flat

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
        plan = StagingPlan.from_tensors(flat.tensors, sig, cast=self.save_dtype)
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
        if h.uploaded is not None and not h.uploaded.done():
            h.uploaded.set_exception(err)
        h.committed.set_exception(err)

    def _apply_retention(self, in_flight: set[int]) -> None:
        """Local retention; a step still uploading counts as in flight (never deleted)."""
        if self._uploader is not None:
            in_flight = in_flight | self._uploader.uploading()
        for tier, step in self._retention.apply(in_flight):
            with self._lock:
                (self._committed if tier == "permanent" else self._snapshots).discard(step)

    def _emit(self, record: dict[str, Any]) -> None:
        if self._on_stats is None:
            return
        try:
            self._on_stats(dict(record))
        except Exception as e:  # a metrics sink must never break checkpointing
            log.warning("asyncckpt: the on_stats callback raised %s: %s", type(e).__name__, e)

    def _on_uploaded(self, info: CheckpointInfo, seconds: float = 0.0) -> None:
        """A step's remote copy is committed: retention on the remote tier, and locally again."""
        for rec in reversed(self._stats):
            if rec.get("step") == info.step and "upload_s" not in rec:
                rec["upload_s"] = seconds
                self._emit(rec)
                break
        if self._uploader is not None:
            uploading = self._uploader.uploading() - {info.step}
            if self._remote_retention is not None:
                self._remote_retention.add(info)
                self._remote_retention.apply(uploading)
            with self._lock:
                in_flight = set(self._inflight)
            self._retention.apply(in_flight | uploading)

    def _on_upload_failed(self, handle: SaveHandle, exc: BaseException) -> None:
        err = WriteError(
            f"uploading step {handle.step} to {self.remote_root} failed: {type(exc).__name__}: {exc}; "
            "the local copy is intact and the upload is retried when a checkpointer starts on this root"
        )
        err.__cause__ = exc
        with self._lock:
            self._errors.append((SaveHandle(handle.step), err))

    def wait_uploaded(self, timeout: float | None = None) -> None:
        """Block until every upload to the remote tier has finished; re-raise an upload error."""
        if self._uploader is not None and not self._uploader.wait(timeout):
            raise CheckpointTimeoutError(f"uploads to {self.remote_root} did not finish within {timeout}s")
        self._raise_pending()

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
        self._emit(rec)
        with self._lock:
            (self._committed if out.info.tier == "permanent" else self._snapshots).add(h.step)
            in_flight = set(self._inflight) - {h.step}
        if self._uploader is not None and out.info.tier == "permanent":
            join = (job.write.tree, job.write.paths, self._run_id) if self._pieces else None
            h.uploaded = self._uploader.submit(h, out.info, h.uploaded, join)
        # Retention runs after the commit and before the handle resolves, so a caller that
        # waited on the save sees the pruned root.
        self._retention.add(out.info)
        self._apply_retention(in_flight)
        with self._lock:
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
        if not self._storage.atomic_rename:
            return  # object stores: a prefix without a manifest may be another writer's; gc removes it
        for tier in ("permanent", "snapshot"):
            tmp = layout.join(self._tier_root(tier), layout.TMP_DIR)
            for name in self._storage.listdir(tmp):
                if layout.is_tmp_name(name):
                    self._storage.rmtree(layout.join(tmp, name))

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._triggers is not None:
            self._triggers.close()
        for hk in self._hooks:
            hk.remove()
        if self._stager is not None:
            self._stager.shutdown(wait=True)
        if self._executor is not None:
            self._executor.close()
        if self._uploader is not None:
            self._uploader.close()
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


def _opt_int(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum} (or None), got {value!r}")
    return value


def _as_save_policy(p: Any) -> SavePolicy | None:
    if p is None:
        return None
    if isinstance(p, int) and not isinstance(p, bool):
        return EveryNSteps(p)
    if not isinstance(p, SavePolicy):
        raise ConfigError(
            f"save_policy must be a policy such as EveryNSteps(500), an int N for every N "
            f"steps, or None; got {p!r}"
        )
    return p


def _as_retention(keep: Any) -> list[RetentionPolicy]:
    if keep is None:
        return []
    if isinstance(keep, int) and not isinstance(keep, bool):
        return [KeepLast(keep)]
    items = list(keep) if isinstance(keep, (list, tuple)) else [keep]
    for k in items:
        if not isinstance(k, RetentionPolicy):
            raise ConfigError(
                f"keep must be a retention policy such as KeepLast(3), a list of them, or an "
                f"int k for the last k; got {k!r}"
            )
    return items
