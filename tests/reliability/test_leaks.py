"""Back-to-back saves and resource leaks, on both executors.

200 saves of a small state: commits arrive in strictly rising step order, RSS grows by less
than 64 MiB between save 20 and save 200, and after close() the open file descriptors,
threads, shared-memory segments and child processes are back at their baseline.
"""

from __future__ import annotations

import os
import threading

import pytest

from asyncckpt import AsyncCheckpointer, list_checkpoints, resume

from ._support import Resources, fill, make_state, open_fds, pid_alive, report, rss_mib, state_mismatch

NUMEL = 1 << 14
SAVES = 200


def _segments(ck: AsyncCheckpointer) -> set[str]:
    """The staging pool's shared-memory segments (process executor), by name.

    Only this checkpointer's own segments are checked: /dev/shm is shared with every other
    process on the machine."""
    pool = ck._pipeline.stager.pool
    return set(pool.shm_names() or []) if pool is not None else set()


def _alive_segments(names: set[str]) -> set[str]:
    return {n for n in names if os.path.exists(os.path.join("/dev/shm", n.lstrip("/")))}


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_two_hundred_back_to_back_saves_leak_nothing(tmp_path, executor: str) -> None:
    # warm up once: a first process executor starts multiprocessing's resource tracker,
    # which lives (with its pipe) for the rest of the process; that is not a leak
    AsyncCheckpointer(str(tmp_path / "warm"), make_state(NUMEL), executor=executor).close()
    res, fds0, threads0 = Resources(), open_fds(), threading.active_count()
    root = str(tmp_path / "ckpt")
    state = make_state(NUMEL)
    order: list[int] = []
    rss: dict[int, float] = {}
    ck = AsyncCheckpointer(root, state, executor=executor, max_inflight=2, keep=5)
    writer_pids = [ck._pipeline.executor.process.pid] if executor == "process" else []  # type: ignore[union-attr]
    segments = _segments(ck)
    assert (executor == "process") == bool(_alive_segments(segments))
    try:
        for step in range(1, SAVES + 1):
            fill(state, step)
            h = ck.save_async(step)
            assert h is not None
            h.committed.add_done_callback(lambda f: order.append(f.result().step))
            if step in (20, SAVES):
                ck.wait()
                rss[step] = rss_mib()
        ck.close()
    finally:
        ck.close()
    assert order == list(range(1, SAVES + 1)), "commits out of order"
    assert rss[SAVES] - rss[20] < 64, rss
    assert res.leaked() == []
    fds1, threads1 = open_fds(), threading.active_count()
    assert _alive_segments(segments) == set(), "shared memory left behind"
    assert not any(pid_alive(p) for p in writer_pids)
    assert [c.step for c in list_checkpoints(root)] == list(range(SAVES - 4, SAVES + 1))
    fresh = make_state(NUMEL)
    assert resume(root, fresh) == SAVES and state_mismatch(fresh, SAVES) is None
    report(f"leaks_{executor}", {"saves": SAVES, "rss_growth_mib": round(rss[SAVES] - rss[20], 1),
                                 "fd_delta": fds1 - fds0, "thread_delta": threads1 - threads0})  # fmt: skip


def test_many_checkpointers_opened_and_closed(tmp_path) -> None:
    """Constructing, using and closing checkpointers over and over leaks nothing either."""
    AsyncCheckpointer(str(tmp_path / "warm"), make_state(NUMEL)).close()
    res = Resources()
    state = make_state(NUMEL)
    for i in range(30):
        with AsyncCheckpointer(str(tmp_path / "ckpt"), state, keep=2, write_threads=1 + i % 3) as ck:
            fill(state, i)
            ck.save_async(i).result()
    assert res.leaked() == []
