"""The save pipeline behind :class:`~asyncckpt.AsyncCheckpointer`, wired once.

```
trainer thread                   writer (thread or process)       finalize thread
Scheduler.decide -> Kind | None
flatten + select (state.py)
Sharder.local -> this rank's part
Stager.stage -> Lease ---------> executor.submit(request, lease)
                                  shards from the slot (writer.py)
                                  commit, manifest last (commit.py)
                                  released -> lease.release()
                                  committed --------------------> Finalizer: catalog, pruner,
                                                                  upload, telemetry, handle
```

Futures flow one way; errors land in one :class:`~asyncckpt.handle.ErrorInbox` and are
re-raised on the trainer thread.  :class:`NullPipeline` is the disabled checkpointer: the same
methods, doing nothing, starting nothing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Any

from . import distributed, layout
from .catalog import Catalog, abandon, list_in, normalize_root, protect, read_abandoned, unabandon
from .errors import CheckpointTimeoutError, ConfigError, RootBusyError, StepExistsError
from .executor import ProcessExecutor, ThreadExecutor
from .file_layout import BLOB_ALIGN, PAGE
from .finalize import Finalizer, RemoteTier
from .handle import ErrorInbox, SaveHandle
from .layout import Kind
from .options import (
    Options,
)
from .ownership import Heartbeat, is_alive, new_token, owners
from .pruner import Pruner, sweep_tmp
from .request import SaveRequest
from .resume import resume_in
from .schedule import Scheduler
from .sharding import Sharder
from .staging import Lease, Stager
from .state import Selector
from .storage import RootCheck, Storage, storage_for
from .telemetry import Telemetry
from .upload import Uploader

__all__ = ["Options", "Pipeline", "NullPipeline"]

log = logging.getLogger("asyncckpt")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("asyncckpt")
    except Exception:
        return "0"


class Pipeline:
    """The live checkpointer: storage, catalog, pruner, scheduler, stager, executor, finalizer."""

    def __init__(self, root: str, selector: Selector, opts: Options) -> None:
        self.selector = selector
        self.opts = opts
        self.root, self.remote_root = normalize_root(root), None
        st = opts.storage
        if st.local_dir is not None:  # root is the remote tier; saves land locally first
            self.remote_root, self.root = self.root, os.path.abspath(os.fspath(st.local_dir))
        direct = opts.writer.direct_io
        backend: Storage = st.backend or storage_for(
            self.remote_root or self.root, st.fsspec, direct_io=direct
        )
        self.remote: Storage | None = backend if self.remote_root else None
        self.storage: Storage = storage_for(self.root, direct_io=direct) if self.remote_root else backend
        writer_fsspec = None if self.remote_root else st.fsspec  # the writer sees the local tier only
        self.dist = distributed.current()
        # several ranks with a local-first tier: each rank keeps its own part of every step in
        # its own directory (local disks are per node), joined on the remote by the uploader
        self.pieces = self.dist is not None and st.local_dir is not None
        if self.pieces:
            if opts.snapshots is not None:
                raise ConfigError(
                    "snapshots with local_dir and several ranks are not supported: a rolling snapshot "
                    "must be loadable from one root; drop local_dir or the snapshots option"
                )
            self.root = layout.join(self.root, layout.rank_dir(self.dist.rank))  # type: ignore[union-attr]
        if opts.writer.incremental and self.pieces:
            raise ConfigError(
                "WriterOptions(incremental=True) does not work with a local_dir tier on several ranks "
                "yet (their pieces are joined on the remote, their parts are not): drop incremental or "
                "local_dir, or run on one rank"
            )
        self.storage.makedirs(self.root)
        if isinstance(self.storage, RootCheck):
            self.storage.check_root(self.root)  # a missing bucket fails now, not at the first save
        coordinator = self.dist is None or self.dist.coordinator
        owns_root = coordinator or self.pieces  # the rank that owns (and sweeps) this root
        busy = self._busy(self.storage, self.root) if owns_root else None
        if self.dist is not None and not self.pieces:  # every rank learns rank 0's verdict
            busy = distributed.broadcast(busy)
        if busy is not None:
            raise RootBusyError(busy)
        if owns_root:
            sweep_tmp(self.storage, self.root, opts.writer.lease_ttl)
        # every rank constructs the checkpointer together: agree on the run id (after the
        # sweep); it is also this writer's owner token
        self.run_id = distributed.agree_run_id() if self.dist is not None else new_token()
        self.heartbeats = (
            [Heartbeat(self.storage, self.root, self.run_id, opts.writer.lease_ttl)] if owns_root else []
        )
        try:  # from here on this process owns the root: a failure must give it back
            existing = list_in(self.storage, self.root)
            if owns_root:  # a crash between deleting an abandoned step and its mark leaves the mark
                for step in read_abandoned(self.storage, self.root) - {i.step for i in existing}:
                    unabandon(self.storage, self.root, step)
            self.catalog = Catalog(existing)
            slots = opts.snapshots.slots if opts.snapshots is not None else 2
            # one rank deletes from a shared root: rank 0; each rank prunes its own local pieces
            prunes = coordinator or self.pieces
            self.pruner = Pruner(
                self.storage,
                self.root,
                self.catalog,
                opts.keep if prunes else [],
                slots if prunes else None,
                self.run_id,
                chunks=opts.writer.incremental and prunes,
                ranks=self.dist.world_size if self.dist is not None else 1,
            )
            self.telemetry = Telemetry(opts.on_stats)
            self.inbox = ErrorInbox()
            remote = None
            if self.remote is not None and self.remote_root is not None:
                if isinstance(self.remote, RootCheck):
                    self.remote.check_root(self.remote_root)
                if coordinator:  # uploads in flight on the remote root are this writer's too
                    self.heartbeats.append(  # a remote that is down now must not stop training
                        Heartbeat(
                            self.remote, self.remote_root, self.run_id, opts.writer.lease_ttl, required=False
                        )
                    )
                self.uploader = Uploader(
                    self.storage, self.remote, self.remote_root, opts.writer, owner=self.run_id
                )
                remote = RemoteTier(self.uploader, self.remote_root)
                if coordinator:
                    remote.catalog = Catalog(list_in(self.remote, self.remote_root))
                    remote.pruner = Pruner(
                        self.remote,
                        self.remote_root,
                        remote.catalog,
                        opts.keep,
                        slots,
                        self.run_id,
                        chunks=opts.writer.incremental,
                        known_only=True,  # uploads bring parts before their manifests
                    )
            self.finalizer = Finalizer(self.catalog, self.pruner, self.telemetry, self.inbox, remote)
            # a crash may have interrupted uploads: finish them (a step of several ranks commits
            # only if every rank uploads its part, so those are dropped)
            for info in existing if remote is not None and not self.pieces else ():
                if info.upload == "pending":
                    self.finalizer.upload_existing(info)
            self.scheduler = Scheduler(opts.schedule, opts.snapshots)
            self.sharder = Sharder(self.dist)
            process = opts.writer.executor == "process"
            self.stager = Stager(
                opts.staging,
                shared=process,
                dtype=opts.select.dtype,
                files=opts.writer.threads,
                data_align=PAGE if opts.writer.incremental else BLOB_ALIGN,  # parts written directly
                cuda_progress=opts.writer.write_during_copy,
            )
            self.stager.ensure(self.sharder.local(selector.flat()).flat)  # allocate before training
            self.executor: ThreadExecutor | ProcessExecutor = (
                ProcessExecutor(self.root, opts.writer, storage_options=writer_fsspec)
                if process
                else ThreadExecutor(self.storage, opts.writer)
            )
        except BaseException:
            self._abandon_construction()
            raise
        self.version = _version()
        self.epoch = 0  # bumped by every resume: a differential writer then drops its parent
        self.closed = False

    def _abandon_construction(self) -> None:
        """Undo a construction that failed half way: stop what started, drop the owner
        records, so that a retry (say, with fewer staging buffers) is not refused as busy."""
        for name in ("executor", "finalizer", "uploader"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.close()
                except Exception as e:  # the original error matters more
                    log.warning("asyncckpt: closing the %s after a failed start: %s", name, e)
        if getattr(self, "stager", None) is not None:
            self.stager.close()
        for hb in self.heartbeats:
            hb.stop()

    def _busy(self, storage: Storage, root: str) -> str | None:
        """Why another writer owns ``root`` now, or None."""
        live = [rec for rec, mtime in owners(storage, root).values() if is_alive(rec, mtime)]
        if not live or self.opts.writer.takeover:
            return None
        rec = live[0]
        return (
            f"{root} is being written by another checkpointer ({rec.describe()}, owner record renewed "
            f"{max(0.0, time.time() - rec.renewed):.0f}s ago); a root has one writer. Use another root, "
            "stop that writer, read with asyncckpt.resume() instead, or pass "
            "writer=WriterOptions(takeover=True) to write anyway"
        )

    # -- saving
    def save(self, step: int, metrics: dict[str, Any], force: bool) -> SaveHandle | None:
        t0 = time.perf_counter()
        for notice in self.executor.take_notices():
            self.inbox.put(notice)
        self.inbox.raise_pending()
        if (dead := self.executor.failure()) is not None:
            raise dead
        kind = self.scheduler.decide(step, metrics, force)
        if kind is None:
            return None
        if (kind, step) in self.catalog.abandoned() and not self.pruner.delete(kind, step):
            raise StepExistsError(
                f"step {step} exists from a line of training a rollback abandoned, and could not be "
                f"deleted (protected, or see the log); use another step number or delete "
                f"{layout.step_dir(self.root, kind, step)}"
            )
        if self.catalog.has(kind, step):
            raise StepExistsError(
                f"step {step} is already committed at {layout.step_dir(self.root, kind, step)}; committed "
                "checkpoints are never overwritten. Use a new step number or delete that directory"
            )
        if step in self.finalizer.in_flight():
            raise StepExistsError(f"step {step} is already being saved")
        shard = self.sharder.local(self.selector.flat())
        handle = SaveHandle(step)
        tiered = self.remote_root is not None and kind is Kind.PERMANENT
        if tiered:
            handle.uploaded = concurrent.futures.Future()
        request = SaveRequest(
            root=layout.kind_root(self.root, kind),
            step=step,
            kind=kind,
            tree=shard.flat.tree,
            paths=shard.flat.paths,
            metrics=metrics,
            rank=self.dist.rank if self.dist else 0,
            world_size=self.dist.world_size if self.dist else 1,
            chunk_offsets=shard.chunk_offsets,
            global_shapes=shard.global_shapes,
            run_id=self.run_id,
            commit_timeout=self.opts.writer.commit_timeout,
            remote=layout.join(self.remote_root, layout.step_dirname(step)) if tiered else None,  # type: ignore[arg-type]
            library_version=self.version,
            selection=self.selector.recorded(),
            epoch=self.epoch,
        )
        submitted: list[tuple[concurrent.futures.Future[None], concurrent.futures.Future[Any]]] = []

        def submit(lease: Lease) -> None:
            # before the copy: with write_during_copy a writer thread starts on the slot's
            # first bytes while the trainer copies the rest (lease.copied); either way the
            # step is in flight before the writer writes a byte of it
            self.finalizer.reserve(handle)
            try:
                submitted.append(self.executor.submit(request, lease))
            except BaseException:
                self.finalizer.unreserve(handle)
                raise
            submitted[0][0].add_done_callback(lambda _: lease.release())

        try:
            lease = self.stager.stage(shard.flat, step, on_acquired=submit)
        except BaseException:
            if submitted:  # the writer gets the copy's error and fails the job; nobody waits on it
                self.finalizer.unreserve(handle)
            raise
        if lease is None:
            log.info(
                "step=%d skipped: all %d staging buffers are still being written",
                step,
                self.opts.staging.max_inflight,
            )
            self.telemetry.start(step, skipped=True, stall_s=time.perf_counter() - t0)
            return None
        handle.staged = lease.staged
        rec = self.telemetry.start(
            step, tier=kind.value, staging_bytes=lease.pool.plan.total_bytes, slot_wait_s=lease.slot_wait_s
        )
        lease.staged.add_done_callback(lambda _: self.telemetry.update(rec, staging_s=lease.staging_s))
        _, committed = submitted[0]
        join = (shard.flat.tree, shard.flat.paths, self.run_id) if self.pieces else None
        self.finalizer.track(handle, kind, committed, rec, join)
        self.telemetry.update(rec, stall_s=time.perf_counter() - t0)
        return handle

    def should_save(self, step: int, metrics: dict[str, Any]) -> bool:
        return self.scheduler.decide(step, metrics, consume=False) is not None

    @property
    def signal_received(self) -> int | None:
        return self.scheduler.signal_received

    # -- waiting
    def wait_staged(self, timeout: float | None) -> None:
        for h in self.finalizer.handles():
            try:
                h.staged.result(timeout)
            except (TimeoutError, concurrent.futures.TimeoutError):  # distinct classes before 3.11
                raise CheckpointTimeoutError(f"step {h.step} was not staged within {timeout}s") from None
            except BaseException:
                pass  # surfaces through the inbox
        self.inbox.raise_pending()

    def wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in self.finalizer.handles():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = concurrent.futures.wait([h.committed], timeout=left)
            if not done:
                raise CheckpointTimeoutError(
                    f"step {h.step} was not committed within {timeout}s; storage is slow or stuck"
                )
        self.inbox.raise_pending()

    def wait_uploaded(self, timeout: float | None) -> None:
        if not self.finalizer.wait_uploads(timeout):
            raise CheckpointTimeoutError(f"uploads to {self.remote_root} did not finish within {timeout}s")
        self.inbox.raise_pending()

    # -- everything else
    def resume(self, step: int | None, **opts: Any) -> int | None:
        self.wait(None)
        self.epoch += 1
        sources = [] if self.pieces else [(self.storage, self.root)]  # a piece is not loadable
        if self.remote is not None and self.remote_root is not None:
            sources.append((self.remote, self.remote_root))
        pool = self.stager.pool
        slot = pool.acquire() if pool is not None else None  # read into the staging buffers
        try:
            views = region = None
            if pool is not None and slot is not None:
                views, buf = pool.views(slot), pool.buffer(slot)
                region = (buf.data_ptr(), buf.numel())
            loaded = resume_in(sources, self.selector.state, step=step, pool=views, region=region, **opts)
        finally:
            if pool is not None and slot is not None:
                pool.restore(slot)  # whole files were read into it: the blobs' headers again
                pool.release(slot)
        if loaded is not None:
            self._abandon_after(loaded)
            # loading often creates state (an optimizer's moments): size the buffers now
            self.stager.ensure(self.sharder.local(self.selector.flat()).flat)
        return loaded

    def _abandon_after(self, step: int) -> None:
        """Training goes on from ``step``: newer steps belong to an abandoned line.  They are
        marked (so a crash resumes the new line), never counted by retention, and deleted
        once the new line passes them."""
        newer = self.catalog.abandon_after(step)
        if newer and (self.dist is None or self.dist.coordinator or self.pieces):
            abandon(self.storage, self.root, newer)
        if newer:
            log.warning("asyncckpt: resumed step %d; newer steps %s are abandoned", step, newer)

    def protect(self, step: int) -> None:
        protect(self.storage, self.root, [step])

    def stats(self) -> list[dict[str, Any]]:
        return self.telemetry.records()

    def close(self, final_step: int | None, save_final: bool, timeout: float | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        stuck = False
        try:
            self.wait(left())  # a snapshot of the final step may still be in flight
            target = self.scheduler.final_step(final_step) if save_final or final_step is not None else None
            if target is not None:
                step, metrics = target
                if not self.catalog.has(Kind.PERMANENT, step) and step not in self.finalizer.in_flight():
                    self.save(step, metrics, force=True)
            self.wait(left())
            if not self.finalizer.wait_uploads(left()):  # the final checkpoint must reach the remote
                raise CheckpointTimeoutError(
                    f"uploads to {self.remote_root} did not finish within {timeout}s"
                )
        except CheckpointTimeoutError:
            stuck = True
            lost = sorted(
                self.finalizer.in_flight() | (self.uploader.uploading() if self.remote_root else set())
            )
            log.error(
                "asyncckpt: close() gave up after %ss; steps not committed or not uploaded: %s", timeout, lost
            )
            raise
        finally:
            self.shutdown(wait=not stuck)
        self.inbox.raise_pending()

    def shutdown(self, wait: bool = True) -> None:
        """Stop every thread and process; ``wait=False`` abandons a stuck writer (its buffers
        are left allocated, since it may still be reading them)."""
        self.scheduler.close()
        self.executor.close(wait)
        self.finalizer.close(wait)
        if self.remote_root is not None:
            self.uploader.close(wait)
        for hb in self.heartbeats:
            hb.stop()
        if wait:
            self.stager.close()


class NullPipeline:
    """The disabled checkpointer: writes nothing, starts no thread or process."""

    signal_received = None

    def save(self, step: int, metrics: dict[str, Any], force: bool) -> None:
        return None

    def should_save(self, step: int, metrics: dict[str, Any]) -> bool:
        return False

    def wait_staged(self, timeout: float | None) -> None:
        pass

    def wait(self, timeout: float | None) -> None:
        pass

    def wait_uploaded(self, timeout: float | None) -> None:
        pass

    def resume(self, step: int | None, **opts: Any) -> None:
        return None

    def protect(self, step: int) -> None:
        pass

    def stats(self) -> list[dict[str, Any]]:
        return []

    def close(self, final_step: int | None, save_final: bool, timeout: float | None = None) -> None:
        pass
