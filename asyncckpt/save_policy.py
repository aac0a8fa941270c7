"""When to save: pure save policies over a :class:`SaveContext` (step, time, last save, metrics).

No I/O and no clock: the scheduler passes ``now``.  Policies compose with ``|``.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError

__all__ = ["SaveContext", "SavePolicy", "EveryNSteps", "EveryNSeconds", "PerEpoch", "AtSteps",
           "Schedule", "Custom", "AnyOf", "Never"]  # fmt: skip


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
