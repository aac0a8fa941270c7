"""SIGKILL the writer process (executor="process") at seeded random moments.

The trainer keeps training: every lost save is reported as WriterDiedError (through its
handle, or at the next call when nothing was in flight), a fresh writer takes over, and
later saves commit.  After every kill a fresh reader loads the newest committed step
bit-exactly and every save reported committed (within retention) is still there.

Knobs: ASYNCCKPT_FUZZ_WRITER_KILLS (default 20), ASYNCCKPT_FUZZ_SEED.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import warnings
from collections import Counter

import pytest

from asyncckpt import AsyncCheckpointer, SaveHandle, WriterDiedError, list_checkpoints, resume
from asyncckpt.catalog import list_leftovers, read_manifest
from asyncckpt.step_files import verify_files
from asyncckpt.storage import LocalStorage

from ._support import Resources, fill, knob, make_state, pid_alive, report, seed, slow_enabled, state_mismatch

pytestmark = pytest.mark.multiproc

NUMEL = 1 << 19  # ~4.3 MiB per step
KEEP = 3


def _kill_if_current(ck: AsyncCheckpointer, pid: int, killed: threading.Event) -> None:
    proc = ck._pipeline.executor.process  # type: ignore[union-attr]
    if proc.pid == pid and proc.poll() is None:
        # set first: the trainer can hear of the death before this thread runs again
        killed.set()
        os.kill(pid, signal.SIGKILL)


def _restarted(ck: AsyncCheckpointer, old: int, timeout: float = 60) -> bool:
    """The writer that replaced ``old`` is up and its listener runs (restart complete)."""
    ex = ck._pipeline.executor  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ex.process.pid != old and ex.process.poll() is None and ex._listener.is_alive():  # type: ignore[union-attr]
            return True
        time.sleep(0.02)
    return False


def _outcome(h: SaveHandle) -> BaseException | None:
    try:
        h.result(timeout=120)  # marks a failure as seen, as a trainer would
    except Exception as e:
        return e
    return None


def _writer_kill_fuzz(root: str, kills: int, rng: random.Random) -> Counter:
    c: Counter = Counter()
    failures: list[str] = []
    ok: set[int] = set()  # handles that resolved to committed
    lost: set[int] = set()  # handles that failed with WriterDiedError
    late: set[int] = set()  # ... whose step is nevertheless committed (checked bit-exactly)
    state = make_state(NUMEL)
    # baseline after a warm-up (the first process executor starts multiprocessing's resource
    # tracker, which stays for the life of the process)
    AsyncCheckpointer(root + "_warm", state, executor="process").close()
    res = Resources()
    ck = AsyncCheckpointer(root, state, executor="process", keep=KEEP, max_inflight=2)
    step = 0
    pending: list[SaveHandle] = []
    last_resumed = None

    def check_died(e: BaseException) -> None:
        """The report names the SIGKILL; a save handed to the dead pipe before the death was
        noticed says 'the writer process is gone' without the exit code."""
        if "code -9" not in str(e):
            assert "writer process is gone" in str(e), e
            c["reported_without_exit_code"] += 1

    def settle(block: bool) -> bool:
        """Resolve finished handles; True if one failed with WriterDiedError."""
        died = False
        for h in list(pending):
            if not block and not h.done():
                continue
            exc = _outcome(h)
            pending.remove(h)
            if exc is None:
                ok.add(h.step)
            elif isinstance(exc, WriterDiedError):
                check_died(exc)
                lost.add(h.step)
                died = True
            else:
                failures.append(f"step {h.step} failed with {type(exc).__name__}: {exc}")
        return died

    def save() -> bool:
        """One training step with a save; True if the trainer was told the writer died."""
        nonlocal step
        fill(state, step)
        try:
            h = ck.save_async(step)
        except WriterDiedError as e:  # a death with nothing in flight: reported at the next call
            check_died(e)
            c["told_at_next_call"] += 1
            return True
        assert h is not None
        pending.append(h)
        step += 1
        return False

    def drain_notices() -> None:
        """Consume a death's late reports before the next kill, so each round is told of its own.

        A death can be reported twice: through the handle whose send failed, and again by a
        notice raised at a later call (see the report in docs/reliability.md)."""
        time.sleep(0.3)  # the notice is queued just after the restart completes
        while True:
            try:
                ck.wait()
                return
            except WriterDiedError:
                c["extra_notices_after_a_reported_death"] += 1

    try:
        for k in range(kills):
            # training goes on: the (restarted) writer commits a few saves
            before = len(ok)
            for _ in range(rng.randint(1, 3)):
                save()
            settle(block=True)
            if len(ok) == before:
                failures.append(f"kill {k}: no save committed after the restart")
            old = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
            killed = threading.Event()
            mode = rng.choice(["busy", "busy", "busy", "idle"])
            c[f"mode_{mode}"] += 1
            timer = None
            if mode == "idle":
                ck.wait()
                _kill_if_current(ck, old, killed)
            else:
                delay = rng.choice(
                    [rng.uniform(0, 0.01), min(0.3, rng.expovariate(1 / 0.04)), rng.uniform(0, 0.2)]
                )
                timer = threading.Timer(delay, _kill_if_current, (ck, old, killed))
                timer.start()
            deadline = time.monotonic() + 90
            told = False
            while not told and time.monotonic() < deadline:
                heard = save() or settle(block=False)
                told = heard and killed.is_set()
                time.sleep(rng.uniform(0, 0.02))
            if timer is not None:
                timer.join()
            if not told:
                failures.append(f"kill {k}: the trainer was never told that writer {old} died")
            if not _restarted(ck, old):
                failures.append(f"kill {k}: writer {old} was not replaced")
            try:
                ck.wait()
            except WriterDiedError:
                c["reported_by_wait"] += 1
            settle(block=True)
            drain_notices()
            c["kills"] += 1
            new = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
            if new == old or pid_alive(old):
                failures.append(f"kill {k}: writer not replaced (old {old}, new {new})")
            # a fresh reader: newest committed step, bit-exact; nothing reported lost is half there
            steps = [i.step for i in list_checkpoints(root)]
            fresh = make_state(NUMEL)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = resume(root, fresh)
            if [w for w in caught if issubclass(w.category, RuntimeWarning)]:
                c["corrupt_loads"] += 1
                failures.append(f"kill {k}: resume skipped a checkpoint: {[str(w.message) for w in caught]}")
            if got != (steps[-1] if steps else None):
                failures.append(f"kill {k}: resume loaded {got}, newest listed {steps[-1:]}")
            if got is not None and (bad := state_mismatch(fresh, got)) is not None:
                c["corrupt_loads"] += 1
                failures.append(f"kill {k}: {bad}")
            if last_resumed is not None and (got is None or got < last_resumed):
                failures.append(f"kill {k}: resumed {got} after {last_resumed}")
            last_resumed = got
            for s in steps:
                if s not in ok and s not in lost:
                    c["uncommitted_loads"] += 1
                    failures.append(f"kill {k}: step {s} on disk was never saved")
                elif s in lost and s not in late:
                    late.add(s)  # the writer died after the rename, before reporting the commit
                    m = read_manifest(LocalStorage(), os.path.join(root, f"step_{s:09d}"))
                    one = make_state(NUMEL)
                    resume(root, one, step=s)
                    if m.step != s or state_mismatch(one, s) is not None:
                        c["corrupt_loads"] += 1
                        failures.append(f"kill {k}: step {s} reported lost is on disk with wrong data")
            # a late step is unknown to the trainer's retention: it stays until a new
            # checkpointer lists the root (see docs/reliability.md)
            c["max_checkpoints_listed"] = max(c["max_checkpoints_listed"], len(steps))
            ever = ok | set(steps)
            for s in ok:
                if sum(1 for x in ever if x > s) < KEEP and s not in steps:
                    c["lost_committed"] += 1
                    failures.append(f"kill {k}: step {s} was committed and is gone (have {steps})")
            for info in list_checkpoints(root):
                problems = verify_files(LocalStorage(), info.path, read_manifest(LocalStorage(), info.path))
                c["checkpoints_verified"] += 1
                if problems:
                    failures.append(f"kill {k}: {info.path}: {problems}")
        # training continues after the last restart too
        for _ in range(3):
            save()
        ck.close()
        settle(block=True)
    finally:
        ck.close()
    # every killed writer's pipes and listener thread are gone too
    assert res.leaked() == []
    c["saves_committed"] = len(ok)
    c["saves_lost"] = len(lost)
    c["reported_lost_but_committed"] = len(late)
    assert not pid_alive(ck._pipeline.executor.process.pid)  # type: ignore[union-attr]
    AsyncCheckpointer(root, make_state(NUMEL)).close()  # a new checkpointer sweeps the killed writes
    assert list_leftovers(root) == []
    fresh = make_state(NUMEL)
    assert resume(root, fresh) == step - 1 and state_mismatch(fresh, step - 1) is None
    assert failures == [], "\n".join(failures[:20])
    return c


def test_writer_kill_fuzz(tmp_path) -> None:
    kills = knob("ASYNCCKPT_FUZZ_WRITER_KILLS", 20)
    c = _writer_kill_fuzz(str(tmp_path / "ckpt"), kills, random.Random(seed() + 3))
    report("writer_kill_fuzz", dict(sorted(c.items())))
    assert c["kills"] == kills
    assert c["corrupt_loads"] == 0 and c["uncommitted_loads"] == 0 and c["lost_committed"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not slow_enabled(), reason="long randomized run: set ASYNCCKPT_SLOW=1")
@pytest.mark.timeout(7200)
def test_writer_kill_fuzz_long(tmp_path) -> None:
    kills = knob("ASYNCCKPT_FUZZ_WRITER_KILLS_SLOW", 150)
    c = _writer_kill_fuzz(str(tmp_path / "ckpt"), kills, random.Random(seed() + 13))
    report("writer_kill_fuzz_long", dict(sorted(c.items())))
