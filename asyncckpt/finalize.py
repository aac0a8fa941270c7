"""What follows a commit, on one finalize thread: catalog, prune, upload, stats, then the handle.

Writers only write and commit; everything after runs here, so the next write never waits
behind a deletion or a stats sink.  For each save the order is fixed: the catalog records
the step, the pruner deletes what retention drops (never a step in flight or still
uploading), the upload to the remote tier is submitted, the stats record is completed, and
only then ``SaveHandle.committed`` resolves, so a caller that waited sees the pruned root.

A failed save is reported at once, on the thread that saw it fail: its error goes to the
inbox (re-raised on the trainer thread at its next call) and its handle fails.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .catalog import Catalog
from .errors import WriteError
from .handle import CheckpointInfo, ErrorInbox, SaveHandle
from .layout import Kind
from .pruner import Pruner
from .request import SaveOutcome
from .telemetry import Telemetry
from .upload import Uploader

__all__ = ["Finalizer", "RemoteTier"]

log = logging.getLogger("asyncckpt")

Join = tuple[dict[str, Any], dict[str, tuple[str | int, ...]], str]


@dataclass
class RemoteTier:
    """The remote side of a local-first setup: its uploader, and (on the coordinating rank)
    the catalog and pruner of the remote root."""

    uploader: Uploader
    root: str
    catalog: Catalog | None = None
    pruner: Pruner | None = None


@dataclass
class _Save:
    handle: SaveHandle
    kind: Kind
    record: dict[str, Any]
    join: Join | None


class Finalizer:
    """Tracks the saves in flight and finishes each one after its commit."""

    def __init__(
        self,
        catalog: Catalog,
        pruner: Pruner,
        telemetry: Telemetry,
        inbox: ErrorInbox,
        remote: RemoteTier | None = None,
    ) -> None:
        self.catalog, self.pruner, self.telemetry, self.inbox = catalog, pruner, telemetry, inbox
        if pruner.in_flight_now is None:  # a chunk sweep asks for the saves in flight at its listing
            pruner.in_flight_now = self.in_flight
        self.remote = remote
        self._lock = threading.Lock()
        self._inflight: dict[int, SaveHandle] = {}
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="asyncckpt-finalize", daemon=True)
        self._thread.start()

    # -- trainer thread
    def reserve(self, handle: SaveHandle) -> None:
        """Count ``handle``'s step as in flight from now on (before the writer starts it)."""
        with self._lock:
            self._inflight[handle.step] = handle

    def unreserve(self, handle: SaveHandle) -> None:
        with self._lock:
            if self._inflight.get(handle.step) is handle:
                del self._inflight[handle.step]

    def track(
        self,
        handle: SaveHandle,
        kind: Kind,
        committed: Future[SaveOutcome],
        record: dict[str, Any],
        join: Join | None = None,
    ) -> None:
        """Finish ``handle`` once ``committed`` resolves."""
        save = _Save(handle, kind, record, join)
        with self._lock:
            self._inflight[handle.step] = handle
        committed.add_done_callback(lambda f: self._on_done(save, f))

    def in_flight(self) -> set[int]:
        """Steps being written, or committed and not yet finished."""
        with self._lock:
            return set(self._inflight)

    def handles(self) -> list[SaveHandle]:
        """Handles in flight, failed ones first (so a wait reports their errors early)."""
        with self._lock:
            return sorted(self._inflight.values(), key=lambda h: h.committed.done())

    def upload_existing(self, info: CheckpointInfo) -> None:
        """Resume the upload of a step a crashed run committed locally but never uploaded."""
        assert self.remote is not None
        fut = self.remote.uploader.submit(info)
        fut.add_done_callback(lambda f: self._queue.put(lambda: self._uploaded(info.step, None, f)))

    def close(self, wait: bool = True) -> None:
        self._queue.put(None)
        self._thread.join(None if wait else 5)

    # -- writer / listener thread (cheap and non-blocking only)
    def _on_done(self, save: _Save, fut: Future[SaveOutcome]) -> None:
        exc = fut.exception()
        if exc is None:
            self._queue.put(lambda: self._committed(save, fut.result()))
            return
        h = save.handle
        err = (
            exc
            if isinstance(exc, WriteError)
            else WriteError(f"saving step {h.step} failed: {type(exc).__name__}: {exc}")
        )
        if err is not exc:
            err.__cause__ = exc
        log.error("asyncckpt: %s", err)
        self.inbox.put(err, h)
        with self._lock:
            self._inflight.pop(h.step, None)
        for f in (h.staged, h.uploaded, h.committed):
            if f is not None and not f.done():
                f.set_exception(err)

    # -- finalize thread
    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                task()
            except BaseException as e:  # noqa: BLE001 - never let the thread die
                log.exception("asyncckpt: finalizing failed: %s", e)

    def _uploading(self) -> set[int]:
        return self.remote.uploader.uploading() if self.remote is not None else set()

    def _committed(self, save: _Save, out: SaveOutcome) -> None:
        h = save.handle
        self.catalog.add(out.info)
        if self.pruner.chunks:
            self.pruner.hold(save.kind, h.step, out.objects)
        if self.remote is not None and save.kind is Kind.PERMANENT:
            fut = self.remote.uploader.submit(out.info, save.join)
            fut.add_done_callback(lambda f: self._queue.put(lambda: self._uploaded(h.step, h, f)))
        self.pruner.apply((self.in_flight() - {h.step}) | self._uploading())
        self.telemetry.update(save.record, queue_wait_s=out.queue_wait_s)
        self.telemetry.committed(save.record, out.bytes_written, out.write_seconds, out.commit_seconds)
        with self._lock:
            self._inflight.pop(h.step, None)
        h.committed.set_result(out.info)

    def _uploaded(
        self, step: int, handle: SaveHandle | None, fut: Future[tuple[CheckpointInfo, float]]
    ) -> None:
        assert self.remote is not None
        exc = fut.exception()
        if exc is not None:
            err = WriteError(
                f"uploading step {step} to {self.remote.root} failed: {type(exc).__name__}: {exc}; the local "
                "copy is intact and the upload is retried when a checkpointer starts on this root"
            )
            err.__cause__ = exc
            self.inbox.put(err)
            if handle is not None and handle.uploaded is not None and not handle.uploaded.done():
                handle.uploaded.set_exception(exc)
            return
        info, seconds = fut.result()
        self.telemetry.uploaded(step, seconds)
        uploading = self._uploading() - {step}
        if self.remote.catalog is not None and self.remote.pruner is not None:
            self.remote.catalog.add(info)
            self.remote.pruner.apply(uploading)
        self.pruner.apply(self.in_flight() | uploading)
        if handle is not None and handle.uploaded is not None and not handle.uploaded.done():
            handle.uploaded.set_result(info)

    def wait_uploads(self, timeout: float | None = None) -> bool:
        """Wait until every upload finished and was finalized; False on timeout."""
        if self.remote is None:
            return True
        if not self.remote.uploader.wait(timeout):
            return False
        done = threading.Event()
        self._queue.put(done.set)  # after the uploads' own finalize tasks
        return done.wait(timeout)
