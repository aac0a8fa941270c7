"""When to save and what to keep: pure functions of step, time and history.

Nothing here does I/O or reads a clock (the checkpointer owns both).  A save policy decides one
:class:`SaveContext`; a retention policy names the steps it keeps out of a history of
:class:`CheckpointRecord`; :func:`plan_deletions` unions them and enforces the invariants.
Steps are the values passed to ``save_async``: counts of completed optimizer steps.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError

__all__ = [
    "SaveContext",
    "SavePolicy",
    "EveryNSteps",
    "EveryNSeconds",
    "PerEpoch",
    "AtSteps",
    "Schedule",
    "Custom",
    "AnyOf",
    "Never",
    "CheckpointRecord",
    "RetentionPolicy",
    "KeepLast",
    "KeepEvery",
    "KeepEveryNHours",
    "KeepBest",
    "KeepSteps",
    "KeepAll",
    "plan_deletions",
    "hf_trainer",
    "axolotl",
    "openpi",
    "internlm",
    "h2o_llm_studio",
]

PERMANENT = "permanent"
SNAPSHOT = "snapshot"


def _int(owner: str, name: str, value: Any, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}; {fix}")
    return value


def _positive(owner: str, name: str, value: Any, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ConfigError(f"{owner}: {name} must be a finite number > 0, got {value!r}; {fix}")
    return float(value)


def _steps(owner: str, steps: Iterable[int]) -> frozenset[int]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ConfigError(f"{owner}: steps must be an iterable of ints, got {steps!r}; e.g. [100, 500]")
    return frozenset(_int(owner, "each step", s, 0, "steps are counts of completed updates") for s in steps)


# --------------------------------------------------------------------------- save policies


@dataclass(frozen=True)
class SaveContext:
    """Everything a save policy may look at.

    Attributes:
        step: the step passed to ``save_async``.
        now: the caller's clock in seconds (the checkpointer passes ``time.monotonic()``).
        last_saved_step: step of the last decision that saved, None before the first.
        last_saved_time: ``now`` at that decision, None before the first.
        start_time: ``now`` when the checkpointer started.
        metrics: the metrics passed to ``save_async``.
    """

    step: int
    now: float
    last_saved_step: int | None
    last_saved_time: float | None
    start_time: float
    metrics: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class SavePolicy(Protocol):
    """Decides whether one step is saved; must be pure and deterministic given ``ctx``."""

    def should_save(self, ctx: SaveContext) -> bool: ...


class _Composable:
    """Gives save policies ``a | b``, meaning ``AnyOf(a, b)``."""

    def __or__(self, other: object) -> AnyOf:
        if not isinstance(other, SavePolicy):
            return NotImplemented
        return AnyOf(self, other)  # type: ignore[arg-type]  # self is a SavePolicy subclass

    def __ror__(self, other: object) -> AnyOf:
        if not isinstance(other, SavePolicy):
            return NotImplemented
        return AnyOf(other, self)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EveryNSteps(_Composable):
    """Saves when ``step >= offset`` and ``(step - offset) % n == 0`` (HF ``save_steps``)."""

    n: int
    offset: int = 0

    def __post_init__(self) -> None:
        _int("EveryNSteps", "n", self.n, 1, "pass the number of steps between saves, e.g. EveryNSteps(500)")
        _int("EveryNSteps", "offset", self.offset, 0, "pass the first step to save, or 0")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step >= self.offset and (ctx.step - self.offset) % self.n == 0


@dataclass(frozen=True)
class EveryNSeconds(_Composable):
    """Saves once ``seconds`` have passed since the last save (or since the start)."""

    seconds: float

    def __post_init__(self) -> None:
        _positive("EveryNSeconds", "seconds", self.seconds, "e.g. EveryNSeconds(1800) saves every 30 min")

    def should_save(self, ctx: SaveContext) -> bool:
        since = ctx.last_saved_time if ctx.last_saved_time is not None else ctx.start_time
        return ctx.now - since >= self.seconds


@dataclass(frozen=True)
class PerEpoch(_Composable):
    """Saves at evenly spaced steps within each epoch, and always at each epoch's end.

    Epoch ``e`` (1-based) ends at step ``e * steps_per_epoch``; a step's position in its epoch is
    ``p = (step - 1) % steps_per_epoch + 1``.  A step saves when ``p % interval == 0`` or
    ``p == steps_per_epoch``.  ``interval`` is ``max(1, steps_per_epoch // saves_per_epoch)``
    (Axolotl) or ``max(1, round(fraction * steps_per_epoch))``, halves rounding up.  Step 0 never
    saves.  Example: 10 steps per epoch, 3 saves per epoch: steps 3, 6, 9, 10, 13, ..., 19, 20.

    Args:
        steps_per_epoch: optimizer steps in one epoch.
        saves_per_epoch: how many evenly spaced saves per epoch.
        fraction: alternatively, the spacing as a fraction of an epoch (0.25 = every quarter).
    """

    steps_per_epoch: int
    saves_per_epoch: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        _int("PerEpoch", "steps_per_epoch", self.steps_per_epoch, 1, "pass len(train_dataloader)")
        if (self.saves_per_epoch is None) == (self.fraction is None):
            raise ConfigError(
                "PerEpoch: pass exactly one of saves_per_epoch and fraction, got "
                f"saves_per_epoch={self.saves_per_epoch!r}, fraction={self.fraction!r}; "
                "e.g. PerEpoch(1000, saves_per_epoch=4) or PerEpoch(1000, fraction=0.25)"
            )
        if self.saves_per_epoch is not None:
            _int("PerEpoch", "saves_per_epoch", self.saves_per_epoch, 1, "use 1 to save at epoch ends only")
        elif _positive("PerEpoch", "fraction", self.fraction, "e.g. 0.25 saves every quarter") > 1:
            raise ConfigError(f"PerEpoch: fraction must be <= 1, got {self.fraction!r}; 1.0 = epoch ends")

    @property
    def interval(self) -> int:
        """Steps between saves within an epoch."""
        if self.saves_per_epoch is not None:
            return max(1, self.steps_per_epoch // self.saves_per_epoch)
        return max(1, math.floor(float(self.fraction or 1.0) * self.steps_per_epoch + 0.5))

    def should_save(self, ctx: SaveContext) -> bool:
        if ctx.step < 1:
            return False
        position = (ctx.step - 1) % self.steps_per_epoch + 1
        return position % self.interval == 0 or position == self.steps_per_epoch


@dataclass(frozen=True, init=False)
class AtSteps(_Composable):
    """Saves at exactly the listed steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        object.__setattr__(self, "steps", _steps("AtSteps", steps))

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step in self.steps


@dataclass(frozen=True, init=False)
class Schedule(_Composable):
    """A progressive schedule: ``[(0, 100), (10_000, 1000)]`` saves every 100 steps, then every 1000.

    At step ``s`` the active pair is the last ``(from_step, every)`` with ``from_step <= s``; it
    saves when ``(s - from_step) % every == 0``.  Steps before the first ``from_step`` never save.
    """

    pairs: tuple[tuple[int, int], ...]

    def __init__(self, pairs: Sequence[tuple[int, int]]) -> None:
        fix = "pass (from_step, every) pairs sorted by from_step, e.g. [(0, 100), (10_000, 1000)]"
        try:
            clean = tuple(
                (_int("Schedule", "from_step", a, 0, fix), _int("Schedule", "every", b, 1, fix))
                for a, b in pairs
            )
        except ConfigError:
            raise
        except (TypeError, ValueError):
            raise ConfigError(f"Schedule: pairs must be int pairs, got {pairs!r}; {fix}") from None
        if not clean:
            raise ConfigError(f"Schedule: pairs is empty; {fix}")
        starts = [a for a, _ in clean]
        if any(x >= y for x, y in zip(starts, starts[1:])):
            raise ConfigError(f"Schedule: from_step values must strictly increase, got {starts}; {fix}")
        object.__setattr__(self, "pairs", clean)

    def should_save(self, ctx: SaveContext) -> bool:
        i = bisect.bisect_right([a for a, _ in self.pairs], ctx.step) - 1
        if i < 0:
            return False
        start, every = self.pairs[i]
        return (ctx.step - start) % every == 0


@dataclass(frozen=True)
class Custom(_Composable):
    """Calls a user function ``fn(ctx) -> bool``; it should be pure too."""

    fn: Callable[[SaveContext], bool]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"Custom: fn must be callable, got {self.fn!r}; e.g. lambda ctx: ctx.step == 7")

    def should_save(self, ctx: SaveContext) -> bool:
        return bool(self.fn(ctx))


