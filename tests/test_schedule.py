"""schedule.py: skip, permanent or snapshot per step; triggers; the final step; metrics."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from asyncckpt.layout import Kind
from asyncckpt.options import ScheduleOptions, SnapshotOptions
from asyncckpt.policy import EveryNSeconds, EveryNSteps, Never
from asyncckpt.schedule import Scheduler, encode_metrics

P, S = Kind.PERMANENT, Kind.SNAPSHOT


@pytest.fixture
def schedulers():
    made: list[Scheduler] = []

    def make(opts: ScheduleOptions, snapshots: SnapshotOptions | None = None) -> Scheduler:
        s = Scheduler(opts, snapshots)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_every_5_with_snapshots_every_2_and_total_12(schedulers):
    sched = schedulers(ScheduleOptions(policy=EveryNSteps(5), total_steps=12), SnapshotOptions(every=2))
    kinds = [sched.decide(step, {}) for step in range(1, 13)]
    assert kinds == [None, S, None, S, P, S, None, S, None, P, None, P]


def test_no_policy_saves_every_call(schedulers):
    sched = schedulers(ScheduleOptions())
    assert [sched.decide(s, {}) for s in range(1, 4)] == [P, P, P]


def test_never_saves_only_total_steps_and_forced(schedulers):
    sched = schedulers(ScheduleOptions(policy=Never(), total_steps=4), SnapshotOptions(every=3))
    assert [sched.decide(s, {}) for s in range(1, 5)] == [None, None, S, P]
    assert sched.decide(5, {}, force=True) is P


def test_consume_false_has_no_side_effects(schedulers, tmp_path):
    trigger = tmp_path / "save-now"
    trigger.touch()
    sched = schedulers(ScheduleOptions(policy=Never(), trigger_file=str(trigger)))
    for _ in range(3):
        assert sched.decide(7, {"loss": 1.0}, consume=False) is None
    assert trigger.exists()  # a pending trigger stays pending
    assert sched.final_step(None) is None  # nothing was remembered
    assert sched.decide(7, {}) is P  # the real call consumes it
    assert not trigger.exists()
    assert sched.decide(8, {}) is None


def test_consume_false_does_not_count_as_the_last_save(schedulers):
    sched = schedulers(ScheduleOptions(policy=EveryNSeconds(3600)))
    # the first save is due an hour after the start; asking never resets the clock
    assert sched.decide(1, {}, consume=False) is None
    assert sched.decide(1, {}, force=True) is P
    assert sched.decide(2, {}, consume=False) is None
    assert sched.final_step(None) is None  # step 1 was saved; step 2 was only asked about


def test_signal_requests_a_save_at_the_next_decide(schedulers):
    sched = schedulers(ScheduleOptions(policy=Never(), on_signal=[signal.SIGUSR1]))
    assert sched.signal_received is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert sched.signal_received == signal.SIGUSR1
    assert sched.decide(3, {}, consume=False) is None  # asking leaves it pending
    assert sched.decide(3, {}) is P
    assert sched.decide(4, {}) is None  # consumed once


def test_close_restores_the_previous_signal_handler():
    previous = signal.getsignal(signal.SIGUSR2)
    sched = Scheduler(ScheduleOptions(on_signal=[signal.SIGUSR2]), None)
    assert signal.getsignal(signal.SIGUSR2) is not previous
    sched.close()
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_final_step_the_last_skipped_step(schedulers):
    sched = schedulers(ScheduleOptions(policy=EveryNSteps(5)))
    assert sched.final_step(None) is None  # no save_async call yet
    for step in range(1, 8):
        sched.decide(step, {"loss": float(step)})
    assert sched.final_step(None) == (7, {"loss": 7.0})
    sched.decide(10, {"loss": 0.1})  # saved by the policy: nothing left to save
    assert sched.final_step(None) is None


def test_final_step_after_a_snapshot_is_still_due(schedulers):
    sched = schedulers(ScheduleOptions(policy=EveryNSteps(5)), SnapshotOptions(every=2))
    assert sched.decide(4, {"a": 1}) is S
    assert sched.final_step(None) == (4, {"a": 1})  # a snapshot is not a permanent save


def test_final_step_explicit(schedulers):
    sched = schedulers(ScheduleOptions(policy=EveryNSteps(5), final=False))
    assert sched.final_step(9) == (9, {})
    sched.decide(9, {"loss": 2.5})
    assert sched.final_step(9) == (9, {"loss": 2.5})  # metrics of that very step
    assert sched.final_step(12) == (12, {})  # not the last seen step: no metrics
    sched.decide(10, {"loss": 1.0})
    assert sched.final_step(10) == (10, {"loss": 1.0})  # explicit wins even if already saved


def test_final_false_saves_no_skipped_step(schedulers):
    sched = schedulers(ScheduleOptions(policy=EveryNSteps(5), final=False))
    for step in range(1, 8):
        sched.decide(step, {})
    assert sched.final_step(None) is None


def test_int_policy_is_every_n_steps(schedulers):
    sched = schedulers(ScheduleOptions(policy=3))
    assert [sched.decide(s, {}) for s in range(1, 7)] == [None, None, P, None, None, P]


# --------------------------------------------------------------------------- metrics


def test_encode_metrics_accepts_plain_values_and_one_element_tensors():
    metrics = {
        "loss": torch.tensor(1.5),
        "acc": torch.tensor([0.25]),
        "step": torch.tensor(3),
        "lr": 1e-3,
        "name": "run7",
        "ok": True,
        "none": None,
        "nested": {"a": [1, 2.5]},
    }
    out = encode_metrics(metrics)
    assert out == {
        "loss": 1.5,
        "acc": 0.25,
        "step": 3,
        "lr": 1e-3,
        "name": "run7",
        "ok": True,
        "none": None,
        "nested": {"a": [1, 2.5]},
    }
    assert type(out["loss"]) is float and type(out["step"]) is int
    assert out is not metrics and isinstance(metrics["loss"], torch.Tensor)  # a copy
    assert encode_metrics(None) == {} and encode_metrics({}) == {}
    assert math.isnan(encode_metrics({"x": float("nan")})["x"])  # the manifest allows NaN


@pytest.mark.parametrize(
    "bad",
    [
        {"t": torch.zeros(2)},
        {"o": object()},
        {"s": {1, 2}},
        {"b": b"bytes"},
        {"n": {"deep": object()}},
        {"ok": 1.0, "t": torch.ones(3)},
    ],
)
def test_encode_metrics_rejects_non_json_values(bad):
    with pytest.raises(TypeError, match="is not a JSON value"):
        encode_metrics(bad)


@pytest.mark.parametrize("key", [1, None, ("a",), b"loss"])
def test_encode_metrics_rejects_non_str_keys(key):
    with pytest.raises(TypeError, match="must be a str"):
        encode_metrics({key: 1.0})


@pytest.mark.parametrize("bad", [[("loss", 1.0)], "loss=1", 1.0])
def test_encode_metrics_rejects_non_dicts(bad):
    with pytest.raises(TypeError, match="must be a dict"):
        encode_metrics(bad)
