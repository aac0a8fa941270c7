"""``SaveHandle``: what ``save_async`` returns."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import Manifest

from .errors import CheckpointTimeoutError

__all__ = ["SaveHandle", "CheckpointInfo", "ErrorInbox"]

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as listed by :func:`list_checkpoints`.

    Attributes:
        step: the training step.
        path: the step's directory (or URL).
        time: commit time, seconds since the epoch.
        bytes: total size of its files (with its parts, for a differential step).
        metrics: the metrics passed to ``save_async``.
        world_size: how many ranks wrote it.
        tier: ``"permanent"``, or ``"snapshot"`` for the rolling snapshot slots.
        upload: with a local-first tier: ``"pending"`` or ``"uploaded"`` for a local copy,
            ``"uploaded"`` for the remote copy; None otherwise.
        abandoned: a step of a line of training that a later resume rolled back from; never
            resumed unless asked for by step, never counted by retention (see concepts.md).
        part_bytes: a differential step: the bytes of its parts in the chunk store, shared
            with the steps that reference the same parts (part of ``bytes``).
        own_bytes: a differential step: the bytes of the parts this step wrote itself.
    """

    step: int
    path: str
    time: float
    bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    tier: str = "permanent"
    upload: str | None = None
    abandoned: bool = False
    part_bytes: int = 0
    own_bytes: int = 0

    @classmethod
    def from_manifest(
        cls, m: Manifest, path: str, tier: str = "permanent", upload: str | None = None
    ) -> CheckpointInfo:
        """The listing entry of a committed step, from its manifest."""
        from .chunkstore import part_bytes

        shared, own = part_bytes(m)
        return cls(
            step=m.step,
            path=path,
            time=m.created_at,
            bytes=m.total_bytes + shared,
            part_bytes=shared,
            own_bytes=own,
            metrics=dict(m.metrics),
            world_size=m.world_size,
            tier=tier,
            upload=upload,
        )


class SaveHandle:
    """One asynchronous save.

    Attributes:
        step: the step being saved.
        staged: resolves (to None) once the snapshot is in host memory; from then on the live
            state may change freely.
        committed: resolves to the :class:`CheckpointInfo` once the manifest is durable, or
            fails with :class:`~asyncckpt.WriteError`.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.staged: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.committed: concurrent.futures.Future[CheckpointInfo] = concurrent.futures.Future()
        # With a local-first tier: resolves once the remote copy is committed too.
        self.uploaded: concurrent.futures.Future[CheckpointInfo] | None = None
        self.observed = False  # the caller has seen this handle's error, if any

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait for the commit; raises the background error (a ``WriteError``) if it failed."""
        try:
            return self.committed.result(timeout)
        except (concurrent.futures.TimeoutError, TimeoutError):  # distinct classes before 3.11
            raise CheckpointTimeoutError(
                f"step {self.step} was not committed within {timeout}s; the writer is still "
                "busy (slow storage?). Wait longer or check the writer's progress with stats()"
            ) from None
        except BaseException:
            self.observed = True
            raise

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self.committed.done()

    def __repr__(self) -> str:
        if not self.committed.done():
            status = "staged" if self.staged.done() else "staging"
        elif self.committed.exception() is not None:
            status = "failed"
        else:
            status = "committed"
        return f"SaveHandle(step={self.step}, {status})"


class ErrorInbox:
    """Background errors, kept until the trainer thread's next call re-raises them once.

    An error whose handle the caller already observed (through ``result()``) is not raised
    again.  When several saves failed, the first is raised and the others are logged.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[tuple[SaveHandle | None, BaseException]] = []

    def put(self, err: BaseException, handle: SaveHandle | None = None) -> None:
        with self._lock:
            self._errors.append((handle, err))

    def raise_pending(self) -> None:
        with self._lock:
            pending = [(h, e) for h, e in self._errors if h is None or not h.observed]
            self._errors.clear()
        if not pending:
            return
        h, err = pending[0]
        if h is not None:
            h.observed = True
        if len(pending) > 1:
            log.error(
                "asyncckpt: %d more background errors: %s",
                len(pending) - 1,
                "; ".join(str(e) for _, e in pending[1:]),
            )
        raise err
