"""When to save: pure save policies over a :class:`SaveContext` (step, time, last save, metrics).

No I/O and no clock: the scheduler passes ``now``.  Policies compose with ``|``.
"""

from __future__ import annotations

import bisect
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError

__all__ = ["SaveContext", "SavePolicy", "EveryNSteps", "EveryNSeconds", "PerEpoch", "AtSteps",
           "Schedule", "OnImprovement", "Custom", "AnyOf", "Never", "metric_number"]  # fmt: skip


def check_int(owner: str, name: str, value: Any, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}; {fix}")
    return value


def check_positive(owner: str, name: str, value: Any, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ConfigError(f"{owner}: {name} must be a finite number > 0, got {value!r}; {fix}")
    return float(value)


def check_steps(owner: str, steps: Iterable[int]) -> frozenset[int]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ConfigError(f"{owner}: steps must be an iterable of ints, got {steps!r}; e.g. [100, 500]")
    return frozenset(
        check_int(owner, "each step", s, 0, "steps are counts of completed updates") for s in steps
    )


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
        saved_range: for each numeric metric, the ``(lowest, highest)`` finite value passed with
            an earlier permanent save of this checkpointer (see :func:`metric_number`); empty
            before the first.  :class:`OnImprovement` compares against it.
    """

    step: int
    now: float
    last_saved_step: int | None
    last_saved_time: float | None
    start_time: float
    metrics: Mapping[str, Any] = field(default_factory=dict)
    saved_range: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def metric_number(value: Any) -> float | None:
    """A metric value as a finite float, or None (absent, not a number, a bool, NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


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
        check_int(
            "EveryNSteps", "n", self.n, 1, "pass the number of steps between saves, e.g. EveryNSteps(500)"
        )
        check_int("EveryNSteps", "offset", self.offset, 0, "pass the first step to save, or 0")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step >= self.offset and (ctx.step - self.offset) % self.n == 0


@dataclass(frozen=True)
class EveryNSeconds(_Composable):
    """Saves once ``seconds`` have passed since the last save (or since the start)."""

    seconds: float

    def __post_init__(self) -> None:
        check_positive(
            "EveryNSeconds", "seconds", self.seconds, "e.g. EveryNSeconds(1800) saves every 30 min"
        )

    def should_save(self, ctx: SaveContext) -> bool:
        since = ctx.last_saved_time if ctx.last_saved_time is not None else ctx.start_time
        return ctx.now - since >= self.seconds


@dataclass(frozen=True)
class PerEpoch(_Composable):
    """Saves ``saves_per_epoch`` evenly spaced times in each epoch, the last at the epoch's end.

    Epoch ``e`` (1-based) ends at step ``e * steps_per_epoch``; a step's position in its epoch is
    ``p = (step - 1) % steps_per_epoch + 1``.  With ``k = min(saves_per_epoch, steps_per_epoch)``
    the saves sit at ``p = ceil(i * steps_per_epoch / k)`` for ``i = 1..k``: exactly ``k`` per
    epoch, whatever ``steps_per_epoch`` is.  Example: 15 steps per epoch, 8 saves per epoch:
    steps 2, 4, 6, 8, 10, 12, 14, 15, then 17, ..., 30.

    With ``fraction`` the spacing is ``max(1, round(fraction * steps_per_epoch))`` steps (halves
    round up), restarting each epoch, plus every epoch end: 10 steps per epoch, fraction 0.25:
    steps 3, 6, 9, 10, 13, ..., 19, 20.  Step 0 never saves.

    This is not Axolotl's ``saves_per_epoch`` (HF Trainer places those saves over the whole run,
    not per epoch): the ``axolotl`` preset mirrors that exactly.

    Args:
        steps_per_epoch: optimizer steps in one epoch.
        saves_per_epoch: how many evenly spaced saves per epoch.
        fraction: alternatively, the spacing as a fraction of an epoch (0.25 = every quarter).
    """

    steps_per_epoch: int
    saves_per_epoch: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        check_int("PerEpoch", "steps_per_epoch", self.steps_per_epoch, 1, "pass len(train_dataloader)")
        if (self.saves_per_epoch is None) == (self.fraction is None):
            raise ConfigError(
                "PerEpoch: pass exactly one of saves_per_epoch and fraction, got "
                f"saves_per_epoch={self.saves_per_epoch!r}, fraction={self.fraction!r}; "
                "e.g. PerEpoch(1000, saves_per_epoch=4) or PerEpoch(1000, fraction=0.25)"
            )
        if self.saves_per_epoch is not None:
            check_int(
                "PerEpoch", "saves_per_epoch", self.saves_per_epoch, 1, "use 1 to save at epoch ends only"
            )
        elif check_positive("PerEpoch", "fraction", self.fraction, "e.g. 0.25 saves every quarter") > 1:
            raise ConfigError(f"PerEpoch: fraction must be <= 1, got {self.fraction!r}; 1.0 = epoch ends")

    @functools.cached_property
    def positions(self) -> frozenset[int]:
        """The positions ``p`` (1..steps_per_epoch) within every epoch that save."""
        n = self.steps_per_epoch
        if self.saves_per_epoch is not None:
            k = min(self.saves_per_epoch, n)
            return frozenset(-(-i * n // k) for i in range(1, k + 1))  # ceil(i * n / k), exact
        interval = max(1, math.floor(float(self.fraction or 1.0) * n + 0.5))
        return frozenset([*range(interval, n + 1, interval), n])

    def should_save(self, ctx: SaveContext) -> bool:
        if ctx.step < 1:
            return False
        return (ctx.step - 1) % self.steps_per_epoch + 1 in self.positions


@dataclass(frozen=True, init=False)
class AtSteps(_Composable):
    """Saves at exactly the listed steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        object.__setattr__(self, "steps", check_steps("AtSteps", steps))

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
                (check_int("Schedule", "from_step", a, 0, fix), check_int("Schedule", "every", b, 1, fix))
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
class OnImprovement(_Composable):
    """Saves when ``metric`` beats every earlier permanent save's value (HF ``save_strategy="best"``).

    A step saves when its metric, a finite number, is lower (``mode="min"``) or higher
    (``mode="max"``) than the best value passed with any earlier permanent save of this
    checkpointer by more than ``min_delta``; the first value seen always saves.  A step without
    the metric (or with a non-number, NaN or inf) never saves, and is not counted.

    With ``min_delta=0`` this is exactly HF Trainer's ``save_strategy="best"`` (strictly better
    than the best so far, the first evaluation counts as an improvement): every improvement is
    saved, so the best save *is* the best value seen.  With ``min_delta > 0`` a run of small
    improvements saves once their sum exceeds ``min_delta`` (the reference is the last save,
    as with Keras' and Lightning's ``min_delta``).  Saves made for other reasons (a composed
    policy, ``force=True``, ``total_steps``) count as well: it saves only checkpoints that
    would be better than every one saved so far.

    Pure: the best so far comes from ``ctx.saved_range``, which the checkpointer keeps; asking
    with ``should_save`` does not consume an improvement.  The range starts empty in each
    checkpointer, so after a restart the first evaluation saves.

    Args:
        metric: the key in the ``metrics`` passed to ``save_async``, e.g. ``"eval_loss"``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: the margin an improvement must exceed, >= 0.
    """

    metric: str
    mode: str = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(
                f"OnImprovement: metric must be a metric name, got {self.metric!r}; e.g. 'eval_loss'"
            )
        if self.mode not in ("min", "max"):
            raise ConfigError(f"OnImprovement: mode must be 'min' or 'max', got {self.mode!r}")
        delta = self.min_delta
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 <= float(delta) < math.inf:
            raise ConfigError(
                f"OnImprovement: min_delta must be a finite number >= 0, got {delta!r}; e.g. 0.0"
            )

    def should_save(self, ctx: SaveContext) -> bool:
        value = metric_number(ctx.metrics.get(self.metric))
        if value is None:
            return False
        best = ctx.saved_range.get(self.metric)
        if best is None:
            return True
        if self.mode == "min":
            return value < best[0] - self.min_delta
        return value > best[1] + self.min_delta


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
