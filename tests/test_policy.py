"""Save and retention policies: pure decisions, tested without files."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asyncckpt import policy
from asyncckpt.errors import ConfigError
from asyncckpt.options import ScheduleOptions, SnapshotOptions
from asyncckpt.policy import (
    AnyOf,
    AtSteps,
    CheckpointRecord,
    Custom,
    EveryNSeconds,
    EveryNSteps,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepEveryNHours,
    KeepLast,
    KeepSteps,
    Never,
    OnImprovement,
    PerEpoch,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
    Schedule,
    axolotl,
    h2o_llm_studio,
    hf_trainer,
    internlm,
    openpi,
    plan_deletions,
)
from asyncckpt.schedule import Scheduler

STEPS = range(1, 101)
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)


def ctx(step: int, now: float = 0.0, metrics: Mapping[str, Any] | None = None) -> SaveContext:
    return SaveContext(step, now, None, None, 0.0, metrics or {})


def saved(p: SavePolicy, steps: Iterable[int] = STEPS) -> list[int]:
    return [s for s in steps if p.should_save(ctx(s))]


def rec(step: int, time: float | None = None, tier: str = "permanent", **metrics: Any) -> CheckpointRecord:
    return CheckpointRecord(step, float(step) if time is None else time, metrics, tier)


def test_every_public_name_exists() -> None:
    assert all(hasattr(policy, n) for n in policy.__all__)
    assert len(set(policy.__all__)) == len(policy.__all__)


# --------------------------------------------------------------------------- save policies


def test_every_n_steps() -> None:
    assert saved(EveryNSteps(10)) == list(range(10, 101, 10))
    assert saved(EveryNSteps(10, offset=5)) == list(range(5, 100, 10))
    assert saved(EveryNSteps(1)) == list(STEPS)
    assert saved(EveryNSteps(30, offset=50)) == [50, 80]
    assert EveryNSteps(10).should_save(ctx(0))  # the formula includes step 0


def test_every_n_seconds_counts_from_the_last_save_or_the_start() -> None:
    p, last, out = EveryNSeconds(30), None, []
    for step in STEPS:  # 7 seconds per step
        c = SaveContext(step, 7.0 * step, None, last, 0.0)
        if p.should_save(c):
            out.append(step)
            last = c.now
    assert out == list(range(5, 101, 5))
    assert EveryNSeconds(30).should_save(SaveContext(1, 130.0, None, None, start_time=100.0))
    assert not EveryNSeconds(30).should_save(SaveContext(1, 129.9, None, None, start_time=100.0))


def test_per_epoch() -> None:
    three = PerEpoch(10, saves_per_epoch=3)
    assert three.positions == {4, 7, 10}  # ceil(10/3), ceil(20/3), 10
    assert saved(three, range(0, 31)) == [4, 7, 10, 14, 17, 20, 24, 27, 30]
    assert saved(PerEpoch(10, saves_per_epoch=2), range(1, 31)) == [5, 10, 15, 20, 25, 30]
    assert saved(PerEpoch(10, saves_per_epoch=1), range(1, 31)) == [10, 20, 30]
    assert saved(PerEpoch(4, saves_per_epoch=10), range(1, 9)) == list(range(1, 9))
    # the issue's case: 15 steps per epoch, 8 saves per epoch used to save at every step
    assert saved(PerEpoch(15, saves_per_epoch=8), range(1, 31)) == [2, 4, 6, 8, 10, 12, 14, 15,
                                                                     17, 19, 21, 23, 25, 27, 29, 30]  # fmt: skip
    assert PerEpoch(10, fraction=0.25).positions == {3, 6, 9, 10}  # 2.5 rounds up
    assert saved(PerEpoch(10, fraction=0.25), range(1, 21)) == [3, 6, 9, 10, 13, 16, 19, 20]
    assert saved(PerEpoch(10, fraction=1.0), STEPS) == list(range(10, 101, 10))
    assert saved(PerEpoch(7, fraction=0.01), range(1, 8)) == list(range(1, 8))


def test_at_steps() -> None:
    assert saved(AtSteps([5, 50, 500, 5])) == [5, 50]
    assert saved(AtSteps(range(0, 101, 40))) == [40, 80]
    assert saved(AtSteps([])) == []


def test_schedule() -> None:
    p = Schedule([(0, 10), (50, 25)])
    assert saved(p) == [10, 20, 30, 40, 50, 75, 100]
    assert saved(Schedule([(5, 10)]), range(0, 40)) == [5, 15, 25, 35]
    assert saved(Schedule([(0, 10), (33, 3)]), range(0, 43)) == [0, 10, 20, 30, 33, 36, 39, 42]


def test_custom_sees_the_context() -> None:
    p = Custom(lambda c: c.metrics.get("loss", 1.0) < 0.5)
    assert p.should_save(ctx(1, metrics={"loss": 0.4}))
    assert not p.should_save(ctx(1, metrics={"loss": 0.6}))
    assert saved(Custom(lambda c: c.step % 45 == 0)) == [45, 90]


def test_any_of_and_the_or_operator() -> None:
    both = EveryNSteps(30) | AtSteps([7])
    assert both == AnyOf(EveryNSteps(30), AtSteps([7]))
    assert saved(both) == [7, 30, 60, 90]
    assert len((both | Never()).policies) == 3  # nested AnyOf flatten
    assert saved(AnyOf(Never())) == []

    class Plain:  # a user's policy without the mixin, on the left of |
        def should_save(self, c: SaveContext) -> bool:
            return c.step == 1

    assert saved(Plain() | EveryNSteps(50)) == [1, 50, 100]
    with pytest.raises(TypeError):
        EveryNSteps(3) | 5  # type: ignore[operator]


def test_never() -> None:
    assert saved(Never(), range(0, 1000)) == []


def test_save_policies_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EveryNSteps(5).n = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Schedule([(0, 5)]).pairs = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EveryNSteps(0), r"EveryNSteps: n must be an int >= 1, got 0"),
        (lambda: EveryNSteps(1.5), r"EveryNSteps: n must be an int >= 1"),
        (lambda: EveryNSteps(True), r"EveryNSteps: n must be an int >= 1, got True"),
        (lambda: EveryNSteps(5, offset=-1), r"EveryNSteps: offset must be an int >= 0"),
        (lambda: EveryNSeconds(0), r"EveryNSeconds: seconds must be a finite number > 0"),
        (lambda: EveryNSeconds(math.inf), r"EveryNSeconds: seconds must be a finite number > 0"),
        (lambda: EveryNSeconds(math.nan), r"EveryNSeconds: seconds"),
        (lambda: EveryNSeconds("60"), r"EveryNSeconds: seconds"),
        (lambda: PerEpoch(10), r"PerEpoch: pass exactly one of saves_per_epoch and fraction"),
        (lambda: PerEpoch(10, 2, 0.5), r"PerEpoch: pass exactly one"),
        (lambda: PerEpoch(0, 2), r"PerEpoch: steps_per_epoch must be an int >= 1"),
        (lambda: PerEpoch(10, 0), r"PerEpoch: saves_per_epoch must be an int >= 1"),
        (lambda: PerEpoch(10, fraction=0.0), r"PerEpoch: fraction must be a finite number > 0"),
        (lambda: PerEpoch(10, fraction=1.5), r"PerEpoch: fraction must be <= 1"),
        (lambda: AtSteps(5), r"AtSteps: steps must be an iterable of ints"),
        (lambda: AtSteps("12"), r"AtSteps: steps must be an iterable of ints"),
        (lambda: AtSteps([3, -1]), r"AtSteps: each step must be an int >= 0, got -1"),
        (lambda: Schedule([]), r"Schedule: pairs is empty"),
        (lambda: Schedule([(0, 0)]), r"Schedule: every must be an int >= 1"),
        (lambda: Schedule([(-1, 5)]), r"Schedule: from_step must be an int >= 0"),
        (lambda: Schedule([(0,)]), r"Schedule: pairs must be int pairs"),
        (lambda: Schedule(5), r"Schedule: pairs must be int pairs"),
        (lambda: Schedule([(10, 5), (10, 3)]), r"Schedule: from_step values must strictly increase"),
        (lambda: Schedule([(20, 5), (10, 3)]), r"strictly increase, got \[20, 10\]"),
        (lambda: Custom(5), r"Custom: fn must be callable"),
        (lambda: AnyOf(), r"AnyOf: pass at least one policy; use Never\(\)"),
        (lambda: AnyOf(EveryNSteps(2), KeepLast(1)), r"AnyOf: .* is not a save policy"),
    ],
)
def test_save_policy_config_errors(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert isinstance(info.value, ValueError)


def _schedule_reference(pairs: list[tuple[int, int]], step: int) -> bool:
    active = [(a, b) for a, b in pairs if a <= step]
    return bool(active) and (step - active[-1][0]) % active[-1][1] == 0


@PROPERTY
@given(
    n=st.integers(1, 50),
    offset=st.integers(0, 50),
    starts=st.lists(st.integers(0, 200), min_size=1, max_size=5, unique=True),
    everies=st.lists(st.integers(1, 30), min_size=5, max_size=5),
    step=st.integers(0, 400),
)
def test_step_policies_match_their_definitions(
    n: int, offset: int, starts: list[int], everies: list[int], step: int
) -> None:
    assert EveryNSteps(n, offset).should_save(ctx(step)) == (step >= offset and (step - offset) % n == 0)
    pairs = list(zip(sorted(starts), everies))
    assert Schedule(pairs).should_save(ctx(step)) == _schedule_reference(pairs, step)
    both = EveryNSteps(n, offset) | Schedule(pairs)
    assert both.should_save(ctx(step)) == (
        EveryNSteps(n, offset).should_save(ctx(step)) or Schedule(pairs).should_save(ctx(step))
    )


@PROPERTY
@given(spe=st.integers(1, 60), per=st.integers(1, 70), epochs=st.integers(1, 4))
def test_per_epoch_saves_exactly_k_times_per_epoch_the_last_at_its_end(
    spe: int, per: int, epochs: int
) -> None:
    p = PerEpoch(spe, saves_per_epoch=per)
    out = saved(p, range(0, spe * epochs + 1))
    k = min(per, spe)
    for e in range(epochs):
        in_epoch = [s - e * spe for s in out if e * spe < s <= (e + 1) * spe]
        assert len(in_epoch) == k and in_epoch[-1] == spe
        gaps = {b - a for a, b in zip([0, *in_epoch], in_epoch)}
        assert gaps <= {spe // k, -(-spe // k)}  # evenly spaced: gaps differ by at most one


def _decisions(policy: SavePolicy, metrics: dict[int, dict[str, Any]]) -> list[int]:
    """The steps the real Scheduler saves for ``policy``, in step order."""
    sched = Scheduler(ScheduleOptions(policy=policy), None)
    try:
        return [s for s in sorted(metrics) if sched.decide(s, metrics[s]) is not None]
    finally:
        sched.close()


LOSSES = {1: 0.9, 2: 0.7, 3: 0.8, 4: 0.7, 5: 0.65, 6: 0.2, 7: 0.3, 8: 0.1}


def test_on_improvement_saves_strict_improvements_the_first_included() -> None:
    seq = {s: {"loss": v} for s, v in LOSSES.items()}
    assert _decisions(OnImprovement("loss"), seq) == [1, 2, 5, 6, 8]  # 4 ties 2: not better
    assert _decisions(OnImprovement("loss", "max"), seq) == [1]
    acc = {s: {"acc": 1 - v} for s, v in LOSSES.items()}
    assert _decisions(OnImprovement("acc", mode="max"), acc) == [1, 2, 5, 6, 8]


def test_on_improvement_min_delta_measures_from_the_best_save() -> None:
    drift = {s: {"loss": 1.0 - 0.04 * s} for s in range(0, 11)}  # 1.00, 0.96, ..., 0.60
    # 0.1 past the best save: 1.00 -> 0.88 (step 3) -> 0.76 (6) -> 0.64 (9); slow drift still saves
    assert _decisions(OnImprovement("loss", min_delta=0.1), drift) == [0, 3, 6, 9]


def test_on_improvement_without_the_metric_never_saves_and_does_not_count() -> None:
    seq: dict[int, dict[str, Any]] = {
        1: {}, 2: {"loss": 0.5}, 3: {"acc": 0.1}, 4: {"loss": float("nan")}, 5: {"loss": "low"},
        6: {"loss": True}, 7: {"loss": 0.6}, 8: {"loss": float("-inf")}, 9: {"loss": 0.4},
    }  # fmt: skip
    assert _decisions(OnImprovement("loss"), seq) == [2, 9]


def test_on_improvement_is_pure_asking_does_not_consume() -> None:
    p = OnImprovement("loss")
    c = SaveContext(5, 0.0, 4, 0.0, 0.0, {"loss": 0.5}, saved_range={"loss": (0.6, 0.9)})
    assert all(p.should_save(c) for _ in range(3))
    assert not p.should_save(dataclasses.replace(c, saved_range={"loss": (0.5, 0.9)}))
    sched = Scheduler(ScheduleOptions(policy=p), None)
    try:
        for _ in range(3):  # should_save asks without side effects
            assert sched.decide(1, {"loss": 0.5}, consume=False) is not None
        assert sched.decide(1, {"loss": 0.5}) is not None  # the real call saves...
        assert sched.decide(2, {"loss": 0.5}) is None  # ...and the next equal value does not
    finally:
        sched.close()


def test_on_improvement_composes_and_counts_every_permanent_save() -> None:
    seq = {s: {"loss": v} for s, v in LOSSES.items()}
    either = EveryNSteps(3) | OnImprovement("loss")
    assert isinstance(either, AnyOf)
    assert _decisions(either, seq) == [1, 2, 3, 5, 6, 8]
    # a periodic save with a better value raises the bar for the improvement policy
    seq2 = {1: {"loss": 0.9}, 2: {"loss": 0.5}, 3: {"loss": 0.3}, 4: {"loss": 0.4}, 5: {"loss": 0.35}}
    assert _decisions(AtSteps([2]) | OnImprovement("loss", min_delta=0.15), seq2) == [1, 2, 3]


def test_hf_trainer_save_strategies() -> None:
    losses = {s: {"eval_loss": LOSSES[s // 10]} for s in range(10, 81, 10)}
    best = hf_trainer(metric_for_best_model="eval_loss", save_strategy="best", save_total_limit=1)
    assert simulate(best, range(10, 81, 10), lambda s: losses[s], close=True) == ([10, 20, 50, 60, 80], [80])
    epoch = hf_trainer(save_strategy="epoch", steps_per_epoch=7, total_steps=20)
    assert simulate(epoch, range(1, 21))[0] == [7, 14, 20]
    frac = hf_trainer(0.125, total_steps=15)
    assert simulate(frac, range(1, 16))[0] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert simulate(hf_trainer(save_strategy="no"), range(1, 21), close=True) == ([], [])
    assert hf_trainer(500.0)["schedule"].policy == EveryNSteps(500)
    # greater_is_better defaults as in HF: by whether the name ends in "loss"
    assert hf_trainer(10, 1, "eval_loss")["keep"][1] == KeepBest(1, "eval_loss", "min", keep_missing=False)
    assert hf_trainer(10, 1, "accuracy")["keep"][1] == KeepBest(1, "accuracy", "max", keep_missing=False)


# --------------------------------------------------------------------------- retention


def test_keep_last() -> None:
    history = [rec(s) for s in range(10, 101, 10)] + [rec(110, tier="snapshot")]
    assert KeepLast(2).keep(history, 0.0) == {90, 100}
    assert KeepLast(50).keep(history, 0.0) == set(range(10, 101, 10))
    assert KeepLast(1).keep(list(reversed(history)), 0.0) == {100}
    assert KeepLast(3).keep([], 0.0) == set()


def test_keep_every() -> None:
    history = [rec(s) for s in range(5, 101, 5)] + [rec(150, tier="snapshot")]
    assert KeepEvery(25).keep(history, 0.0) == {25, 50, 75, 100}
    assert KeepEvery(1).keep(history, 0.0) == set(range(5, 101, 5))


def test_keep_every_n_hours_keeps_the_first_of_each_window_from_the_oldest() -> None:
    t0 = 1_700_000_000.0
    offsets = [0, 1800, 3599, 3600, 5000, 9000, 20000]
    history = [rec(i + 1, t0 + dt) for i, dt in enumerate(offsets)]
    # windows of 3600 s from t0: 0, 0, 0, 1, 1, 2, 5
    assert KeepEveryNHours(1).keep(list(reversed(history)), t0 + 1e6) == {1, 4, 6, 7}
    assert KeepEveryNHours(2).keep(history, 0.0) == {1, 6, 7}  # windows 0,0,0,0,0,1,2
    assert KeepEveryNHours(0.5).keep([rec(9, t0), rec(3, t0)], 0.0) == {3}  # time tie: lower step
    assert KeepEveryNHours(1).keep([rec(2, t0, tier="snapshot")], 0.0) == set()


def test_keep_best() -> None:
    history = [
        rec(10, loss=0.5),
        rec(20, loss=0.2),
        rec(30, loss=0.9),
        rec(40, loss=0.2),  # ties with 20; the newer wins
        rec(50),  # missing
        rec(60, loss=math.nan),
        rec(70, loss="n/a"),
        rec(80, loss=True),
        rec(90, loss=-math.inf),
        rec(95, loss=0.1, tier="snapshot"),
        rec(100, loss=0.3),
    ]
    missing = {50, 60, 70, 80, 90}
    assert KeepBest(1, "loss").keep(history, 0.0) == {40} | missing
    assert KeepBest(2, "loss").keep(history, 0.0) == {20, 40} | missing
    assert KeepBest(3, "loss", keep_missing=False).keep(history, 0.0) == {20, 40, 100}
    assert KeepBest(2, "loss", "max", keep_missing=False).keep(history, 0.0) == {30, 10}
    assert KeepBest(1, "acc", keep_missing=False).keep(history, 0.0) == set()
    assert KeepBest(1, "loss", keep_missing=False).keep([rec(1, loss=3), rec(2, loss=2.5)], 0.0) == {2}


def test_keep_steps_and_keep_all() -> None:
    history = [rec(s) for s in (10, 20, 30)] + [rec(40, tier="snapshot")]
    assert KeepSteps([10, 40, 999]).keep(history, 0.0) == {10}
    assert KeepAll().keep(history, 0.0) == {10, 20, 30}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: KeepLast(0), r"KeepLast: k must be an int >= 1, got 0; use KeepAll\(\)"),
        (lambda: KeepEvery(0), r"KeepEvery: k must be an int >= 1"),
        (lambda: KeepEveryNHours(0), r"KeepEveryNHours: hours must be a finite number > 0"),
        (lambda: KeepEveryNHours(-2.0), r"KeepEveryNHours: hours"),
        (lambda: KeepBest(0, "loss"), r"KeepBest: k must be an int >= 1"),
        (lambda: KeepBest(1, ""), r"KeepBest: metric must be a metric name"),
        (lambda: KeepBest(1, "loss", "minimum"), r"KeepBest: mode must be 'min' or 'max', got 'minimum'"),
        (lambda: KeepSteps([1.5]), r"KeepSteps: each step must be an int >= 0"),
        (lambda: CheckpointRecord(1, 0.0, tier="hot"), r"tier must be 'permanent' or 'snapshot'"),
        (lambda: CheckpointRecord(-1, 0.0), r"CheckpointRecord: step must be an int >= 0"),
        (lambda: plan_deletions([rec(1)], [EveryNSteps(2)], 0.0), r"is not a retention policy"),
    ],
)
def test_retention_config_errors(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_plan_deletions_basics() -> None:
    history = [rec(s) for s in range(10, 101, 10)]
    assert plan_deletions(history, [], 0.0) == []
    assert plan_deletions([], [KeepLast(1)], 0.0) == []
    assert plan_deletions(history, [KeepLast(3)], 0.0) == list(range(10, 71, 10))
    assert plan_deletions(list(reversed(history)), [KeepLast(3)], 0.0) == list(range(10, 71, 10))
    assert plan_deletions(history, [KeepAll()], 0.0) == []
    # policies that keep nothing still leave the newest
    assert plan_deletions(history, [KeepSteps([])], 0.0) == list(range(10, 91, 10))
    got = plan_deletions(history, [KeepLast(1)], 0.0, protected={20, 999}, in_flight=[40, 1000])
    assert got == [10, 30, 50, 60, 70, 80, 90]


def test_plan_deletions_unions_policies() -> None:
    history = [rec(s, loss=abs(s - 30) / 100) for s in range(10, 101, 10)]
    assert plan_deletions(history, [KeepLast(2), KeepBest(1, "loss")], 0.0) == [10, 20, 40, 50, 60, 70, 80]
    got = plan_deletions(history, [KeepLast(1), KeepEvery(40), KeepSteps([10])], 0.0)
    assert got == [20, 30, 50, 60, 70, 90]


def test_plan_deletions_ignores_snapshots() -> None:
    history = [rec(10), rec(20), rec(30, tier="snapshot"), rec(5, tier="snapshot")]
    # the snapshot at 30 is not "the newest": the newest permanent (20) is kept
    assert plan_deletions(history, [KeepSteps([])], 0.0) == [10]
    # a step that is also a snapshot is never returned
    assert plan_deletions([rec(10), rec(10, tier="snapshot"), rec(20)], [KeepSteps([])], 0.0) == []


# --------------------------------------------------------------------------- retention properties

METRIC_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.sampled_from(["n/a", None, True, False, math.nan, math.inf, -math.inf]),
)


@st.composite
def histories(draw: st.DrawFn) -> list[CheckpointRecord]:
    steps = draw(st.lists(st.integers(0, 300), unique=True, max_size=25))
    out = []
    for step in steps:
        metrics = {}
        for name in ("loss", "acc"):
            if draw(st.booleans()):
                metrics[name] = draw(METRIC_VALUES)
        tier = draw(st.sampled_from(["permanent", "permanent", "snapshot"]))
        out.append(CheckpointRecord(step, draw(st.floats(0, 1e6)), metrics, tier))
    return out


RETENTION = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(KeepEvery, st.integers(1, 60)),
    st.builds(KeepEveryNHours, st.floats(0.01, 300.0)),
    st.builds(
        KeepBest,
        st.integers(1, 4),
        st.sampled_from(["loss", "acc"]),
        st.sampled_from(["min", "max"]),
        st.booleans(),
    ),
    st.builds(KeepSteps, st.lists(st.integers(0, 300), max_size=5)),
    st.just(KeepAll()),
)


Scenario = tuple[list[CheckpointRecord], list[RetentionPolicy], set[int], set[int]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    history = draw(histories())
    steps = [r.step for r in history] + [301, 302]  # plus some steps not in history
    protected = set(draw(st.lists(st.sampled_from(steps), max_size=4)))
    in_flight = set(draw(st.lists(st.sampled_from(steps), max_size=3)))
    return history, draw(st.lists(RETENTION, max_size=4)), protected, in_flight


def _plan(s: Scenario, policies: list[RetentionPolicy] | None = None) -> list[int]:
    history, pols, protected, in_flight = s
    return plan_deletions(
        history, pols if policies is None else policies, 1e6, protected=protected, in_flight=in_flight
    )


def _permanent_steps(history: list[CheckpointRecord]) -> set[int]:
    return {r.step for r in history if r.tier == "permanent"}


@PROPERTY
@given(scenarios())
def test_invariants_hold_for_any_history_and_policies(s: Scenario) -> None:
    history, policies, protected, in_flight = s
    doomed = _plan(s)
    assert doomed == sorted(set(doomed))
    permanent = _permanent_steps(history)
    assert set(doomed) <= permanent  # only permanent steps of this history
    assert not set(doomed) & {r.step for r in history if r.tier == "snapshot"}
    assert not set(doomed) & (protected | in_flight)
    if permanent:
        assert max(permanent) not in doomed
    if not policies:
        assert doomed == []
    assert doomed == _plan(s)  # deterministic


def _valid(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@PROPERTY
@given(
    scenarios(),
    st.integers(1, 4),
    st.sampled_from(["loss", "acc"]),
    st.sampled_from(["min", "max"]),
    st.booleans(),
)
def test_the_best_k_survive_any_composition(
    s: Scenario, k: int, metric: str, mode: str, keep_missing: bool
) -> None:
    history, policies, protected, in_flight = s
    permanent = _permanent_steps(history)
    sign = 1 if mode == "min" else -1
    scored = {
        r.step: sign * float(r.metrics[metric])
        for r in history
        if r.tier == "permanent" and _valid(r.metrics.get(metric))
    }

    def beaten(step: int) -> bool:  # at least k strictly better records; ties go to the newer step
        v = scored[step]
        return sum(1 for o, w in scored.items() if w < v or (w == v and o > step)) >= k

    # alone, KeepBest deletes exactly the beaten records (and, unless keep_missing, the unscored)
    expected = {p for p in permanent if (beaten(p) if p in scored else not keep_missing)}
    expected -= protected | in_flight | {max(permanent, default=-1)}
    best = KeepBest(k, metric, mode, keep_missing)
    assert set(_plan(s, [best])) == expected
    # composed with anything, it deletes no more
    assert set(_plan(s, [*policies, best])) <= expected


@PROPERTY
@given(scenarios(), st.integers(1, 6))
def test_keep_last_k_survives_any_composition(s: Scenario, k: int) -> None:
    history, policies, protected, in_flight = s
    newest_first = sorted(_permanent_steps(history), reverse=True)
    assert set(_plan(s, [KeepLast(k)])) == set(newest_first[k:]) - protected - in_flight
    assert not set(_plan(s, [*policies, KeepLast(k)])) & set(newest_first[:k])


@PROPERTY
@given(scenarios(), RETENTION)
def test_adding_a_policy_never_deletes_more(s: Scenario, extra: RetentionPolicy) -> None:
    # (from at least one policy: an empty list means "keep everything")
    assume(s[1])
    assert set(_plan(s, [*s[1], extra])) <= set(_plan(s))


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_history_order_does_not_matter(s: Scenario, rnd: Any) -> None:
    shuffled = list(s[0])
    rnd.shuffle(shuffled)
    assert _plan((shuffled, *s[1:])) == _plan(s)


@PROPERTY
@given(scenarios())
def test_whatever_nothing_keeps_or_spares_is_deleted(s: Scenario) -> None:
    history, policies, protected, in_flight = s
    permanent = _permanent_steps(history)
    if not policies or not permanent:
        return
    kept = set().union(*(p.keep(history, 1e6) for p in policies))
    snapshots = {r.step for r in history if r.tier == "snapshot"}
    loose = permanent - kept - protected - in_flight - snapshots - {max(permanent)}
    assert set(_plan(s)) == loose


# --------------------------------------------------------------------------- presets


def simulate(
    options: dict[str, Any],
    steps: Iterable[int],
    metrics_at: Callable[[int], dict[str, Any]] = lambda step: {},
    close: bool = False,
) -> tuple[list[int], list[int]]:
    """Drive preset options as the checkpointer does: the real Scheduler decides, the step
    commits, then retention applies; ``close=True`` adds what ``close()`` would save.

    Returns (steps saved, steps left at the end).
    """
    sched = Scheduler(options["schedule"], None)
    history: list[CheckpointRecord] = []
    saved_steps: list[int] = []

    def commit(step: int, metrics: dict[str, Any]) -> None:
        nonlocal history
        saved_steps.append(step)
        history.append(CheckpointRecord(step, 1e9 + step, metrics))
        doomed = set(plan_deletions(history, options["keep"], 1e9 + step))
        history = [r for r in history if r.step not in doomed]

    try:
        for step in steps:
            if options["enabled"] and sched.decide(step, metrics_at(step)) is not None:
                commit(step, metrics_at(step))
        final = sched.final_step(None) if close and options["enabled"] else None
        if final is not None:
            commit(*final)
    finally:
        sched.close()
    return saved_steps, sorted(r.step for r in history)


def v_loss(step: int) -> dict[str, Any]:
    return {"loss": abs(step - 30) / 100 + 0.1}


@pytest.mark.parametrize(
    "options",
    [
        hf_trainer(10),
        axolotl(10, 2),
        openpi(10, None, 100),
        internlm(10, 5, 100),
        h2o_llm_studio("last"),
        h2o_llm_studio("disabled"),
    ],
)
def test_presets_return_the_checkpointer_options(options: dict[str, Any]) -> None:
    assert set(options) == {"schedule", "keep", "snapshots", "enabled"}
    assert isinstance(options["schedule"], ScheduleOptions)
    assert options["schedule"].policy is None or isinstance(options["schedule"].policy, SavePolicy)
    assert all(isinstance(p, RetentionPolicy) for p in options["keep"])


def test_hf_trainer_keeps_the_last_n_and_the_best() -> None:
    opts = hf_trainer(save_steps=10, save_total_limit=2, metric_for_best_model="loss")
    saved_steps, left = simulate(opts, STEPS, v_loss)
    assert saved_steps == list(range(10, 101, 10))
    assert left == [30, 90, 100]
    # the final step is saved when total_steps is given
    final = ScheduleOptions(policy=opts["schedule"].policy, total_steps=95)
    saved_steps, left = simulate({**opts, "schedule": final}, range(1, 96), v_loss)
    assert saved_steps[-2:] == [90, 95] and left == [30, 90, 95]


def test_hf_trainer_greater_is_better_and_sparse_metrics() -> None:
    opts = hf_trainer(10, 2, "acc", greater_is_better=True)
    assert simulate(opts, STEPS, lambda s: {"acc": s % 37})[1] == [70, 90, 100]
    # evaluation every 20 steps only: losses at 20 and 40 tie, the newer wins
    sparse = hf_trainer(10, 2, "loss")
    assert simulate(sparse, STEPS, lambda s: v_loss(s) if s % 20 == 0 else {})[1] == [40, 90, 100]


def test_hf_trainer_without_a_limit_keeps_everything() -> None:
    assert simulate(hf_trainer(25, metric_for_best_model="loss"), STEPS, v_loss) == ([25, 50, 75, 100],) * 2


def test_axolotl() -> None:
    """HF's interval over the whole run (see tests/test_presets_tools.py for HF itself)."""
    opts = axolotl(steps_per_epoch=10, saves_per_epoch=3, save_total_limit=2, num_epochs=3)
    saved_steps, left = simulate(opts, range(1, 31))
    assert saved_steps == [4, 8, 12, 16, 20, 24, 28, 30]  # ceil(30 / 9) = 4, and the end
    assert left == [28, 30]
    assert simulate(axolotl(10, 3, 2, total_steps=25, num_epochs=3), range(1, 26)) == (
        [3, 6, 9, 12, 15, 18, 21, 24, 25],  # ceil(25 / 9) = 3
        [24, 25],
    )
    assert simulate(axolotl(10, 1, num_epochs=3), range(1, 31))[1] == [10, 20, 30]
    assert simulate(axolotl(10, 1), range(1, 11))[0] == [10]  # fraction 1.0: HF's epoch strategy


