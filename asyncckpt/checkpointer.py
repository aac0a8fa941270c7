"""``AsyncCheckpointer``: the facade.  It checks arguments and forwards to the pipeline."""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError
from .handle import SaveHandle
from .legacy import from_legacy
from .options import (
    Options,
    ScheduleOptions,
    SelectOptions,
    SnapshotOptions,
    StagingOptions,
    StorageOptions,
    WriterOptions,
    as_retention,
)
from .pipeline import NullPipeline, Pipeline
from .policy import RetentionPolicy, SavePolicy
from .schedule import encode_metrics
from .state import Selector
from .storage import is_url

__all__ = ["AsyncCheckpointer"]

log = logging.getLogger("asyncckpt")


class AsyncCheckpointer:
    """Saves training state in the background; the trainer only waits for a host copy.

    Args:
        root: directory or URL (``s3://bucket/run7``) that holds the checkpoints.
        state: name -> object: modules, optimizers, schedulers (anything with
            ``state_dict``/``load_state_dict``), tensors, nested dicts/lists of them, and
            plain JSON values.  Dicts are updated in place by ``resume``.
        schedule: when to save (:class:`~asyncckpt.options.ScheduleOptions`); a save policy
            or an int N (every N steps) is accepted as shorthand for its ``policy``.
            Default: every ``save_async`` call saves.
        keep: what to keep: a retention policy, a list of them (a checkpoint survives if any
            keeps it), or an int k for the last k.  None keeps everything.  The newest
            checkpoint, steps in flight and ``protect()``-ed steps are never deleted.
        snapshots: a rolling snapshot tier (:class:`~asyncckpt.options.SnapshotOptions`).
        select: what goes into a checkpoint (:class:`~asyncckpt.options.SelectOptions`).
        staging: the host copy (:class:`~asyncckpt.options.StagingOptions`).
        writer: who writes (:class:`~asyncckpt.options.WriterOptions`).
        storage: credentials, a local-first tier, a custom backend
            (:class:`~asyncckpt.options.StorageOptions`).
        on_stats: called with each save's stats record once it committed, and again with
            ``upload_s`` once a local-first upload finished; runs on a background thread,
            exceptions are logged, never raised.
        enabled: False makes a null checkpointer: nothing is written, no thread or process
            is started, ``resume`` returns None.
        **legacy: the flat keywords of 0.1 (``max_inflight=``, ``save_policy=``, ...), still
            accepted with a ``DeprecationWarning``.

    Raises:
        ConfigError: an option is invalid.
        TypeError: the state holds something that cannot be saved (the message names it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        state: dict[str, Any],
        *,
        schedule: ScheduleOptions | SavePolicy | int | None = None,
        keep: RetentionPolicy | Sequence[RetentionPolicy] | int | None = None,
        snapshots: SnapshotOptions | None = None,
        select: SelectOptions | None = None,
        staging: StagingOptions | None = None,
        writer: WriterOptions | None = None,
        storage: StorageOptions | None = None,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
        enabled: bool = True,
        **legacy: Any,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(f"root must be a directory path or URL, got {root!r}")
        groups: dict[str, Any] = dict(
            schedule=schedule,
            snapshots=snapshots,
            select=select,
            staging=staging,
            writer=writer,
            storage=storage,
        )
        groups, legacy_enabled = from_legacy(groups, legacy)
        sched = groups["schedule"]
        if sched is None or isinstance(sched, (int, SavePolicy)) and not isinstance(sched, ScheduleOptions):
            sched = ScheduleOptions(policy=sched)
        opts = Options(
            schedule=_expect("schedule", sched, ScheduleOptions),
            keep=as_retention(keep),
            snapshots=_expect("snapshots", groups["snapshots"], SnapshotOptions, optional=True),
            select=_expect("select", groups["select"] or SelectOptions(), SelectOptions),
            staging=_expect("staging", groups["staging"] or StagingOptions(), StagingOptions),
            writer=_expect("writer", groups["writer"] or WriterOptions(), WriterOptions),
            storage=_expect("storage", groups["storage"] or StorageOptions(), StorageOptions),
            on_stats=on_stats,
        )
        if opts.writer.executor == "process" and opts.storage.backend is not None:
            raise ConfigError(
                "a custom storage backend cannot be used with executor='process': the writer "
                "process builds its own storage from the root"
            )
        local = os.fspath(opts.storage.local_dir if opts.storage.local_dir is not None else root)
        if not is_url(local) and os.path.exists(local) and not os.path.isdir(local):
            raise ConfigError(f"checkpoint root {local} exists and is not a directory")
        self.options = opts
        self._save_final = opts.schedule.final
        self._closed = False
        self._selector = selector = Selector(state, opts.select)
        selector.flat()  # fail on bad state now, not at step 40,000
        enabled = enabled and legacy_enabled
        self._pipeline: Pipeline | NullPipeline = (
            Pipeline(os.fspath(root), selector, opts) if enabled else NullPipeline()
        )
        self.root = self._pipeline.root if isinstance(self._pipeline, Pipeline) else os.fspath(root)
        if isinstance(self._pipeline, Pipeline):
            # held strongly, as the writer threads hold the pipeline: a checkpointer dropped
            # without close() is still drained at exit
            self._atexit = _exit_hook(self._pipeline, os.getpid())
            atexit.register(self._atexit)

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> dict[str, Any]:
        """The live state that saves snapshot and ``resume`` loads into; may be replaced."""
        return self._selector.state

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        self._selector.state = state

    def save_async(
        self, step: int, metrics: dict[str, Any] | None = None, force: bool = False
    ) -> SaveHandle | None:
        """Snapshot the state for ``step`` and write it in the background, if it is due.

        Returns once the snapshot is in host memory (or, with ``overlap``, once the copy is
        queued).  Returns None if nothing was saved: the schedule skipped this step, the
        checkpointer is disabled, or ``on_busy="skip"`` found every buffer busy.  Raises the
        error of an earlier failed save, as ``WriteError``, if the caller has not seen it.

        Args:
            step: the training step, an int >= 0 that is not committed yet.
            metrics: JSON values recorded in the manifest (e.g. ``{"loss": 1.7}``); retention
                by metric (``KeepBest``) reads them.
            force: save whatever the schedule says.
        """
        self._check_open()
        _check_step("save_async", step)
        return self._pipeline.save(step, encode_metrics(metrics), force)

    def should_save(self, step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Whether ``save_async(step)`` would save now (permanent or snapshot); no side effects."""
        return not self._closed and self._pipeline.should_save(step, encode_metrics(metrics))

    def protect(self, step: int) -> None:
        """Never let retention delete ``step`` (recorded under the root, for later runs too)."""
        _check_step("protect", step)
        self._pipeline.protect(step)

    @property
    def signal_received(self) -> int | None:
        """The last signal from ``ScheduleOptions.on_signal`` that arrived, or None."""
        return self._pipeline.signal_received

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until every snapshot in flight is in host memory (the state may then change)."""
        self._pipeline.wait_staged(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save in flight is committed; re-raise a background error."""
        self._pipeline.wait(timeout)

    def wait_uploaded(self, timeout: float | None = None) -> None:
        """Block until every upload to the remote tier has finished; re-raise an upload error."""
        self._pipeline.wait_uploaded(timeout)

    def resume(
        self,
        *,
        step: int | None = None,
        strict: bool = True,
        exclude: Sequence[str] = (),
        allow_missing: bool = False,
        cast: bool = False,
        require: Sequence[str] = (),
    ) -> int | None:
        """Load the newest valid checkpoint into the state, all or nothing; its step, or None.

        Saves in flight are committed first; the bytes are read into the staging buffers
        (no second copy of the state), verified, then applied.  See :func:`asyncckpt.resume`
        for the options.
        """
        self._check_open()
        return self._pipeline.resume(
            step, strict=strict, exclude=exclude, allow_missing=allow_missing, cast=cast, require=require
        )

    def stats(self) -> list[dict[str, Any]]:
        """Per-save timings: stall, staging, queue wait, write and commit seconds, throughput."""
        return self._pipeline.stats()

    def close(self, final_step: int | None = None, timeout: float | None = None) -> None:
        """Save the final step if needed, drain every save in flight, stop; idempotent.

        Args:
            final_step: save this step now unless it is already committed.  Without it, the
                last step passed to ``save_async`` is saved if the schedule skipped it
                (``ScheduleOptions(final=True)``, the default).
            timeout: give up after this many seconds: the steps not yet committed are
                logged, the writer is abandoned (a writer process is killed) and
                ``CheckpointTimeoutError`` is raised.  None waits for ever.

        Raises the error of a failed save the caller has not seen, so a failed final save
        makes the program fail instead of exiting quietly without a checkpoint.
        """
        if self._closed:
            return
        self._closed = True
        if isinstance(self._pipeline, Pipeline):
            atexit.unregister(self._atexit)
        self._pipeline.close(final_step, self._save_final, timeout)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        self._save_final = False  # training failed: drain, but don't save its broken last state
        try:
            self.close()
        except Exception as e:  # don't mask the original exception with a save error
            log.error("asyncckpt: close() after an exception also failed: %s", e)

    def __repr__(self) -> str:
        s = self.options.staging
        return (
            f"AsyncCheckpointer(root={self.root!r}, executor={self.options.writer.executor!r}, "
            f"max_inflight={s.max_inflight}, on_busy={s.on_busy!r}, overlap={s.overlap})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this AsyncCheckpointer is closed; create a new one to save again")


def _check_step(what: str, step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{what}: step must be an int, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ConfigError(f"{what}: step must be >= 0, got {step}")


def _expect(name: str, value: Any, cls: type, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, cls):
        raise ConfigError(f"{name}= takes {cls.__name__}(...), got {value!r}")
    return value


def _exit_hook(pipeline: Pipeline, pid: int) -> Callable[[], None]:
    """An atexit callback that drains a pipeline nobody closed.

    A forked child inherits the hook but not the writer: it does nothing there.
    """

    def hook() -> None:
        if os.getpid() != pid:
            return
        try:
            pipeline.close(None, pipeline.opts.schedule.final, pipeline.opts.writer.exit_timeout)
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("asyncckpt: a save failed while draining at interpreter exit: %s", e)

    return hook
