"""Behaviour of AsyncCheckpointer: snapshots, errors, commit order, draining, bad input."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

import asyncckpt
from asyncckpt import (
    AsyncCheckpointer,
    ConfigError,
    StepExistsError,
    WriteError,
    list_checkpoints,
    resume,
)

from .helpers import FaultyStorage, assert_same, snapshot, tiny_model, train_steps


def _state(n: int = 4, size: int = 257) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": {f"t{i}": torch.randn(size, generator=g) for i in range(n)},
        "i": torch.zeros(3, dtype=torch.int64),
    }


@pytest.mark.parametrize("overlap", [False, True])
def test_mutation_after_save_never_reaches_the_checkpoint(root: str, overlap: bool, executor: str) -> None:
    """Mutate every tensor right after save_async returns (after wait_staged with overlap)."""
    state = _state()
    expected = {}
    with AsyncCheckpointer(root, state, max_inflight=2, overlap=overlap, executor=executor) as ck:
        for step in range(200):
            ck.save_async(step)
            expected[step] = snapshot(state)  # nothing has changed since the call returned
            if overlap:
                ck.wait_staged()
            for t in asyncckpt.state.flatten_state(state).tensors.values():
                t.add_(1)
    assert [c.step for c in list_checkpoints(root)] == list(range(200))
    for step in range(0, 200, 7):
        fresh = _state()
        assert resume(root, fresh, step=step) == step
        assert_same(snapshot(fresh), expected[step])


def test_overlap_optimizer_hook_protects_the_snapshot(root: str, executor: str) -> None:
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = {"model": model}
    with AsyncCheckpointer(root, state, overlap=True, executor=executor) as ck:
        for step in range(20):
            train_steps(model, opt, 0)
            model(torch.randn(4, 8)).sum().backward()
            ck.save_async(step)
            before = snapshot(model)
            opt.step()  # the pre-hook waits for the copy; no wait_staged() here
            opt.zero_grad()
            ck.wait()
            fresh = {"model": tiny_model(1)}
            resume(root, fresh, step=step)
            assert_same(snapshot(fresh["model"]), before)


def test_writer_fault_surfaces_and_previous_checkpoint_survives(root: str) -> None:
    state = _state()
    good = AsyncCheckpointer(root, state)
    good.save_async(1).result()
    good.close()
    before = snapshot(state)
    for t in state["w"].values():
        t.mul_(3)
    storage = FaultyStorage(fail_after_bytes=3000)
    ck = AsyncCheckpointer(root, state, storage=storage)
    h = ck.save_async(2)
    with pytest.raises(WriteError) as ei:
        h.result()
    assert isinstance(ei.value.__cause__, OSError) and "injected" in str(ei.value.__cause__)
    assert "step 2" in str(ei.value)
    # the error was seen through the handle: the next save is not blocked by it
    storage.budget[0] = None
    ck.save_async(3).result()
    ck.close()
    assert not os.path.exists(os.path.join(root, "step_000000002"))
    assert os.listdir(os.path.join(root, ".tmp")) == []
    fresh = _state()
    assert resume(root, fresh, step=1) == 1
    assert_same(snapshot(fresh), before)


@pytest.mark.parametrize("op", ["open_write", "finish_write", "sync_dir", "rename_dir"])
def test_fault_in_each_commit_stage_raises_on_next_call(root: str, op: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    storage = FaultyStorage(fail_op=op)
    ck = AsyncCheckpointer(root, state, storage=storage)
    ck.save_async(2)
    with pytest.raises(WriteError) as ei:
        ck.wait()
    assert ei.value.__cause__ is not None
    with pytest.raises(WriteError):  # nothing hidden, nothing raised twice
        raise ei.value
    ck.save_async(3)  # the error was delivered by wait(); saving goes on
    ck.close()
    assert [c.step for c in list_checkpoints(root)] == [1, 3]


def test_unseen_error_is_raised_by_next_save_and_by_close(root: str) -> None:
    state = _state()
    ck = AsyncCheckpointer(root, state, storage=FaultyStorage(fail_op="open_write"))
    h = ck.save_async(1)
    h.committed.exception()  # wait without "observing" through result()
    with pytest.raises(WriteError):
        ck.save_async(2)
    ck2 = AsyncCheckpointer(root + "2", state, storage=FaultyStorage(fail_op="open_write"))
    ck2.save_async(1)
    with pytest.raises(WriteError):
        ck2.close()
    ck.close()


def test_close_drains_and_is_idempotent(root: str) -> None:
    gate = threading.Event()
    storage = FaultyStorage(block=gate)
    ck = AsyncCheckpointer(root, _state(), max_inflight=3, storage=storage)
    handles = [ck.save_async(s) for s in range(3)]
    assert not any(h.done() for h in handles)
    threading.Timer(0.3, gate.set).start()
    ck.close()
    assert all(h.done() and h.committed.exception() is None for h in handles)
    assert [c.step for c in list_checkpoints(root)] == [0, 1, 2]
    ck.close()
    with pytest.raises(ConfigError):
        ck.save_async(9)


def test_on_busy_skip_returns_none_and_saves_nothing(root: str) -> None:
    gate = threading.Event()
    ck = AsyncCheckpointer(root, _state(), on_busy="skip", storage=FaultyStorage(block=gate))
    h = ck.save_async(1)
    assert h is not None
    assert ck.save_async(2) is None
    gate.set()
    ck.close()
    assert [c.step for c in list_checkpoints(root)] == [1]
    assert any(r.get("skipped") for r in ck.stats())


def test_steps_commit_in_order_with_two_buffers(root: str, executor: str) -> None:
    state = _state()
    committed: list[int] = []
    with AsyncCheckpointer(root, state, max_inflight=2, executor=executor) as ck:
        for step in range(30):
            h = ck.save_async(step)
            h.committed.add_done_callback(lambda f: committed.append(f.result().step))
    assert committed == list(range(30))


def test_state_change_between_saves_replans_the_pool(root: str, executor: str) -> None:
    model = tiny_model(0)
    opt = torch.optim.Adam(model.parameters())
    state = {"model": model, "optim": opt}
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        ck.save_async(0).result()  # optimizer has no state yet
        pool0 = ck._pipeline.stager.pool
        train_steps(model, opt, 1)  # now it does: more tensors
        ck.save_async(1).result()
        assert ck._pipeline.stager.pool is not pool0
        pool1 = ck._pipeline.stager.pool
        train_steps(model, opt, 1)
        ck.save_async(2).result()
        assert ck._pipeline.stager.pool is pool1  # unchanged structure: the buffers are reused
    expected = snapshot(state)
    model2 = tiny_model(3)
    state2 = {"model": model2, "optim": torch.optim.Adam(model2.parameters())}
    assert resume(root, state2) == 2
    assert_same(snapshot(state2), expected)


def test_committed_step_is_never_overwritten(root: str, executor: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        ck.save_async(5).result()
        with pytest.raises(StepExistsError, match="step 5"):
            ck.save_async(5)
    with AsyncCheckpointer(root, state, executor=executor) as ck:  # a new checkpointer knows it too
        with pytest.raises(StepExistsError):
            ck.save_async(5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_inflight": 0}, "max_inflight"),
        ({"on_busy": "drop"}, "on_busy"),
        ({"overlap": "yes"}, "overlap"),
        ({"write_threads": 0}, "write_threads"),
        ({"executor": "fork"}, "executor"),
    ],
)
def test_bad_options_fail_at_construction(root: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncCheckpointer(root, _state(), **kwargs)


def test_bad_state_names_the_key(root: str) -> None:
    with pytest.raises(TypeError, match=r"state\['extra'\]\['lock'\]"):
        AsyncCheckpointer(root, {"extra": {"lock": threading.Lock()}})
    with pytest.raises(TypeError, match="key"):
        AsyncCheckpointer(root, {"extra": {(1, 2): 3}})
    with pytest.raises(ConfigError, match="top-level keys"):
        AsyncCheckpointer(root, {1: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="state must be a dict"):
        AsyncCheckpointer(root, [torch.ones(1)])  # type: ignore[arg-type]


def test_bad_step_and_metrics(root: str, executor: str) -> None:
    with AsyncCheckpointer(root, _state(), executor=executor) as ck:
        with pytest.raises(ConfigError, match=">= 0"):
            ck.save_async(-1)
        with pytest.raises(TypeError, match="int"):
            ck.save_async(1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="metrics"):
            ck.save_async(1, metrics={"x": object()})
        ck.save_async(1, metrics={"loss": torch.tensor(0.25)}).result()
    assert list_checkpoints(root)[0].metrics == {"loss": 0.25}


def test_root_that_is_a_file_is_rejected(tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        AsyncCheckpointer(str(f), _state())


def test_disk_errors_name_the_path(root: str) -> None:
    err = OSError(errno.ENOSPC, "No space left on device")
    ck = AsyncCheckpointer(root, _state(), storage=FaultyStorage(fail_after_bytes=10, err=err))
    with pytest.raises(WriteError, match="No space left") as ei:
        ck.save_async(1).result()
    cause = ei.value.__cause__
    assert isinstance(cause, asyncckpt.StorageError) and cause.errno == errno.ENOSPC
    assert cause.filename.endswith("__0_0.distcp") and "disk is full" in str(cause)
    assert cause.__cause__ is err
    ck.close()
    assert os.listdir(os.path.join(root, ".tmp")) == []  # temp files cleaned up


def test_resume_method_waits_for_inflight_saves(root: str, executor: str) -> None:
    state = _state()
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        assert ck.resume() is None
        ck.save_async(4)
        expected = snapshot(state)
        for t in state["w"].values():
            t.zero_()
        assert ck.resume() == 4
        assert_same(snapshot(state), expected)


def test_stats_and_log_line(root: str, caplog: pytest.LogCaptureFixture, executor: str) -> None:
    with AsyncCheckpointer(root, _state(), executor=executor) as ck:
        ck.save_async(12).result()
        [rec] = ck.stats()
    assert rec["step"] == 12 and rec["stall_s"] > 0 and rec["bytes_written"] > 0
    assert rec["staging_bytes"] >= 4 * 257 * 4 and rec["write_s"] > 0
    assert any("step=12 stall=" in r.getMessage() for r in caplog.records)


def test_all_is_complete() -> None:
    for name in asyncckpt.__all__:  # resolves the lazy names (PEP 562 __getattr__)
        assert getattr(asyncckpt, name) is not None
    public = {
        n for n, v in vars(asyncckpt).items()
        if not n.startswith("_") and not type(v).__name__ == "module"
    }  # fmt: skip
    assert public == set(asyncckpt.__all__)
    for name in ["AsyncCheckpointer", "SaveHandle", "CheckpointInfo", "list_checkpoints", "resume"]:
        assert name in asyncckpt.__all__


def test_a_failed_construction_gives_the_root_back(root: str, monkeypatch) -> None:
    """A start that fails half way (here: no host memory for the buffers) leaves no owner
    record and no thread behind, so the retry is not refused as a second writer."""
    from asyncckpt.errors import StagingError
    from asyncckpt.staging import Stager

    real = Stager.ensure

    def no_memory(self, flat):  # type: ignore[no-untyped-def]
        raise StagingError("could not allocate the staging buffers (injected)")

    threads = threading.active_count()
    monkeypatch.setattr(Stager, "ensure", no_memory)
    with pytest.raises(StagingError):
        AsyncCheckpointer(root, _state())
    assert os.listdir(os.path.join(root, ".owners")) == []
    assert threading.active_count() == threads
    monkeypatch.setattr(Stager, "ensure", real)
    with AsyncCheckpointer(root, _state()) as ck:  # not a RootBusyError
        ck.save_async(1).result()
