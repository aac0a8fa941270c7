"""finalize.py: after a commit the catalog, then retention, then stats, and only then the handle."""

from __future__ import annotations

import concurrent.futures
import os
import threading

import pytest

from asyncckpt import layout
from asyncckpt.catalog import Catalog, list_in
from asyncckpt.errors import WriteError, WriterDiedError
from asyncckpt.finalize import Finalizer
from asyncckpt.handle import ErrorInbox, SaveHandle
from asyncckpt.layout import Kind
from asyncckpt.policy import KeepLast
from asyncckpt.pruner import Pruner
from asyncckpt.request import SaveOutcome
from asyncckpt.storage import LocalStorage
from asyncckpt.telemetry import Telemetry

from ._steps import commit_info


class Rig:
    """A real catalog, pruner (KeepLast(1)), telemetry and inbox around a root with steps 1, 2."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.storage = LocalStorage()
        for s in (1, 2):
            commit_info(root, s)
        self.catalog = Catalog(list_in(self.storage, root))
        self.pruner = Pruner(self.storage, root, self.catalog, [KeepLast(1)], snapshot_slots=1)
        self.stats: list[dict] = []
        self.gate = threading.Event()  # clear it to hold the finalize thread in the stats sink
        self.gate.set()

        def sink(rec: dict) -> None:
            self.gate.wait(30)
            self.stats.append(rec)

        self.telemetry = Telemetry(sink)
        self.inbox = ErrorInbox()
        self.finalizer = Finalizer(self.catalog, self.pruner, self.telemetry, self.inbox)

    def committed_steps(self) -> list[int]:
        return [c.step for c in list_in(self.storage, self.root) if c.tier == "permanent"]

    def track(self, step: int, kind: Kind = Kind.PERMANENT):
        handle = SaveHandle(step)
        fut: concurrent.futures.Future[SaveOutcome] = concurrent.futures.Future()
        rec = self.telemetry.start(step, tier=kind.value, stall_s=0.01)
        self.finalizer.track(handle, kind, fut, rec)
        return handle, fut


@pytest.fixture
def rig(tmp_path):
    r = Rig(str(tmp_path / "ckpt"))
    yield r
    r.gate.set()
    r.finalizer.close()


def test_the_handle_resolves_after_catalog_and_retention(rig):
    handle, fut = rig.track(3)
    assert rig.finalizer.in_flight() == {3}
    assert not handle.done()
    info = commit_info(rig.root, 3)  # the writer committed it
    seen_at_resolve: dict = {}
    looked = threading.Event()

    def on_done(f: concurrent.futures.Future) -> None:  # runs as the handle resolves
        seen_at_resolve["catalog"] = rig.catalog.steps()
        seen_at_resolve["disk"] = rig.committed_steps()
        seen_at_resolve["stats"] = [dict(r) for r in rig.stats]
        seen_at_resolve["in_flight"] = rig.finalizer.in_flight()
        looked.set()

    handle.committed.add_done_callback(on_done)
    fut.set_result(
        SaveOutcome(
            info=info, bytes_written=info.bytes, write_seconds=0.5, commit_seconds=0.1, queue_wait_s=0.2
        )
    )
    assert handle.result(timeout=10) == info
    assert looked.wait(10)
    assert seen_at_resolve["catalog"] == {3}
    assert seen_at_resolve["disk"] == [3]  # steps 1 and 2 were pruned before the handle resolved
    assert not os.path.exists(layout.step_dir(rig.root, Kind.PERMANENT, 1))
    (rec,) = seen_at_resolve["stats"]
    assert rec["step"] == 3 and rec["write_s"] == 0.5 and rec["commit_s"] == 0.1
    assert rec["queue_wait_s"] == 0.2 and rec["bytes_written"] == info.bytes
    assert seen_at_resolve["in_flight"] == set()
    assert rig.telemetry.records()[0]["throughput_Bps"] == pytest.approx(info.bytes / 0.5)
    rig.inbox.raise_pending()  # nothing failed


def test_a_step_in_flight_is_never_pruned(rig):
    # step 4 is being written while step 3's commit is finalized: 4 is not committed yet, so
    # retention keeps 3 (the newest committed) and never touches anything of 4's
    h4, f4 = rig.track(4)
    h3, f3 = rig.track(3)
    info3 = commit_info(rig.root, 3)
    f3.set_result(SaveOutcome(info=info3, bytes_written=1, write_seconds=1, commit_seconds=0))
    h3.result(timeout=10)
    assert rig.committed_steps() == [3]
    assert rig.finalizer.in_flight() == {4}
    info4 = commit_info(rig.root, 4)
    f4.set_result(SaveOutcome(info=info4, bytes_written=1, write_seconds=1, commit_seconds=0))
    h4.result(timeout=10)
    assert rig.committed_steps() == [4]
    assert rig.catalog.steps() == {4}


def test_snapshots_rotate_through_the_finalizer(rig):
    for s in (5, 6):
        h, f = rig.track(s, Kind.SNAPSHOT)
        info = commit_info(rig.root, s, Kind.SNAPSHOT)
        f.set_result(SaveOutcome(info=info, bytes_written=1, write_seconds=1, commit_seconds=0))
        assert h.result(timeout=10).tier == "snapshot"
    assert rig.catalog.steps(Kind.SNAPSHOT) == {6}  # one slot
    assert [c.step for c in list_in(rig.storage, rig.root) if c.tier == "snapshot"] == [6]
    assert rig.committed_steps() == [2]  # retention runs after every commit, snapshots' too


def test_a_failed_save_fails_the_handle_at_once_and_goes_to_the_inbox(rig):
    # keep the finalize thread busy with step 4's commit (its stats sink blocks)
    rig.gate.clear()
    h4, f4 = rig.track(4)
    handle, fut = rig.track(3)
    info4 = commit_info(rig.root, 4)
    f4.set_result(SaveOutcome(info=info4, bytes_written=1, write_seconds=1, commit_seconds=0))
    cause = OSError(28, "No space left on device")
    fut.set_exception(cause)
    # not queued behind the finalize thread: the handle failed on the thread that saw it
    assert handle.done()
    assert rig.finalizer.in_flight() == {4}
    with pytest.raises(WriteError, match="saving step 3 failed: OSError") as ei:
        handle.result(timeout=0)
    assert ei.value.__cause__ is cause
    assert handle.staged.done() and isinstance(handle.staged.exception(), WriteError)
    assert not h4.done()
    rig.gate.set()
    assert h4.result(timeout=10).step == 4
    # the caller observed it through result(): the inbox does not raise it again
    rig.inbox.raise_pending()
    assert rig.committed_steps() == [4]
    assert rig.catalog.steps() == {4}


def test_an_unobserved_failure_is_raised_once_by_the_inbox(rig):
    handle, fut = rig.track(3)
    fut.set_exception(WriterDiedError("the writer thread has stopped"))
    with pytest.raises(WriterDiedError, match="stopped"):  # a WriteError is passed as is
        rig.inbox.raise_pending()
    rig.inbox.raise_pending()  # only once
    assert handle.observed


def test_two_failures_raise_the_first_and_log_the_rest(rig, caplog):
    h3, f3 = rig.track(3)
    h4, f4 = rig.track(4)
    f3.set_exception(RuntimeError("first"))
    f4.set_exception(RuntimeError("second"))
    with pytest.raises(WriteError, match="first"):
        rig.inbox.raise_pending()
    assert any(
        "1 more background errors" in r.getMessage() and "second" in r.getMessage() for r in caplog.records
    )


def test_handles_lists_failed_ones_first(rig):
    h3, f3 = rig.track(3)
    h4, f4 = rig.track(4)
    assert {h.step for h in rig.finalizer.handles()} == {3, 4}
    f4.set_exception(RuntimeError("x"))
    assert [h.step for h in rig.finalizer.handles()] == [3]  # a failed one is no longer in flight
    with pytest.raises(WriteError):
        rig.inbox.raise_pending()


def test_a_failing_stats_sink_never_breaks_finalizing(tmp_path):
    root = str(tmp_path / "ckpt")
    commit_info(root, 1)
    storage = LocalStorage()
    catalog = Catalog(list_in(storage, root))

    def sink(rec: dict) -> None:
        raise ValueError("sink broke")

    fin = Finalizer(catalog, Pruner(storage, root, catalog, [], None), Telemetry(sink), ErrorInbox())
    try:
        handle = SaveHandle(2)
        fut: concurrent.futures.Future[SaveOutcome] = concurrent.futures.Future()
        fin.track(handle, Kind.PERMANENT, fut, {"step": 2})
        info = commit_info(root, 2)
        fut.set_result(SaveOutcome(info=info, bytes_written=1, write_seconds=1, commit_seconds=0))
        assert handle.result(timeout=10).step == 2
        assert catalog.steps() == {1, 2}
    finally:
        fin.close()
