"""Save and retention policies end to end: exact steps left on disk, modes, tiers, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from asyncckpt import AsyncCheckpointer, ConfigError, StateMismatchError, list_checkpoints, resume
from asyncckpt.policy import (
    EveryNSteps,
    KeepBest,
    KeepLast,
    axolotl,
    h2o_llm_studio,
    hf_trainer,
    internlm,
    openpi,
)

from .helpers import FaultyStorage, assert_same, snapshot, tiny_model, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state() -> dict:
    return {"w": torch.zeros(64), "extra": {"step": 0}}


def _steps(root: str, tier: str | None = "permanent") -> list[int]:
    return [c.step for c in list_checkpoints(root) if tier is None or c.tier == tier]


def _train(ck: AsyncCheckpointer, state: dict, steps, loss=lambda s: 1.0 / s) -> None:
    for step in steps:
        state["w"].add_(1)
        state["extra"]["step"] = step
        ck.save_async(step, metrics={"loss": loss(step)})


def test_hf_save_steps_total_limit_and_best_model(root: str) -> None:
    losses = {s: (0.1 if s == 30 else 1.0 + s / 100) for s in range(1, 101)}  # step 30 is the best
    state = _state()
    with AsyncCheckpointer(
        root, state, **hf_trainer(save_steps=10, save_total_limit=2, metric_for_best_model="loss")
    ) as ck:
        _train(ck, state, range(1, 101), loss=lambda s: losses[s])
    assert _steps(root) == [30, 90, 100]  # best survives the limit ("save_total_limit deleted my best")


def test_hf_save_steps_only(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, **hf_trainer(save_steps=25)) as ck:
        _train(ck, state, range(1, 61))
    assert _steps(root) == [25, 50, 60]  # 60 is the final step, saved at close


def test_axolotl_saves_per_epoch_with_total_limit(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(
        root, state, **axolotl(steps_per_epoch=10, saves_per_epoch=2, save_total_limit=3)
    ) as ck:
        _train(ck, state, range(1, 31))
    assert _steps(root) == [20, 25, 30]


def test_openpi_interval_keep_period_and_final(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, **openpi(save_interval=10, keep_period=40, total_steps=95)) as ck:
        _train(ck, state, range(1, 96))
    assert _steps(root) == [40, 80, 95]


def test_internlm_checkpoints_two_snapshot_slots_and_final(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(
        root, state, **internlm(checkpoint_every=20, snapshot_every=5, total_steps=47)
    ) as ck:
        _train(ck, state, range(1, 48))
    assert _steps(root) == [20, 40, 47]
    assert _steps(root, "snapshot") == [35, 45]  # two rolling slots
    # resume takes the newest across tiers: the final permanent step 47
    fresh = _state()
    assert resume(root, fresh) == 47
    assert fresh["extra"]["step"] == 47


def test_resume_prefers_a_newer_snapshot(root: str) -> None:
    state = _state()
    ck = AsyncCheckpointer(root, state, save_policy=20, snapshot_every=5, save_final=False)
    _train(ck, state, range(1, 28))  # w counts the steps; the newest snapshot is 25
    ck.close()
    assert _steps(root) == [20] and _steps(root, "snapshot") == [15, 25]
    fresh = _state()
    assert resume(root, fresh) == 25
    assert fresh["extra"]["step"] == 25
    assert torch.equal(fresh["w"], torch.full((64,), 25.0))


def test_h2o_best_keeps_only_the_best(root: str) -> None:
    """As H2O: saves only improvements (1, 2), so the newest kept is the best; close() adds
    nothing."""
    state = _state()
    losses = [0.9, 0.5, 0.7, 0.6, 0.8]
    with AsyncCheckpointer(root, state, **h2o_llm_studio("best")) as ck:
        _train(ck, state, range(1, 6), loss=lambda s: losses[s - 1])
    assert _steps(root) == [2]


def test_h2o_disabled_writes_nothing_and_starts_nothing(root: str) -> None:
    before = threading.active_count()
    state = _state()
    ck = AsyncCheckpointer(root, state, **h2o_llm_studio("disabled"))
    assert threading.active_count() == before
    assert ck.save_async(1) is None and ck.resume() is None and not ck.should_save(1)
    ck.close()
    assert not os.path.exists(root)


def test_final_only_saves_just_the_last_step(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, mode="final_only") as ck:
        _train(ck, state, range(1, 11))
        assert ck.should_save(5) is False
    assert _steps(root) == [10]
    fresh = _state()
    resume(root, fresh)
    assert fresh["extra"]["step"] == 10


def test_close_final_step_and_total_steps_force_off_interval_saves(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, save_policy=10, total_steps=23, save_final=False) as ck:
        _train(ck, state, range(1, 24))
    assert _steps(root) == [10, 20, 23]
    ck2 = AsyncCheckpointer(root + "2", state, save_policy=10, save_final=False)
    _train(ck2, state, range(1, 16))
    ck2.close(final_step=15)
    assert _steps(root + "2") == [10, 15]


def test_failed_training_does_not_save_its_last_state(root: str) -> None:
    state = _state()
    with pytest.raises(RuntimeError, match="boom"):
        with AsyncCheckpointer(root, state, save_policy=10) as ck:
            _train(ck, state, range(1, 15))
            raise RuntimeError("boom")
    assert _steps(root) == [10]


def test_keep_best_with_missing_metric_kept_or_not(root: str) -> None:
    for keep_missing, expected in ((True, [1, 2, 3, 4]), (False, [2, 4])):
        r = f"{root}-{keep_missing}"
        state = _state()
        with AsyncCheckpointer(
            r, state, keep=[KeepBest(1, "acc", mode="max", keep_missing=keep_missing)]
        ) as ck:
            ck.save_async(1)  # no metric
            ck.save_async(2, metrics={"acc": 0.9})
            ck.save_async(3)  # no metric
            ck.save_async(4, metrics={"acc": 0.5})
        assert _steps(r) == expected


def test_protect_survives_retention_across_runs(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, keep=2) as ck:
        _train(ck, state, range(1, 4))
        ck.protect(2)
        _train(ck, state, range(4, 7))
    assert _steps(root) == [2, 5, 6]
    with AsyncCheckpointer(root, state, keep=1) as ck:  # a new run honours the protection
        _train(ck, state, range(7, 9))
    assert _steps(root) == [2, 8]


def test_newest_and_inflight_are_never_deleted(root: str) -> None:
    gate = threading.Event()
    state = _state()
    ck = AsyncCheckpointer(root, state, keep=1, max_inflight=3, storage=FaultyStorage(block=gate))
    hs = [ck.save_async(s) for s in (1, 2, 3)]
    gate.set()
    for h in hs:
        h.result()
    ck.close()
    assert _steps(root) == [3]


def test_failed_delete_is_retried_and_never_fails_training(root: str, caplog) -> None:
    class FlakyDeletes(FaultyStorage):
        def __init__(self) -> None:
            super().__init__()
            self.failures = 1

        def rename_dir(self, src: str, dst: str) -> None:
            if "/.tmp/" in dst and self.failures:  # the decommit of a retention delete
                self.failures -= 1
                raise OSError(13, "injected permission error")
            super().rename_dir(src, dst)

    state = _state()
    with AsyncCheckpointer(root, state, keep=1, storage=FlakyDeletes()) as ck:
        ck.save_async(1).result()
        ck.save_async(2).result()  # deleting 1 fails: logged, not raised
        assert _steps(root) == [1, 2]
        ck.save_async(3).result()  # retried
    assert _steps(root) == [3]
    assert any("will retry" in r.getMessage() for r in caplog.records)


def test_retention_only_touches_checkpoints_it_owns(root: str) -> None:
    os.makedirs(os.path.join(root, "step_000000001"))  # no manifest: not ours to delete
    os.makedirs(os.path.join(root, "notes"))
    state = _state()
    with AsyncCheckpointer(root, state, keep=1) as ck:
        _train(ck, state, range(2, 6))
    assert _steps(root) == [5]
    assert os.path.isdir(os.path.join(root, "step_000000001")) and os.path.isdir(os.path.join(root, "notes"))


def test_model_only_and_exclude_then_resume_restores_exactly_the_selection(root: str) -> None:
    model = tiny_model(0)
    opt = torch.optim.Adam(model.parameters())
    train_steps(model, opt, 2)
    state = {"model": model, "optim": opt, "extra": {"epoch": 2}}
    with AsyncCheckpointer(root, state, model_only=True) as ck:
        info = ck.save_async(1).result()
    assert info.bytes < 40_000
    m2 = tiny_model(1)
    state2 = {"model": m2, "optim": torch.optim.Adam(m2.parameters()), "extra": {"epoch": 0}}
    opt_before = snapshot(state2["optim"])
    with pytest.raises(StateMismatchError, match="required 'optim' is not in this checkpoint"):
        resume(root, state2, require=["optim"])  # a full resume was asked for: refused, untouched
    assert_same(snapshot(m2), snapshot(tiny_model(1)))
    assert resume(root, state2) == 1  # weights only: restores the weights, leaves the rest
    assert_same(snapshot(m2), snapshot(model))
    assert_same(snapshot(state2["optim"]), opt_before)
    assert state2["extra"]["epoch"] == 0  # not saved, left alone

    with AsyncCheckpointer(root + "x", state, exclude=["optim"]) as ck:
        ck.save_async(1).result()
    state3 = {"model": tiny_model(2), "extra": {"epoch": 0}}
    assert resume(root + "x", state3) == 1
    assert state3["extra"]["epoch"] == 2


def test_save_dtype_casts_the_saved_copy_only(root: str) -> None:
    model = torch.nn.Linear(256, 256)
    before = snapshot(model)
    with AsyncCheckpointer(root, {"model": model}, save_dtype=torch.bfloat16) as ck:
        info = ck.save_async(1).result()
    with AsyncCheckpointer(root + "32", {"model": model}) as ck:
        full = ck.save_async(1).result()
    assert_same(snapshot(model), before)  # live state untouched
    raw32 = sum(t.numel() * 4 for t in before.values())
    assert full.bytes - info.bytes >= raw32 // 2 - 64  # the tensor bytes halved
    m2 = torch.nn.Linear(256, 256)
    resume(root, {"model": m2})
    for k, v in snapshot(m2).items():
        assert v.dtype == torch.float32
        assert torch.equal(v, before[k].to(torch.bfloat16).to(torch.float32)), k


def test_trigger_file_requests_a_save(root: str, tmp_path) -> None:
    trigger = tmp_path / "SAVE_NOW"
    state = _state()
    with AsyncCheckpointer(root, state, save_policy=100, trigger_file=str(trigger), save_final=False) as ck:
        _train(ck, state, range(1, 5))
        trigger.write_text("")
        _train(ck, state, range(5, 8))
    assert _steps(root) == [5]
    assert not trigger.exists()


_SIGNAL_CHILD = """
    import os, signal, sys, time, torch
    from asyncckpt import AsyncCheckpointer
    state = {"w": torch.zeros(8), "extra": {"step": 0}}
    ck = AsyncCheckpointer(sys.argv[1], state, save_policy=1000, save_on_signal=[signal.SIGUSR1, signal.SIGTERM], save_final=False)
    step = 0
    while ck.signal_received is None or step < 3:
        step += 1
        state["extra"]["step"] = step
        ck.save_async(step)
        if step == 3:
            print("READY", flush=True)
        time.sleep(0.01)
    # preempted: one more step boundary saves, then leave cleanly
    step += 1
    ck.save_async(step)
    ck.close()
    print("EXIT", ck.signal_received, step, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_at_next_step_in_a_real_process(root: str, sig: int) -> None:
    env = dict(os.environ, PYTHONPATH=REPO)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_CHILD), root],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    child.send_signal(sig)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    _, got_sig, last = out.split()
    assert int(got_sig) == sig
    steps = _steps(root)
    assert len(steps) == 1 and 3 <= steps[0] <= int(last)  # exactly one save, after the signal


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"save_policy": "often"}, "save_policy"),
        ({"keep": ["last 3"]}, "keep"),
        ({"keep": 0}, "KeepLast"),
        ({"mode": "off"}, "mode"),
        ({"total_steps": -1}, "total_steps"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"snapshot_slots": 0}, "snapshot_slots"),
        ({"include": "model"}, "include"),
        ({"save_dtype": torch.int8}, "save_dtype"),
        ({"model_only": True}, "nn.Module"),
    ],
)
def test_policy_options_are_validated_at_construction(root: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncCheckpointer(root, _state(), **kwargs)
    assert not os.path.exists(os.path.join(root, ".tmp"))


def test_policy_objects_validate_their_arguments() -> None:
    with pytest.raises(ConfigError, match="EveryNSteps"):
        EveryNSteps(0)
    with pytest.raises(ConfigError, match="mode"):
        KeepBest(1, "loss", mode="median")


def test_policies_work_on_the_process_executor(root: str) -> None:
    state = _state()
    with AsyncCheckpointer(
        root, state, executor="process", save_policy=10, keep=[KeepLast(2)], snapshot_every=5
    ) as ck:
        _train(ck, state, range(1, 36))
    assert _steps(root) == [30, 35] and _steps(root, "snapshot") == [25, 35]