def test_openpi() -> None:
    saved_steps, left = simulate(openpi(save_interval=10, keep_period=30, total_steps=100), STEPS)
    assert saved_steps == list(range(10, 101, 10))
    assert left == [30, 60, 90, 100]
    assert simulate(openpi(10, 30, 95), range(1, 96))[1] == [30, 60, 90, 95]
    assert simulate(openpi(10, None, 100), STEPS)[1] == [100]


def test_internlm() -> None:
    opts = internlm(checkpoint_every=25, snapshot_every=5, total_steps=60)
    assert opts["snapshots"] == SnapshotOptions(every=5, slots=2)
    assert simulate(opts, range(1, 61)) == ([25, 50, 60], [25, 50, 60])
    assert internlm(25, None, 60)["snapshots"] is None


def test_h2o_llm_studio() -> None:
    epochs = range(10, 51, 10)  # the trainer saves after each evaluation
    losses = {10: 0.5, 20: 0.3, 30: 0.4, 40: 0.35, 50: 0.45}
    assert simulate(h2o_llm_studio("last", total_steps=50), epochs) == (list(epochs), [50])
    assert simulate(h2o_llm_studio("each_evaluation_epoch"), epochs) == (list(epochs),) * 2
    best = h2o_llm_studio("best")  # saves only improvements, so the newest is the best
    assert simulate(best, epochs, lambda s: {"loss": losses[s]}, close=True) == ([10, 20], [20])
    acc = h2o_llm_studio("best", metric="acc", greater_is_better=True)
    assert simulate(acc, epochs, lambda s: {"acc": losses[s]}, close=True) == ([10], [10])
    for spelling in ("disabled", "disable"):
        off = h2o_llm_studio(spelling)
        assert off["enabled"] is False and off["keep"] == []
        assert simulate(off, epochs) == ([], [])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: hf_trainer(0), r"hf_trainer: save_steps must be an int >= 1"),
        (lambda: hf_trainer(10, 0), r"hf_trainer: save_total_limit must be an int >= 1.*use None"),
        (lambda: hf_trainer(10, total_steps=0), r"hf_trainer: total_steps must be an int >= 1"),
        (lambda: hf_trainer(10, 2, "loss", total_steps=True), r"hf_trainer: total_steps must be an int >= 1"),
        (lambda: axolotl(10, 0), r"axolotl: saves_per_epoch must be an int >= 1"),
        (lambda: axolotl(0, 2), r"axolotl: steps_per_epoch must be an int >= 1"),
        (lambda: axolotl(10, 2, num_epochs=0), r"axolotl: num_epochs must be a finite number > 0"),
        (lambda: hf_trainer(0.5), r"hf_trainer: save_steps=0.5 is a fraction of the run; pass total_steps"),
        (lambda: hf_trainer(save_strategy="epoch"), r"hf_trainer: steps_per_epoch must be an int >= 1"),
        (lambda: hf_trainer(save_strategy="best"), r"hf_trainer: save_strategy='best' needs metric_for"),
        (lambda: hf_trainer(save_strategy="often"), r"hf_trainer: save_strategy must be 'steps', 'epoch'"),
        (lambda: OnImprovement("loss", "lower"), r"OnImprovement: mode must be 'min' or 'max'"),
        (
            lambda: OnImprovement("loss", min_delta=-1),
            r"OnImprovement: min_delta must be a finite number >= 0",
        ),
        (lambda: axolotl(10, 2, -1), r"axolotl: save_total_limit"),
        (lambda: openpi(0, None, 100), r"openpi: save_interval must be an int >= 1"),
        (lambda: openpi(10, 0, 100), r"openpi: keep_period must be an int >= 1"),
        (lambda: openpi(10, 30, None), r"openpi: total_steps must be an int >= 1"),
        (lambda: internlm(0, None, 100), r"internlm: checkpoint_every"),
        (lambda: internlm(10, 0, 100), r"internlm: snapshot_every must be an int >= 1"),
        (lambda: internlm(10, 5, 0), r"internlm: total_steps"),
        (
            lambda: h2o_llm_studio("sometimes"),
            r"h2o_llm_studio: mode must be 'last', 'each_evaluation_epoch', 'best'",
        ),
        (lambda: h2o_llm_studio("best", metric=""), r"OnImprovement: metric must be a metric name"),
    ],
)
def test_preset_config_errors(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()
