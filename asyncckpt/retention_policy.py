"""What to keep: pure retention policies over a history of :class:`CheckpointRecord`, and
:func:`plan_deletions`, which unions them and enforces the invariants."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError
from .layout import Kind
from .save_policy import check_int, check_positive, check_steps

__all__ = ["CheckpointRecord", "RetentionPolicy", "KeepLast", "KeepEvery", "KeepEveryNHours",
           "KeepBest", "KeepSteps", "KeepAll", "plan_deletions", "PERMANENT", "SNAPSHOT"]  # fmt: skip

PERMANENT = Kind.PERMANENT.value
SNAPSHOT = Kind.SNAPSHOT.value

# --------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint, as retention sees it.

    Attributes:
        step: its step.
        time: commit time, seconds since the epoch.
        metrics: the metrics saved with it.
        tier: ``"permanent"`` (subject to retention) or ``"snapshot"`` (a rotating slot that the
            caller manages; retention policies and :func:`plan_deletions` ignore it).
    """

    step: int
    time: float
    metrics: Mapping[str, Any] = field(default_factory=dict)
    tier: str = PERMANENT

    def __post_init__(self) -> None:
        check_int("CheckpointRecord", "step", self.step, 0, "steps are counts of completed updates")
        if self.tier not in (PERMANENT, SNAPSHOT):
            raise ConfigError(f"CheckpointRecord: tier must be 'permanent' or 'snapshot', got {self.tier!r}")


@runtime_checkable
class RetentionPolicy(Protocol):
    """Names the steps it wants kept; looks only at records whose tier is ``"permanent"``."""

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]: ...


def _permanent(history: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    return [r for r in history if r.tier == PERMANENT]


@dataclass(frozen=True)
class KeepLast:
    """Keeps the ``k`` highest permanent steps."""

    k: int

    def __post_init__(self) -> None:
        check_int("KeepLast", "k", self.k, 1, "use KeepAll() to keep everything")

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        return set(sorted({r.step for r in _permanent(history)}, reverse=True)[: self.k])


@dataclass(frozen=True)
class KeepEvery:
    """Keeps every permanent step divisible by ``k``, forever (OpenPI ``keep_period``)."""

    k: int

    def __post_init__(self) -> None:
        check_int("KeepEvery", "k", self.k, 1, "e.g. KeepEvery(5000) keeps steps 5000, 10000, ...")

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        return {r.step for r in _permanent(history) if r.step % self.k == 0}


@dataclass(frozen=True)
class KeepEveryNHours:
    """Keeps the first permanent checkpoint of each ``hours``-long window of commit time.

    Windows are anchored at ``t0``, the oldest permanent record's time: record ``r`` falls in
    window ``floor((r.time - t0) / (hours * 3600))`` and the earliest record of each window is
    kept (ties on time go to the lower step).  The oldest record is therefore always kept, so
    the anchor, and every earlier decision, stays put as the history grows.
    """

    hours: float

    def __post_init__(self) -> None:
        check_positive("KeepEveryNHours", "hours", self.hours, "e.g. KeepEveryNHours(6)")

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        records = sorted(_permanent(history), key=lambda r: (r.time, r.step))
        if not records:
            return set()
        t0, width = records[0].time, self.hours * 3600.0
        first: dict[int, int] = {}
        for r in records:
            first.setdefault(math.floor((r.time - t0) / width), r.step)
        return set(first.values())


def _metric_value(record: CheckpointRecord, metric: str) -> float | None:
    value = record.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class KeepBest:
    """Keeps the ``k`` permanent checkpoints with the best ``metric``.

    ``mode="min"`` means lower is better, ``"max"`` higher.  Ties go to the newer (higher) step.
    A record lacking the metric, or whose value is not a finite number, is kept when
    ``keep_missing`` is True and otherwise left to the other policies.
    """

    k: int
    metric: str
    mode: str = "min"
    keep_missing: bool = True

    def __post_init__(self) -> None:
        check_int("KeepBest", "k", self.k, 1, "e.g. KeepBest(1, 'loss')")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"KeepBest: metric must be a metric name, got {self.metric!r}; e.g. 'loss'")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"KeepBest: mode must be 'min' or 'max', got {self.mode!r}; 'min' for losses")

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        sign = 1.0 if self.mode == "min" else -1.0
        scored, missing = [], set()
        for r in _permanent(history):
            value = _metric_value(r, self.metric)
            if value is None:
                missing.add(r.step)
            else:
                scored.append((sign * value, -r.step))
        best = {-neg_step for _, neg_step in sorted(scored)[: self.k]}
        return best | missing if self.keep_missing else best


@dataclass(frozen=True, init=False)
class KeepSteps:
    """Keeps the listed steps (``ckpt.protect(step)``)."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        object.__setattr__(self, "steps", check_steps("KeepSteps", steps))

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        return {r.step for r in _permanent(history) if r.step in self.steps}


@dataclass(frozen=True)
class KeepAll:
    """Keeps every permanent checkpoint."""

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        return {r.step for r in _permanent(history)}


def plan_deletions(
    history: Sequence[CheckpointRecord],
    policies: Sequence[RetentionPolicy],
    now: float,
    *,
    protected: Collection[int] = (),
    in_flight: Collection[int] = (),
) -> list[int]:
    """Which permanent checkpoints to delete.

    A permanent checkpoint is kept if *any* policy keeps it (so ``KeepBest`` survives
    ``KeepLast``).  Whatever the policies say, it never returns: the newest (highest) permanent
    step, a step in ``protected`` or ``in_flight``, a step absent from ``history``, or a step
    with a snapshot record (the caller addresses checkpoints by step, so deleting it could hit
    the snapshot).  With no policies it returns nothing.

    Args:
        history: the committed checkpoints this root owns, any order.
        policies: retention policies; empty keeps everything.
        now: the current time, for time-based policies.
        protected: steps never deleted.
        in_flight: steps being written or uploaded; never deleted.

    Returns:
        The steps to delete, ascending and unique.
    """
    for p in policies:
        if not isinstance(p, RetentionPolicy):
            raise ConfigError(f"{p!r} is not a retention policy (it has no keep(history, now) method)")
    permanent = {r.step for r in _permanent(history)}
    if not policies or not permanent:
        return []
    kept: set[int] = set()
    for p in policies:
        kept |= set(p.keep(history, now))
    spared = kept | {max(permanent)} | set(protected) | set(in_flight)
    spared |= {r.step for r in history if r.tier != PERMANENT}
    return sorted(permanent - spared)
