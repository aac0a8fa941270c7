"""The staging copy and the write overlap: ``slot_progress.Copied`` and a thread writer that
starts on a slot's first bytes while the trainer still copies the rest."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageOptions, WriterOptions, resume
from asyncckpt.blob import TensorSlot
from asyncckpt.slot_progress import Copied
from asyncckpt.storage import LocalStorage

from .helpers import assert_same, snapshot


def _entries() -> list[TensorSlot]:
    # file order (offsets) differs from the copy order (the state's) on purpose
    return [
        TensorSlot("b", torch.float32, (4,), 4096, 16),
        TensorSlot("a", torch.float32, (4,), 64, 16),
        TensorSlot("c", torch.float32, (4,), 8192, 16),
    ]


def test_the_final_prefix_follows_the_tensors_in_slot_order() -> None:
    c = Copied(_entries(), 12288)
    assert c.upto == 0
    c.landed(["b"])  # b lies after a: nothing before a's data is final yet beyond its header
    assert c.upto == 64
    c.landed(["a"])
    assert c.upto == 8192  # a and b are in: everything up to c's data
    c.landed(["c"])
    assert c.upto == 12288  # and the padding after the last tensor


def test_a_waiter_blocks_until_its_bytes_are_in_and_gets_the_copy_error() -> None:
    c = Copied(_entries(), 12288)
    got: list[Any] = []

    def wait(n: int) -> None:
        try:
            c.wait(n)
            got.append(n)
        except RuntimeError as e:
            got.append(e)

    t = threading.Thread(target=wait, args=(8000,))
    t.start()
    time.sleep(0.05)
    c.landed(["a"])
    time.sleep(0.05)
    assert got == []  # b is not in yet
    c.landed(["b"])
    t.join(5)
    assert got == [8000]
    t = threading.Thread(target=wait, args=(12288,))
    t.start()
    c.fail(RuntimeError("copy failed"))
    t.join(5)
    assert isinstance(got[1], RuntimeError)
    c2 = Copied([], 0)
    c2.wait(10**9)  # an empty slot is complete at once


class _Recording(LocalStorage):
    """Records when each whole-file write starts and how much of the slot was final then."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[float] = []

    def write_file(self, path: str, data: Any, size: int, pace: Any = None, ready: Any = None) -> None:
        self.starts.append(time.perf_counter())
        super().write_file(path, data, size, pace, ready)


def test_the_writer_starts_before_the_copy_ends_and_writes_the_final_bytes(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    state = {f"t{i}": torch.randn(16 << 20) for i in range(8)}  # 512 MiB: the copy takes a while
    storage = _Recording()
    writer = WriterOptions(write_during_copy=True)
    with AsyncCheckpointer(root, state, writer=writer, storage=StorageOptions(backend=storage)) as ck:
        t0 = time.perf_counter()
        h = ck.save_async(1, force=True)
        returned = time.perf_counter()
        want = snapshot(state)
        for t in state.values():
            t.add_(1)  # the live state moves on at once: the checkpoint must not see it
        h.result()
    # writing began in the first half of the copy (which is nearly all of save_async here),
    # not after it: the writer waits per piece, not for the whole snapshot
    assert storage.starts and t0 < storage.starts[0] < t0 + (returned - t0) / 2
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    assert resume(root, got) == 1
    assert_same(snapshot(got), want)


@pytest.mark.parametrize("overlap", [False, True])
def test_many_small_saves_round_trip_with_the_writer_racing_the_copy(tmp_path, overlap: bool) -> None:
    from asyncckpt import StagingOptions

    root = str(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    state = {
        f"t{i}": torch.randn(int(torch.randint(1, 300_000, (1,), generator=g)), generator=g)
        for i in range(40)
    }
    writer = WriterOptions(write_during_copy=True)
    with AsyncCheckpointer(
        root, state, writer=writer, staging=StagingOptions(overlap=overlap, max_inflight=2)
    ) as ck:
        for step in range(1, 6):
            for t in state.values():
                t.mul_(1.5)
            ck.save_async(step, force=True)
            if overlap:
                ck.wait_staged()
        ck.wait()
        want = snapshot(state)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    assert resume(root, got) == 5
    assert_same(snapshot(got), want)


class _Boom(torch.Tensor):
    """A tensor whose copy into the slot fails while ``armed``."""

    armed = True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if _Boom.armed and func is torch.Tensor.copy_ and any(isinstance(a, _Boom) for a in args[1:]):
            raise RuntimeError("injected copy failure")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_failed_copy_fails_the_save_the_writer_started_and_commits_nothing(tmp_path) -> None:
    """The writer was handed the save before the copy; the copy fails half way: the caller
    gets the error, the writer stops without committing, and the next save works."""
    from asyncckpt import StagingError, list_checkpoints

    root = str(tmp_path / "ckpt")
    state = {"a": torch.randn(8 << 20), "b": torch.randn(1000).as_subclass(_Boom)}
    with AsyncCheckpointer(root, state, writer=WriterOptions(write_during_copy=True)) as ck:
        _Boom.armed = True
        try:
            with pytest.raises(StagingError, match="injected copy failure"):
                ck.save_async(1, force=True)
        finally:
            _Boom.armed = False
        ck.wait()
        assert list_checkpoints(root) == []
        ck.save_async(2, force=True).result()
    assert [c.step for c in list_checkpoints(root)] == [2]
    got = {"a": torch.zeros(8 << 20), "b": torch.zeros(1000)}
    assert resume(root, got) == 2
    assert torch.equal(got["a"], state["a"]) and torch.equal(got["b"], state["b"].as_subclass(torch.Tensor))
