"""Grouped options of :class:`~asyncckpt.AsyncCheckpointer`, each validated where defined.

```python
AsyncCheckpointer(
    root, state,
    schedule=ScheduleOptions(policy=EveryNSteps(500), total_steps=10_000),
    keep=KeepLast(3),
    snapshots=SnapshotOptions(every=50),
    select=SelectOptions(exclude=["optim"]),
    staging=StagingOptions(overlap=True),
    writer=WriterOptions(executor="process"),
    storage=StorageOptions(fsspec={"anon": False}, local_dir="/nvme/ckpt"),
)
```

Each group is a frozen dataclass that raises :class:`~asyncckpt.ConfigError` on a bad value
when it is built, so a typo fails before training starts.  The flat keywords of 0.1
(``max_inflight=``, ``save_policy=``, ...) still work for one release, with a
``DeprecationWarning`` naming the new spelling (:func:`from_legacy`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .policy import EveryNSteps, KeepLast, RetentionPolicy, SavePolicy
from .priority import IO_PRIORITIES

__all__ = [
    "ScheduleOptions",
    "SnapshotOptions",
    "SelectOptions",
    "StagingOptions",
    "WriterOptions",
    "StorageOptions",
    "Options",
    "as_retention",
]


def _int(owner: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " (or None)" if allow_none else ""
        raise ConfigError(f"{owner}: {name} must be an int >= {minimum}{extra}, got {value!r}")


@dataclass(frozen=True)
class ScheduleOptions:
    """When to save.

    Attributes:
        policy: a save policy (``EveryNSteps``, ``EveryNSeconds``, ``PerEpoch``, ``AtSteps``,
            ``Schedule``, ``Custom``, ``SaveOnImprovement``..., combined with ``|``), or an int
            N for every N steps.  None: every ``save_async`` call saves.  ``Never()`` saves
            only the final step ("final only").
        total_steps: the last step of training; ``save_async(total_steps)`` always saves.
        final: ``close()`` saves the last step passed to ``save_async`` if the policy skipped
            it, so the end of training is never lost.
        on_signal: signals (e.g. ``[signal.SIGTERM]``) that request a save at the next
            ``save_async``; the handler only sets a flag (``signal_received``).
        trigger_file: if this file exists at a ``save_async`` call, that call saves and the
            file is removed.
    """

    policy: SavePolicy | int | None = None
    total_steps: int | None = None
    final: bool = True
    on_signal: Sequence[int] = ()
    trigger_file: str | None = None

    def __post_init__(self) -> None:
        p = self.policy
        if isinstance(p, int) and not isinstance(p, bool):
            object.__setattr__(self, "policy", EveryNSteps(p))
        elif p is not None and not isinstance(p, SavePolicy):
            raise ConfigError(
                f"ScheduleOptions: policy must be a policy such as EveryNSteps(500), an int N for "
                f"every N steps, or None; got {p!r}"
            )
        _int("ScheduleOptions", "total_steps", self.total_steps, 0, allow_none=True)
        if not isinstance(self.final, bool):
            raise ConfigError(f"ScheduleOptions: final must be True or False, got {self.final!r}")
        if not isinstance(self.on_signal, (list, tuple, set, frozenset)) or not all(
            isinstance(s, int) for s in self.on_signal
        ):
            raise ConfigError(f"ScheduleOptions: on_signal must be a list of signals, got {self.on_signal!r}")
        object.__setattr__(self, "on_signal", tuple(self.on_signal))
        if self.trigger_file is not None and not isinstance(self.trigger_file, (str, os.PathLike)):
            raise ConfigError(f"ScheduleOptions: trigger_file must be a path, got {self.trigger_file!r}")


@dataclass(frozen=True)
class SnapshotOptions:
    """A fast rolling tier under ``root/snapshots``: every ``every`` steps (when no permanent
    save happens) a snapshot is written; only the newest ``slots`` are kept, and an old one is
    deleted only after a newer one committed.  ``resume`` considers both tiers."""

    every: int
    slots: int = 2

    def __post_init__(self) -> None:
        _int("SnapshotOptions", "every", self.every, 1)
        _int("SnapshotOptions", "slots", self.slots, 1)


_SAVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class SelectOptions:
    """What goes into a checkpoint.

    Attributes:
        include: fqn patterns to save (fnmatch or prefix, e.g. ``["model"]``); None: all.
        exclude: fqn patterns to leave out of every save (e.g. ``["optim"]``).
        model_only: save only the ``nn.Module`` entries of the state ("weights only").
        dtype: cast floating-point tensors to this dtype (``torch.bfloat16``,
            ``torch.float16`` or ``torch.float32``) in the saved copy; the live state is
            untouched.
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    model_only: bool = False
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name, pats in (
            ("include", () if self.include is None else self.include),
            ("exclude", self.exclude),
        ):
            if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
                raise ConfigError(
                    f"SelectOptions: {name} must be a list of fqn patterns such as ['model'], got {pats!r}"
                )
        if not isinstance(self.model_only, bool):
            raise ConfigError(f"SelectOptions: model_only must be True or False, got {self.model_only!r}")
        if self.include is not None:
            object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.dtype is not None and self.dtype not in _SAVE_DTYPES:
            raise ConfigError(
                "SelectOptions: dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                f"got {self.dtype!r}"
            )

    def patterns(self, state: dict[str, Any]) -> tuple[list[str] | None, list[str]]:
        """(include, exclude) fqn patterns for ``state``; ``model_only`` names its modules."""
        include = list(self.include) if self.include is not None else None
        if self.model_only:
            modules = [k for k, v in state.items() if isinstance(v, torch.nn.Module)]
            if not modules:
                raise ConfigError("SelectOptions(model_only=True), but the state holds no nn.Module")
            include = modules if include is None else [*include, *modules]
        return include, list(self.exclude)


