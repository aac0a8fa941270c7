"""Several actors on one root: a second writer, a rollback, signals to a process group,
protect from outside, readers and ``verify`` beside a pruning trainer, fork, stuck storage.

Scenarios about processes run in real child processes (``[sys.executable, "-c", code]``)
that talk to the test through marker files, never through pipes that could fill up.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import (
    AsyncCheckpointer,
    AsyncCheckpointError,
    CheckpointTimeoutError,
    RootBusyError,
    ScheduleOptions,
    StorageOptions,
    UnsupportedStateError,
    WriterOptions,
    list_checkpoints,
    resume,
)
from asyncckpt import cli as ckpt_cli
from asyncckpt.catalog import protect, read_protected
from asyncckpt.storage import LocalStorage

from .helpers import FaultyStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p),
}
pytestmark = pytest.mark.multiproc

# shared by every child script: marker-file handshakes with the test
PRELUDE = """
import os, signal, sys, time
import torch
import asyncckpt
from asyncckpt import AsyncCheckpointer, ScheduleOptions, StagingOptions, StorageOptions, WriterOptions

def touch(p):
    with open(p, "w") as f:
        f.write(str(os.getpid()))

def wait_file(p, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(p):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {p}")
        time.sleep(0.005)
"""


class Child:
    """A Python child process running ``code``; its output goes to a log file."""

    def __init__(self, tmp: Any, name: str, code: str, *args: str, new_session: bool = False) -> None:
        self.log_path = os.path.join(str(tmp), f"{name}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
            env=ENV,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child {self.pid} did not exit within {timeout}s; log:\n{self.log()}")
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_file(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                pytest.fail(f"child exited ({self.proc.returncode}) before {path}; log:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {path}; child log:\n{self.log()}")
            time.sleep(0.005)


@pytest.fixture
def children():
    """Children started by a test; any still running at its end are killed."""
    started: list[Child] = []
    yield started
    for c in started:
        c.kill()


def _spawn(children: list[Child], tmp: Any, name: str, code: str, *args: str, **kw: Any) -> Child:
    c = Child(tmp, name, code, *args, **kw)
    children.append(c)
    return c


def _tmp_dirs(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, ".tmp", "step_*")))


def _owner_records(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, ".owners", "*.json")))


def _steps(root: str) -> list[int]:
    return [c.step for c in list_checkpoints(root)]


def _wait_until(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


# --------------------------------------------------------------------------- (#3) one writer


HOLDER = """
root, ex, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
ck = AsyncCheckpointer(root, {"w": torch.ones(8)}, writer=WriterOptions(executor=ex))
ck.save_async(1).result(timeout=30)
touch(os.path.join(tmp, "ready"))
wait_file(os.path.join(tmp, "go"))
ck.close()
touch(os.path.join(tmp, "closed"))
"""


def test_second_checkpointer_on_a_root_held_by_another_process_is_busy_until_it_closes(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    holder = _spawn(children, tmp_path, "holder", HOLDER, root, executor, str(tmp_path))
    holder.wait_file(str(tmp_path / "ready"))
    with pytest.raises(RootBusyError, match=rf"pid {holder.pid}\b") as ei:
        AsyncCheckpointer(root, {"w": torch.ones(8)}, writer=WriterOptions(executor=executor))
    assert "takeover=True" in str(ei.value)
    (tmp_path / "go").touch()
    assert holder.wait() == 0, holder.log()
    assert not _owner_records(root)  # a clean close removes its record
    # the owner closed cleanly: the root is free
    ck = AsyncCheckpointer(root, {"w": torch.ones(8)}, writer=WriterOptions(executor=executor))
    ck.save_async(2).result(timeout=30)
    ck.close()
    assert _steps(root) == [1, 2]


def test_second_checkpointer_in_the_same_process_is_busy_and_free_after_close(
    root: str, executor: str
) -> None:
    ck = AsyncCheckpointer(root, {"w": torch.ones(8)}, writer=WriterOptions(executor=executor))
    with pytest.raises(RootBusyError, match=rf"pid {os.getpid()}\b"):
        AsyncCheckpointer(root, {"w": torch.ones(8)}, writer=WriterOptions(executor=executor))
    ck.save_async(1).result(timeout=30)
    ck.close()
    again = AsyncCheckpointer(root, {"w": torch.ones(8)}, writer=WriterOptions(executor=executor))
    again.close()


def test_takeover_starts_and_spares_the_first_writers_save_in_flight(root: str, executor: str) -> None:
    gate = threading.Event()
    first_state = {"w": torch.full((64,), 7.0)}
    first = AsyncCheckpointer(root, first_state, storage=StorageOptions(backend=FaultyStorage(block=gate)))
    try:
        h = first.save_async(1)  # blocks at the commit rename: its temp dir is in flight
        _wait_until(lambda: _tmp_dirs(root), what="the first writer's temp dir")
        (tmp,) = _tmp_dirs(root)
        _wait_until(lambda: os.path.exists(os.path.join(tmp, "manifest.json")), what="the manifest")
        second = AsyncCheckpointer(
            root, {"w": torch.zeros(64)}, writer=WriterOptions(executor=executor, takeover=True)
        )
        assert os.path.isdir(tmp), "the takeover's sweep removed a live writer's save in flight"
        assert not h.done()
    finally:
        gate.set()
    info = h.result(timeout=30)
    assert info.step == 1 and os.path.isdir(info.path)
    first.close()
    second.close()
    fresh = {"w": torch.zeros(64)}
    assert resume(root, fresh) == 1
    assert torch.equal(fresh["w"], torch.full((64,), 7.0))


KILLED_MID_SAVE = """
import threading
from tests.helpers import FaultyStorage
root, tmp = sys.argv[1], sys.argv[2]
gate = threading.Event()  # never set: the save hangs at its commit rename
ck = AsyncCheckpointer(root, {"w": torch.ones(1024)}, storage=StorageOptions(backend=FaultyStorage(block=gate)))
ck.save_async(1)
deadline = time.monotonic() + 30
while not (os.path.isdir(os.path.join(root, ".tmp")) and any(n.startswith("step_") for n in os.listdir(os.path.join(root, ".tmp")))):
    assert time.monotonic() < deadline
    time.sleep(0.005)
touch(os.path.join(tmp, "ready"))
time.sleep(600)
"""


def test_a_writer_killed_mid_save_leaves_a_temp_dir_that_the_next_checkpointer_sweeps(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    child = _spawn(children, tmp_path, "killed", KILLED_MID_SAVE, root, str(tmp_path))
    child.wait_file(str(tmp_path / "ready"))
    (tmp,) = _tmp_dirs(root)
    assert len(_owner_records(root)) == 1
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL  # reaped: its pid is gone, not a zombie
    assert os.path.isdir(tmp) and len(_owner_records(root)) == 1  # nobody cleaned up
    ck = AsyncCheckpointer(root, {"w": torch.ones(1024)}, writer=WriterOptions(executor=executor))
    try:
        assert not os.path.exists(tmp), "a dead writer's temp dir survived the sweep"
        assert len(_owner_records(root)) == 1  # only the new writer's own record
        ck.save_async(1).result(timeout=30)
    finally:
        ck.close()
    assert _steps(root) == [1] and not _tmp_dirs(root) and not _owner_records(root)


# --------------------------------------------------------------------------- (#4) rollback


def _info(root: str) -> dict[int, bool]:
    """step -> abandoned, for the permanent steps under ``root``."""
    return {c.step: c.abandoned for c in list_checkpoints(root)}


def test_rollback_abandons_the_newer_line_and_the_new_line_replaces_it(root: str, executor: str) -> None:
    state = {"w": torch.zeros(32)}
    ck = AsyncCheckpointer(root, state, keep=3, writer=WriterOptions(executor=executor))
    # keep=3 alone would delete step 5 before we roll back to it
    ck.protect(5)
    for s in range(1, 9):
        state["w"].fill_(s)
        ck.save_async(s).result(timeout=30)
    assert _info(root) == {5: False, 6: False, 7: False, 8: False}
    assert ck.resume(step=5) == 5
    assert torch.equal(state["w"], torch.full((32,), 5.0))
    assert _info(root) == {5: False, 6: True, 7: True, 8: True}
    assert sorted(os.listdir(os.path.join(root, ".abandoned.d"))) == [
        "step_000000006",
        "step_000000007",
        "step_000000008",
    ]
    for s in (6, 7, 8, 9):
        state["w"].fill_(-100.0 * s)  # the new line's values
        info = ck.save_async(s).result(timeout=30)
        assert os.path.isdir(info.path), f"the new line's step {s} was deleted right after its commit"
        present = _info(root)
        assert present[s] is False  # the new step is not abandoned
        # old steps the new line has not reached yet are still there, marked abandoned
        assert {t for t, a in present.items() if a} == {t for t in (6, 7, 8) if t > s}
    ck.close()
    assert _info(root) == {5: False, 7: False, 8: False, 9: False}  # 5 is protected
    assert os.listdir(os.path.join(root, ".abandoned.d")) == []
    fresh = {"w": torch.zeros(32)}
    assert resume(root, fresh) == 9
    assert torch.equal(fresh["w"], torch.full((32,), -900.0))
    for s in (7, 8):  # the new line's values, not the abandoned line's
        assert resume(root, fresh, step=s) == s
        assert torch.equal(fresh["w"], torch.full((32,), -100.0 * s))


ROLLBACK_THEN_CRASH = """
root, ex = sys.argv[1], sys.argv[2]
state = {"w": torch.zeros(32)}
ck = AsyncCheckpointer(root, state, keep=3, writer=WriterOptions(executor=ex))
ck.protect(5)
for s in range(1, 9):
    state["w"].fill_(s)
    ck.save_async(s).result(timeout=30)
assert ck.resume(step=5) == 5
for s in (6, 7):
    state["w"].fill_(-100.0 * s)
    ck.save_async(s).result(timeout=30)
os._exit(0)  # a crash: no close, no exit drain; the old line's step 8 is still there
"""


def test_a_crash_after_a_rollback_resumes_the_new_line(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    child = _spawn(children, tmp_path, "rollback", ROLLBACK_THEN_CRASH, root, executor)
    assert child.wait() == 0, child.log()
    assert _info(root) == {5: False, 6: False, 7: False, 8: True}
    fresh = {"w": torch.zeros(32)}
    assert resume(root, fresh) == 7  # never the abandoned step 8
    assert torch.equal(fresh["w"], torch.full((32,), -700.0))
    # the next run (the crashed owner is dead: no takeover needed) goes on from 7
    state = {"w": torch.zeros(32)}
    ck = AsyncCheckpointer(root, state, keep=3, writer=WriterOptions(executor=executor))
    assert ck.resume() == 7
    assert torch.equal(state["w"], torch.full((32,), -700.0))
    for s in (8, 9):
        state["w"].fill_(-100.0 * s)
        info = ck.save_async(s).result(timeout=30)
        assert os.path.isdir(info.path)
    ck.close()
    assert _info(root) == {5: False, 7: False, 8: False, 9: False}
    assert resume(root, fresh) == 9
    assert torch.equal(fresh["w"], torch.full((32,), -900.0))
    assert resume(root, fresh, step=8) == 8
    assert torch.equal(fresh["w"], torch.full((32,), -800.0))


def test_a_crash_while_deleting_an_abandoned_step_does_not_abandon_the_new_lines_step(root: str) -> None:
    from asyncckpt.pruner import decommit

    state = {"w": torch.zeros(8)}
    ck = AsyncCheckpointer(root, state)
    for s in (1, 2, 3):
        state["w"].fill_(s)
        ck.save_async(s).result(timeout=30)
    assert ck.resume(step=1) == 1  # 2 and 3 are abandoned
    ck.close()
    # the next save of step 2 deletes the old one: decommit, then drop its mark; crash between
    decommit(LocalStorage(), os.path.join(os.path.abspath(root), "step_000000002"), 2)
    ck = AsyncCheckpointer(root, state)
    assert ck.resume() == 1
    state["w"].fill_(-2.0)
    ck.save_async(2).result(timeout=30)
    ck.close()
    assert _info(root) == {1: False, 2: False, 3: True}
    fresh = {"w": torch.zeros(8)}
    assert resume(root, fresh) == 2
    assert torch.equal(fresh["w"], torch.full((8,), -2.0))


# --------------------------------------------------------------------------- (#5) signals


SIGNALLED_TRAINER = """
root, ex, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
state = {"w": torch.zeros(1 << 16)}
ck = AsyncCheckpointer(
    root, state,
    schedule=ScheduleOptions(policy=1000, on_signal=[signal.SIGTERM]),
    writer=WriterOptions(executor=ex),
)
touch(os.path.join(tmp, "ready"))
step = 0
while True:
    step += 1
    assert step < 900, "no signal arrived"
    state["w"].fill_(step)  # a training step
    seen = ck.signal_received
    h = ck.save_async(step)  # the policy saves every 1000 steps: only the signal makes it save
    if seen is not None and h is None:
        sys.exit(f"signal {seen} was seen but save_async({step}) did not save")
    if h is not None:
        assert ck.signal_received == signal.SIGTERM, ck.signal_received
        h.result(timeout=30)
        break
    time.sleep(0.01)
ck.close()
with open(os.path.join(tmp, "saved"), "w") as f:
    f.write(str(step))
sys.exit(0)
"""


def test_sigterm_to_the_trainers_process_group_saves_and_exits_cleanly(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    child = _spawn(
        children, tmp_path, "trainer", SIGNALLED_TRAINER, root, executor, str(tmp_path), new_session=True
    )
    child.wait_file(str(tmp_path / "ready"))
    time.sleep(0.3)  # a few training steps
    pgid = os.getpgid(child.pid)
    assert pgid == child.pid != os.getpgid(0)
    os.killpg(pgid, signal.SIGTERM)
    assert child.wait() == 0, child.log()
    step = int((tmp_path / "saved").read_text())
    assert step >= 1
    assert _steps(root) == [step]  # the signal's save, and no other (final=True had nothing left)
    fresh = {"w": torch.zeros(1 << 16)}
    assert resume(root, fresh) == step
    assert torch.equal(fresh["w"], torch.full((1 << 16,), float(step)))
    assert "WriterDiedError" not in child.log() and "Traceback" not in child.log()


# --------------------------------------------------------------------------- (#6) protect


PRUNING_TRAINER = """
root, ex, tmp, first, last = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
state = {"w": torch.zeros(256)}
ck = AsyncCheckpointer(root, state, keep=1, writer=WriterOptions(executor=ex))
for s in range(1, last + 1):
    state["w"].fill_(s)
    ck.save_async(s).result(timeout=30)
    if s == first:
        touch(os.path.join(tmp, "ready"))
        wait_file(os.path.join(tmp, "go"))
ck.close()
"""


def test_protect_from_outside_keeps_a_step_from_a_running_trainers_prunes(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    trainer = _spawn(children, tmp_path, "trainer", PRUNING_TRAINER, root, executor, str(tmp_path), "2", "20")
    trainer.wait_file(str(tmp_path / "ready"))
    assert _steps(root) == [2]  # keep=1 already deleted step 1
    protect(LocalStorage(), os.path.abspath(root), [2])  # no AsyncCheckpointer here
    (tmp_path / "go").touch()
    assert trainer.wait() == 0, trainer.log()
    assert _steps(root) == [2, 20]  # 3..19 were pruned, the protected 2 never
    assert read_protected(LocalStorage(), os.path.abspath(root)) == {2}


def _protector(root: str, go: Any, steps: list[int]) -> int:
    """A forked process that protects ``steps`` one call each once ``go`` opens; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: plain file work only, then out without any exit hooks
        code = 1
        try:
            os.read(go, 1)
            for s in steps:
                protect(LocalStorage(), root, [s])
            code = 0
        finally:
            os._exit(code)
    return pid


def test_processes_protecting_concurrently_lose_no_step(root: str, executor: str) -> None:
    root = os.path.abspath(root)
    os.makedirs(root)
    sets = [[3, 7] + list(range(100, 160)), [5, 9] + list(range(200, 260)), [5, 11] + list(range(100, 130))]
    go_r, go_w = os.pipe()
    pids = [_protector(root, go_r, steps) for steps in sets]
    os.write(go_w, b"x" * len(pids))  # all start at once
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    os.close(go_r)
    os.close(go_w)
    assert read_protected(LocalStorage(), root) == set().union(*map(set, sets))
    # a trainer with keep=1 honours every one of them
    state = {"w": torch.zeros(16)}
    ck = AsyncCheckpointer(root, state, keep=1, writer=WriterOptions(executor=executor))
    for s in range(1, 13):
        state["w"].fill_(s)
        ck.save_async(s).result(timeout=30)
    ck.close()
    assert _steps(root) == [3, 5, 7, 9, 11, 12]


# --------------------------------------------------------------------------- (#7, #9) readers


BUSY_TRAINER = """
root, ex, tmp, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
state = {"a": torch.zeros(n), "b": {"c": torch.zeros(n // 3, dtype=torch.float64)}, "step": 0}
ck = AsyncCheckpointer(
    root, state, keep=1, writer=WriterOptions(executor=ex), staging=StagingOptions(max_inflight=2)
)
stop = os.path.join(tmp, "stop")
step = 0
while not os.path.exists(stop) and step < 100000:
    step += 1
    state["a"].fill_(step)
    state["b"]["c"].fill_(-step)
    state["step"] = step
    ck.save_async(step)
    if step == 2:
        ck.wait()
        touch(os.path.join(tmp, "ready"))
ck.close()
"""

N = 1 << 18  # 1 MiB of float32 plus a float64 tensor: writes take a while, prunes are frequent


def _empty_state() -> dict[str, Any]:
    return {"a": torch.zeros(N), "b": {"c": torch.zeros(N // 3, dtype=torch.float64)}, "step": 0}


def test_resume_in_a_loop_beside_a_pruning_trainer_is_always_exact(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    trainer = _spawn(children, tmp_path, "trainer", BUSY_TRAINER, root, executor, str(tmp_path), str(N))
    trainer.wait_file(str(tmp_path / "ready"))
    seen = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(60):
                fresh = _empty_state()
                s = resume(root, fresh)  # never CorruptCheckpointError / "no loadable checkpoint"
                assert s is not None
                assert fresh["step"] == s
                assert torch.equal(fresh["a"], torch.full((N,), float(s)))
                assert torch.equal(fresh["b"]["c"], torch.full((N // 3,), float(-s), dtype=torch.float64))
                seen.append(s)
        skipped = [str(w.message) for w in caught if "skipping step" in str(w.message)]
        assert not skipped, skipped  # a step deleted under the reader is not damage
    finally:
        (tmp_path / "stop").touch()
    assert trainer.wait() == 0, trainer.log()
    assert len(set(seen)) > 1, f"the trainer did not save during the reads: {seen}"
    assert seen == sorted(seen)


def test_verify_all_beside_a_pruning_trainer_never_fails(
    root: str, executor: str, tmp_path: Any, children: list[Child], capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = _spawn(children, tmp_path, "trainer", BUSY_TRAINER, root, executor, str(tmp_path), str(N))
    trainer.wait_file(str(tmp_path / "ready"))
    verified = set()
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            rc = ckpt_cli.main(["verify", root, "--all"])
            out, err = capsys.readouterr()
            assert rc == 0, out + err
            assert "FAILED" not in out, out
            verified |= {line.split()[-1] for line in out.splitlines() if line.startswith("OK ")}
    finally:
        (tmp_path / "stop").touch()
    assert trainer.wait() == 0, trainer.log()
    assert len(verified) > 1, f"the trainer did not save during the verifies: {verified}"


def test_verify_all_reports_a_step_pruned_while_its_files_are_read_as_gone(
    root: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The race of the test above, made deterministic: retention decommits step 1 (as
    ``Pruner.delete`` does) right after verify's size check of it."""
    from asyncckpt import step_files
    from asyncckpt.pruner import decommit

    ck = AsyncCheckpointer(root, {"w": torch.ones(1024)})
    for s in (1, 2):
        ck.save_async(s).result(timeout=30)
    ck.close()
    real = step_files.file_problems
    step1 = os.path.join(os.path.abspath(root), "step_000000001")

    def size_check_then_pruned(storage: Any, directory: str, manifest: Any, names: Any = None) -> list[str]:
        out = real(storage, directory, manifest, names)
        if directory == step1 and os.path.isdir(step1):
            decommit(storage, step1, 1)
        return out

    monkeypatch.setattr(step_files, "file_problems", size_check_then_pruned)
    rc = ckpt_cli.main(["verify", root, "--all"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "FAILED" not in out and "GONE" in out and "step_000000002" in out, out


# --------------------------------------------------------------------------- (#10) fork


FORKER = """
import threading
from asyncckpt import resume
from tests.helpers import FaultyStorage
root, ex = sys.argv[1], sys.argv[2]
n = (16 << 20) // 4
state = {"w": torch.zeros(n)}
gate = threading.Event()
if ex == "thread":  # saves held at their commit: surely in flight at the fork
    opts = dict(storage=StorageOptions(backend=FaultyStorage(block=gate)))
else:  # 16 MiB each, two buffers: in flight at the fork with all but certainty
    opts = dict(writer=WriterOptions(executor=ex))
    gate.set()
ck = AsyncCheckpointer(root, state, staging=StagingOptions(max_inflight=2), **opts)
handles = []
for s in (1, 2):
    state["w"].fill_(s)
    handles.append(ck.save_async(s))
print("IN_FLIGHT", sum(not h.done() for h in handles), flush=True)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit of the child: atexit hooks run there
t0 = time.monotonic()
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() - t0 > 10:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("CHILD_HUNG", flush=True)
        gate.set()
        os._exit(3)
    time.sleep(0.01)
print("CHILD_EXIT", os.waitstatus_to_exitcode(status), round(time.monotonic() - t0, 2), flush=True)
gate.set()
for h in handles:
    h.result(timeout=30)
state["w"].fill_(3)
ck.save_async(3).result(timeout=30)  # the parent's checkpointer is unharmed by the child
ck.close()
fresh = {"w": torch.zeros(n)}
assert resume(root, fresh) == 3 and bool((fresh["w"] == 3).all())
print("PARENT_OK", flush=True)
"""


def test_a_forked_child_that_exits_normally_does_not_hang_or_harm_the_parent(
    root: str, executor: str, tmp_path: Any, children: list[Child]
) -> None:
    child = _spawn(children, tmp_path, "forker", FORKER, root, executor)
    rc = child.wait(timeout=60)
    log = child.log()
    assert "CHILD_HUNG" not in log, log
    assert rc == 0, log
    (line,) = [ln for ln in log.splitlines() if ln.startswith("CHILD_EXIT")]
    _, code, seconds = line.split()
    assert int(code) == 0 and float(seconds) < 5, log
    assert "PARENT_OK" in log, log
    if executor == "thread":
        assert "IN_FLIGHT 2" in log, log
    assert _steps(root) == [1, 2, 3]


# --------------------------------------------------------------------------- (#12) trigger file


def test_a_trigger_file_that_is_a_directory_is_ignored_and_a_regular_one_triggers(
    root: str, executor: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    trigger = str(tmp_path / "save-now")
    os.mkdir(trigger)
    state = {"w": torch.zeros(8)}
    ck = AsyncCheckpointer(
        root,
        state,
        schedule=ScheduleOptions(policy=1000, trigger_file=trigger, final=False),
        writer=WriterOptions(executor=executor),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            for s in range(1, 6):
                assert ck.save_async(s) is None  # never raises, never saves
        warned = [r for r in caplog.records if "trigger_file" in r.getMessage()]
        assert len(warned) == 1 and "not a regular file" in warned[0].getMessage()
        assert os.path.isdir(trigger)  # left alone
        os.rmdir(trigger)
        open(trigger, "w").close()
        state["w"].fill_(6)
        h = ck.save_async(6)
        assert h is not None
        assert h.result(timeout=30).step == 6
        assert not os.path.exists(trigger)  # consumed
        assert ck.save_async(7) is None  # once
    finally:
        ck.close()
    assert _steps(root) == [6]


# --------------------------------------------------------------------------- (#13) nested tensor


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_nested_tensor_is_unsupported_state_naming_the_key(root: str, executor: str) -> None:
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(UnsupportedStateError) as ei:
        AsyncCheckpointer(root, {"n": nt}, writer=WriterOptions(executor=executor))
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, AsyncCheckpointError)
    msg = str(ei.value)
    assert "'n'" in msg and "unbind" in msg, msg
    assert not _owner_records(root)  # nothing was started: the root is free
    ck = AsyncCheckpointer(root, {"n": list(nt.unbind())}, writer=WriterOptions(executor=executor))
    ck.save_async(1).result(timeout=30)
    ck.close()
    back: dict[str, Any] = {"n": [torch.zeros(2), torch.zeros(3)]}
    assert resume(root, back) == 1
    assert torch.equal(back["n"][0], torch.ones(2)) and torch.equal(back["n"][1], torch.ones(3))


# --------------------------------------------------------------------------- (#14) close(timeout)


class _StuckStorage(LocalStorage):
    """Local storage whose writes into a save's temp dir block until ``gate`` is set."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def open_write(self, path: str) -> Any:
        if "/.tmp/step_" in path:  # not the owner record
            self.gate.wait()
        return super().open_write(path)


def test_close_with_a_timeout_gives_up_on_a_stuck_writer_and_names_the_lost_step(
    root: str, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    ck = AsyncCheckpointer(root, {"w": torch.ones(64)}, storage=StorageOptions(backend=_StuckStorage(gate)))
    try:
        ck.save_async(4)
        _wait_until(lambda: _tmp_dirs(root), what="the stuck save's temp dir")
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="asyncckpt"):
            with pytest.raises(CheckpointTimeoutError):
                ck.close(timeout=2)
        elapsed = time.monotonic() - t0
        assert 1.5 < elapsed < 5, elapsed
        lost = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
        assert len(lost) == 1 and "[4]" in lost[0], lost
        ck.close()  # idempotent afterwards
    finally:
        gate.set()
    assert asyncckpt.__file__.startswith(REPO)