@dataclass(frozen=True, init=False)
class AnyOf(_Composable):
    """Saves if any of its policies does; ``a | b`` builds one (nested ``AnyOf`` flatten)."""

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        flat: list[SavePolicy] = []
        for p in policies:
            if not isinstance(p, SavePolicy):
                raise ConfigError(f"AnyOf: {p!r} is not a save policy (it has no should_save(ctx) method)")
            flat.extend(p.policies if isinstance(p, AnyOf) else (p,))
        if not flat:
            raise ConfigError("AnyOf: pass at least one policy; use Never() to never save")
        object.__setattr__(self, "policies", tuple(flat))

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)


@dataclass(frozen=True)
class Never(_Composable):
    """Never saves (``mode="final_only"`` pairs it with the guaranteed final save)."""

    def should_save(self, ctx: SaveContext) -> bool:
        return False


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
        _int("CheckpointRecord", "step", self.step, 0, "steps are counts of completed updates")
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
        _int("KeepLast", "k", self.k, 1, "use KeepAll() to keep everything")

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        return set(sorted({r.step for r in _permanent(history)}, reverse=True)[: self.k])


@dataclass(frozen=True)
class KeepEvery:
    """Keeps every permanent step divisible by ``k``, forever (OpenPI ``keep_period``)."""

    k: int

    def __post_init__(self) -> None:
        _int("KeepEvery", "k", self.k, 1, "e.g. KeepEvery(5000) keeps steps 5000, 10000, ...")

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
        _positive("KeepEveryNHours", "hours", self.hours, "e.g. KeepEveryNHours(6)")

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
        _int("KeepBest", "k", self.k, 1, "e.g. KeepBest(1, 'loss')")
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
        object.__setattr__(self, "steps", _steps("KeepSteps", steps))

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