@dataclass(frozen=True)
class StagingOptions:
    """The host copy that ``save_async`` waits for.

    Attributes:
        max_inflight: snapshots that may wait on the writer at once; each costs one host
            buffer the size of the state's tensors.
        on_busy: ``"wait"`` blocks ``save_async`` until a buffer frees up; ``"skip"``
            returns None and saves nothing when every buffer is still being written.
        overlap: return from ``save_async`` as soon as the copy is queued; an optimizer
            step pre-hook waits for the copy, so call ``wait_staged()`` before mutating the
            state any other way.
    """

    max_inflight: int = 1
    on_busy: str = "wait"
    overlap: bool = False

    def __post_init__(self) -> None:
        _int("StagingOptions", "max_inflight", self.max_inflight, 1)
        if self.on_busy not in ("wait", "skip"):
            raise ConfigError(f"StagingOptions: on_busy must be 'wait' or 'skip', got {self.on_busy!r}")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"StagingOptions: overlap must be True or False, got {self.overlap!r}")


@dataclass(frozen=True)
class WriterOptions:
    """Who writes, and how.

    Attributes:
        executor: ``"thread"`` (a writer thread in this process) or ``"process"`` (a
            persistent writer process, so writing never competes with training for the GIL).
        threads: shard files written in parallel per save.
        restart: with ``"process"``, start a fresh writer if it dies; saves in flight are
            reported as ``WriterDiedError``, never silently dropped.
        commit_timeout: with several ranks, how long rank 0 waits for every rank's shards
            (and the others for rank 0's manifest) before the save fails naming who is missing.
        takeover: start even though another live writer owns the root (its owner record is
            fresh).  Without it that is a ``RootBusyError``: a root has one writer.
        lease_ttl: seconds after which a writer on another host that stopped renewing its
            owner record counts as gone (its in-flight work may then be swept).
        exit_timeout: how long the drain at interpreter exit waits for saves in flight
            before it gives up (logging the steps it lost); None waits for ever.
        direct_io: local disks: write shard files with ``O_DIRECT`` (no page cache, a tenth
            of the CPU). None tries it and falls back to buffered writes where the
            filesystem refuses it (logged once); False never; True requires it.
        nice: how much to lower the writer's CPU priority (0..19), relative to the thread
            that builds the checkpointer; every thread of the writer gets that one level.
            None: 10 for a writer process, 0 for a writer thread (a lowered thread that
            holds the GIL would hold up the trainer) and for the local-first tier's
            uploader (a thread in the trainer's process).
        io_priority: the writer's I/O priority: ``"normal"``, ``"low"`` (best effort, lowest
            level; the default) or ``"idle"`` (only when the disk is otherwise idle: the
            least interference, but a busy disk can delay a checkpoint without bound).
            Honoured by the BFQ I/O scheduler only.
        max_bandwidth: a cap on the writer's bytes per second, or None.  A checkpoint then
            takes about its size / cap to become durable (the first 32 MiB go at once), and
            holds its staging slot as long.  The local-first tier's uploads are capped at
            the same rate, apart from the local writes.  It is the knob for step-time
            jitter: uncapped, a write at full disk speed lengthens a few steps (on the
            2-core benchmark machine the p99 step during a write was about 2x the p99
            without one); at about a tenth of the disk's speed it was 0.96-1.37x
            (docs/benchmarks.md, Interference).
        compression: None (the default: stock-DCP files), ``"lz4"`` (blosc2 LZ4 with
            bit-shuffle, about 1 GB/s per core: 1.3x smaller bf16 weights, 1.14-1.22x
            smaller Adam moments) or ``"zstd"`` (blosc2 ZSTD with byte-shuffle: 1.45x /
            1.18-1.24x, at a third of the speed; for slow disks and object stores).  Done by
            the writer, never on the trainer thread.  Compressed checkpoints are asyncckpt's
            own format: asyncckpt loads them, ``asyncckpt export`` converts them, stock
            ``dcp.load`` cannot read them.  Needs ``pip install 'asyncckpt[compress]'``.
        compression_level: 1..9, or None for the setting's default (5 for lz4, 1 for zstd).
        compression_threads: threads compressing 4 MiB chunks in parallel (the codec
            releases the GIL).
        write_during_copy: a thread writer starts on the staging slot's first pages while
            the trainer still copies the rest (``O_DIRECT`` pieces, differential parts'
            hashes), so a checkpoint is durable up to the copy's time sooner.  Off by
            default: on a CPU state the writer's memory traffic beside the copy lengthened
            the stall by 1.0-1.6x at 1 GiB on 2 cores (docs/benchmarks.md).  CUDA copies
            are marked in 32 MiB runs as the DMA completes (not measured: no GPU was lent).
        incremental: differential checkpoints.  Each tensor is cut into 4 MiB parts; a save
            writes only the parts whose content changed since the last step this writer
            committed (hashed with xxh3-128 by the writer, never on the trainer thread), and
            references the rest.  Parts live in the root's ``.chunks/`` and are deleted when
            no committed step references them.  The first save after a start or a resume is
            whole.  Composes with ``compression``.  Like compressed ones, differential steps
            are asyncckpt's own format: ``asyncckpt export --format dcp`` writes a plain copy.
            Several ranks each store their own parts; a ``local_dir`` tier uploads only the
            parts the remote lacks.  Not yet with ``local_dir`` on several ranks.
    """

    executor: str = "thread"
    threads: int = 1
    restart: bool = True
    commit_timeout: float = 600.0
    takeover: bool = False
    lease_ttl: float = 60.0
    exit_timeout: float | None = 600.0
    direct_io: bool | None = None
    nice: int | None = None
    io_priority: str = "low"
    max_bandwidth: float | None = None
    compression: str | None = None
    compression_level: int | None = None
    compression_threads: int = 2
    incremental: bool = False
    write_during_copy: bool = False

    @property
    def cpu_nice(self) -> int:
        """``nice`` with its default resolved for the executor."""
        if self.nice is not None:
            return self.nice
        return 10 if self.executor == "process" else 0

    def __post_init__(self) -> None:
        if self.executor not in ("thread", "process"):
            raise ConfigError(f"WriterOptions: executor must be 'thread' or 'process', got {self.executor!r}")
        _int("WriterOptions", "threads", self.threads, 1)
        if not isinstance(self.restart, bool):
            raise ConfigError(f"WriterOptions: restart must be True or False, got {self.restart!r}")
        for name in ("commit_timeout", "lease_ttl", "exit_timeout"):
            v = getattr(self, name)
            if v is None and name == "exit_timeout":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"WriterOptions: {name} must be seconds > 0, got {v!r}")
        if not isinstance(self.takeover, bool):
            raise ConfigError(f"WriterOptions: takeover must be True or False, got {self.takeover!r}")
        if self.direct_io not in (None, True, False):
            raise ConfigError(f"WriterOptions: direct_io must be None, True or False, got {self.direct_io!r}")
        if self.nice is not None and (
            isinstance(self.nice, bool) or not isinstance(self.nice, int) or not 0 <= self.nice <= 19
        ):
            raise ConfigError(f"WriterOptions: nice must be None or an int in 0..19, got {self.nice!r}")
        if self.io_priority not in IO_PRIORITIES:
            raise ConfigError(
                f"WriterOptions: io_priority must be one of {', '.join(IO_PRIORITIES)}, got {self.io_priority!r}"
            )
        bw = self.max_bandwidth
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, (int, float)) or not bw >= 1):
            raise ConfigError(
                f"WriterOptions: max_bandwidth must be None or bytes per second >= 1 (e.g. 200e6), got {bw!r}"
            )
        _int("WriterOptions", "compression_threads", self.compression_threads, 1)
        if self.compression is not None:
            from .codec import encoder

            try:  # an unknown setting, a bad level, or blosc2 missing: now, not at the first save
                encoder(self.compression, self.compression_level)
            except ConfigError as e:
                raise ConfigError(f"WriterOptions: {e}") from None
        elif self.compression_level is not None:
            raise ConfigError("WriterOptions: compression_level needs compression='lz4' or 'zstd'")
        if not isinstance(self.write_during_copy, bool):
            raise ConfigError(
                f"WriterOptions: write_during_copy must be True or False, got {self.write_during_copy!r}"
            )
        if not isinstance(self.incremental, bool):
            raise ConfigError(f"WriterOptions: incremental must be True or False, got {self.incremental!r}")
        if self.incremental:
            try:
                import xxhash  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "WriterOptions: incremental=True needs the xxhash package: pip install xxhash"
                ) from None

    @property
    def part_threads(self) -> int:
        """Threads writing (and compressing) the parts of a differential save."""
        return self.compression_threads if self.compression is not None else max(8, self.threads)


