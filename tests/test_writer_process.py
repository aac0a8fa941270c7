"""The writer process: lifecycle, death in both directions, no leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from asyncckpt import AsyncCheckpointer, WriterDiedError, list_checkpoints, resume

from .helpers import assert_same, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.multiproc


def _big_state(mib: int = 256) -> dict:
    n = mib * (1 << 20) // 4 // 8
    return {"w": {f"t{i}": torch.full((n,), float(i)) for i in range(8)}}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_writer_starts_at_construction_and_close_leaves_no_process(root: str) -> None:
    ck = AsyncCheckpointer(root, {"w": torch.ones(4)}, executor="process")
    pid = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
    assert _alive(pid)  # started (and health-checked) before the first save
    ck.save_async(1).result()
    ck.close()
    assert not _alive(pid)
    assert ck._pipeline.executor.process.returncode == 0  # type: ignore[union-attr]


def test_killing_the_writer_mid_save_fails_that_save_and_keeps_the_previous(root: str) -> None:
    state = _big_state()
    ck = AsyncCheckpointer(root, state, executor="process")
    ck.save_async(1).result()
    before = snapshot(state)
    for t in state["w"].values():
        t.add_(1)
    pid = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
    h = ck.save_async(2)
    tmp = os.path.join(root, ".tmp")
    deadline = time.monotonic() + 30
    while not os.listdir(tmp) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)  # the step-2 write is under way
    with pytest.raises(WriterDiedError, match="code -9") as ei:
        h.result(timeout=60)
    assert "step" in str(ei.value)
    assert not os.path.exists(os.path.join(root, "step_000000002"))
    # a fresh writer took over: saving goes on
    ck.save_async(3).result(timeout=60)
    assert ck._pipeline.executor.process.pid != pid  # type: ignore[union-attr]
    ck.close()
    assert [c.step for c in list_checkpoints(root)] == [1, 3]
    fresh = _big_state()
    assert resume(root, fresh, step=1) == 1
    assert_same(snapshot(fresh), before)


def test_dead_writer_without_restart_is_reported_on_every_call(root: str) -> None:
    ck = AsyncCheckpointer(root, {"w": torch.ones(4)}, executor="process", restart=False)
    pid = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ck._pipeline.executor.failure() is None and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    for step in (1, 2):  # not restarted: every save says why, with the exit code
        with pytest.raises(WriterDiedError, match="exited with code -9"):
            ck.save_async(step)
    ck.close()  # nothing was in flight and the error was seen: close does not raise again
    assert list_checkpoints(root) == []


_TRAINER = """
    import sys, time, torch
    from asyncckpt import AsyncCheckpointer
    n = 256 * (1 << 20) // 4 // 8
    state = {"w": {f"t{i}": torch.full((n,), float(i)) for i in range(8)}}
    ck = AsyncCheckpointer(sys.argv[1], state, executor="process")
    ck.save_async(1).result()
    ck.save_async(2)
    print(ck._pipeline.executor.process.pid, flush=True)
    time.sleep(600)
"""


def test_writer_exits_when_the_trainer_dies_and_commits_nothing(root: str) -> None:
    env = dict(os.environ, PYTHONPATH=REPO)
    trainer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_TRAINER), root], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        writer_pid = int(trainer.stdout.readline())  # type: ignore[union-attr]
        trainer.send_signal(signal.SIGKILL)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 15
    while _alive(writer_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(writer_pid), "the writer outlived its trainer"
    assert [c.step for c in list_checkpoints(root)] == [1]
    assert not os.path.exists(os.path.join(root, "step_000000002"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_hundred_back_to_back_saves_commit_in_order_with_flat_memory(root: str) -> None:
    state = {"w": {f"t{i}": torch.randn(1 << 16) for i in range(16)}, "extra": {"step": 0}}
    order: list[int] = []
    with AsyncCheckpointer(root, state, executor="process", max_inflight=2) as ck:
        rss = {}
        for step in range(100):
            state["extra"]["step"] = step
            for t in state["w"].values():
                t.add_(1)
            h = ck.save_async(step)
            h.committed.add_done_callback(lambda f: order.append(f.result().step))
            if step in (10, 99):
                ck.wait()
                rss[step] = _rss_mib()
    assert order == list(range(100))
    assert rss[99] - rss[10] < 64, rss
    fresh = {"w": {f"t{i}": torch.zeros(1 << 16) for i in range(16)}, "extra": {"step": -1}}
    assert resume(root, fresh) == 99
    assert_same(snapshot(fresh), snapshot(state))
    assert fresh["extra"]["step"] == 99