# --------------------------------------------------------------------------- presets


def _options(
    owner: str,
    save_policy: SavePolicy | None,
    keep: list[RetentionPolicy],
    total_steps: int | None,
    *,
    enabled: bool = True,
    snapshot_every: int | None = None,
) -> dict[str, Any]:
    """The checkpointer's keyword arguments for a preset (option groups, not flat keywords)."""
    from .options import ScheduleOptions, SnapshotOptions  # options.py imports this module

    if total_steps is not None:
        _int(owner, "total_steps", total_steps, 1, "pass the number of optimizer steps, or None")
    return {
        "schedule": ScheduleOptions(policy=save_policy, total_steps=total_steps),
        "keep": keep,
        "snapshots": SnapshotOptions(every=snapshot_every) if snapshot_every is not None else None,
        "enabled": enabled,
    }


def _limit(owner: str, limit: int | None) -> list[RetentionPolicy]:
    if limit is None:
        return [KeepAll()]
    return [KeepLast(_int(owner, "save_total_limit", limit, 1, "use None to keep every checkpoint"))]


def hf_trainer(
    save_steps: int,
    save_total_limit: int | None = None,
    metric_for_best_model: str | None = None,
    greater_is_better: bool = False,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring Hugging Face ``TrainingArguments`` checkpointing.

    ``save_strategy="steps"`` with ``save_steps``; ``save_total_limit`` keeps the last N
    (None keeps all); with ``metric_for_best_model`` the best checkpoint is kept as well.
    HF moves the best inside its N, so it holds at most N; here the best comes in addition to the
    last N (at most N + 1).  Checkpoints saved without the metric are rotated normally.
    ``total_steps`` adds the final step, as HF's end-of-training save does.  Unlike HF,
    ``greater_is_better`` defaults to False for every metric: pass True for accuracy-like ones.
    """
    save = EveryNSteps(_int("hf_trainer", "save_steps", save_steps, 1, "e.g. save_steps=500"))
    keep = _limit("hf_trainer", save_total_limit)
    if metric_for_best_model is not None and save_total_limit is not None:
        mode = "max" if greater_is_better else "min"
        keep.append(KeepBest(1, metric_for_best_model, mode, keep_missing=False))
    return _options("hf_trainer", save, keep, total_steps)


def axolotl(
    steps_per_epoch: int,
    saves_per_epoch: int,
    save_total_limit: int | None = None,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring Axolotl's ``saves_per_epoch`` and ``save_total_limit``.

    Saves ``saves_per_epoch`` times per epoch, evenly spaced, plus every epoch end (see
    :class:`PerEpoch`); keeps the last ``save_total_limit`` (None keeps all).
    """
    save = PerEpoch(steps_per_epoch, saves_per_epoch)
    return _options("axolotl", save, _limit("axolotl", save_total_limit), total_steps)


def openpi(save_interval: int, keep_period: int | None, total_steps: int) -> dict[str, Any]:
    """Options mirroring OpenPI's ``save_interval`` / ``keep_period`` (Orbax ``max_to_keep=1``).

    Saves every ``save_interval`` steps and the final step; keeps the newest checkpoint and,
    forever, every step divisible by ``keep_period`` (None: only the newest).
    """
    save = EveryNSteps(_int("openpi", "save_interval", save_interval, 1, "e.g. save_interval=1000"))
    keep: list[RetentionPolicy] = [KeepLast(1)]
    if keep_period is not None:
        keep.append(KeepEvery(_int("openpi", "keep_period", keep_period, 1, "e.g. 5000, or None")))
    return _options(
        "openpi", save, keep, _int("openpi", "total_steps", total_steps, 1, "pass num_train_steps")
    )


def internlm(checkpoint_every: int, snapshot_every: int | None, total_steps: int) -> dict[str, Any]:
    """Options mirroring InternLM's ``checkpoint_every`` and ``oss_snapshot_freq``.

    Permanent checkpoints every ``checkpoint_every`` steps and at the final step, all kept;
    crash-recovery snapshots every ``snapshot_every`` steps, rotating through two slots
    (None: no snapshots).
    """
    save = EveryNSteps(_int("internlm", "checkpoint_every", checkpoint_every, 1, "e.g. 1000"))
    if snapshot_every is not None:
        _int("internlm", "snapshot_every", snapshot_every, 1, "e.g. 100, or None for no snapshots")
    total = _int("internlm", "total_steps", total_steps, 1, "pass the total number of steps")
    return _options("internlm", save, [KeepAll()], total, snapshot_every=snapshot_every)


def h2o_llm_studio(
    mode: str,
    metric: str = "loss",
    greater_is_better: bool = False,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring H2O LLM Studio's ``save_checkpoint`` setting.

    H2O saves after each evaluation, so ``save_policy`` is None: every ``save_async`` the
    trainer makes (after its evaluation, with the metric) is saved.

    - ``"last"``: keeps only the newest checkpoint; ``total_steps`` guarantees the final one.
    - ``"best"``: keeps the checkpoint with the best ``metric``.  H2O keeps the best alone; here
      the newest is kept too, because retention never deletes the newest (crash resume needs it),
      so at most two remain.  Checkpoints without the metric are not kept for it.
    - ``"disabled"`` (or H2O's spelling ``"disable"``): ``enabled=False``, nothing is saved.
    """
    if mode == "last":
        return _options("h2o_llm_studio", None, [KeepLast(1)], total_steps)
    if mode == "best":
        best = KeepBest(1, metric, "max" if greater_is_better else "min", keep_missing=False)
        return _options("h2o_llm_studio", None, [best, KeepLast(1)], total_steps)
    if mode in ("disabled", "disable"):
        return _options("h2o_llm_studio", None, [], None, enabled=False)
    raise ConfigError(f"h2o_llm_studio: mode must be 'last', 'best' or 'disabled', got {mode!r}")