@dataclass(frozen=True)
class StorageOptions:
    """Where checkpoints go besides ``root``.

    Attributes:
        fsspec: fsspec options for a URL root such as ``s3://bucket/run7`` (credentials,
            ``client_kwargs={"endpoint_url": ...}``); redacted wherever shown.
        local_dir: a local-first tier: commit to this fast local directory first, then
            upload each permanent checkpoint to ``root`` in the background
            (``SaveHandle.uploaded``).  ``resume`` prefers the local copy.
        backend: advanced: a :class:`~asyncckpt.storage.Storage` for ``root`` (default:
            chosen from ``root``); tests pass fault-injecting backends here.  Not with
            ``executor="process"``, whose writer builds its own.
    """

    fsspec: dict[str, Any] | None = None
    local_dir: str | os.PathLike[str] | None = None
    backend: Any = None

    def __post_init__(self) -> None:
        if self.fsspec is not None and not isinstance(self.fsspec, dict):
            raise ConfigError(f"StorageOptions: fsspec must be a dict of fsspec options, got {self.fsspec!r}")
        if self.local_dir is not None and not isinstance(self.local_dir, (str, os.PathLike)):
            raise ConfigError(f"StorageOptions: local_dir must be a directory path, got {self.local_dir!r}")


@dataclass(frozen=True)
class Options:
    """Every option group of a checkpointer, resolved (defaults filled in)."""

    schedule: ScheduleOptions
    keep: list[RetentionPolicy]
    snapshots: SnapshotOptions | None
    select: SelectOptions
    staging: StagingOptions
    writer: WriterOptions
    storage: StorageOptions
    on_stats: Any = None


def as_retention(keep: Any) -> list[RetentionPolicy]:
    """``keep=`` as a list of policies: None keeps all, an int k keeps the last k."""
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
