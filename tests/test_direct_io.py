"""``O_DIRECT`` on local disks, and falling back where a filesystem refuses it.

A filesystem may refuse ``O_DIRECT`` at ``open`` (tmpfs before Linux 6.6) or accept the flag
and refuse the writes (some FUSE and network filesystems): both are simulated here by
refusing, with ``EINVAL``, exactly the calls made on a descriptor that has the flag.  Every
save must then fall back to buffered writes for the rest of the root, log it once, and load
bit-exact; ``direct_io=True`` makes the refusal an error instead."""

from __future__ import annotations

import errno
import fcntl
import logging
import os

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageError, WriteError, WriterOptions, list_checkpoints, resume
from asyncckpt.storage import LocalStorage
from asyncckpt.storage.direct import O_DIRECT, DirectStream

from .helpers import assert_same, snapshot, zeroed

pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")

_write, _open, _preadv = os.write, os.open, os.preadv


def _direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


def _refuse(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "open":

        def open_(path, flags, *a, **k):  # type: ignore[no-untyped-def]
            if flags & O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument", path)
            return _open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", open_)
    else:

        def write(fd, data):  # type: ignore[no-untyped-def]
            if _direct(fd):
                raise OSError(errno.EINVAL, "Invalid argument")
            return _write(fd, data)

        monkeypatch.setattr(os, "write", write)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3 << 20, generator=g), "b": torch.arange(1001, dtype=torch.int16)}


@pytest.mark.parametrize("compression", [None, "lz4"])
@pytest.mark.parametrize("where", ["open", "write"])
def test_a_root_that_refuses_o_direct_falls_back_once(
    tmp_path, monkeypatch, caplog, compression, where
) -> None:
    """Compressed shards go through ``DirectStream``: a refused write used to fail the save
    (and, as the stream's close then raised BufferError, hide why)."""
    if compression:
        pytest.importorskip("blosc2")
    _refuse(monkeypatch, where)
    root, state = str(tmp_path / "ck"), _state()
    with caplog.at_level(logging.INFO, logger="asyncckpt"):
        with AsyncCheckpointer(root, state, writer=WriterOptions(compression=compression)) as ck:
            ck.save_async(1).result()
            state["a"].add_(1)
            ck.save_async(2).result()
    live = zeroed(state)
    assert resume(root, live) == 2
    assert_same(snapshot(live), snapshot(state))
    assert len([r for r in caplog.records if "refused O_DIRECT" in r.getMessage()]) == 1


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_direct_io_true_makes_a_refusal_an_error(tmp_path, monkeypatch, compression) -> None:
    if compression:
        pytest.importorskip("blosc2")
    _refuse(monkeypatch, "write")
    root = str(tmp_path / "ck")
    with AsyncCheckpointer(
        root, _state(), writer=WriterOptions(direct_io=True, compression=compression)
    ) as ck:
        with pytest.raises(WriteError) as ei:
            ck.save_async(1).result()
    assert "direct write (direct_io=True" in str(ei.value.__cause__)
    assert "fsync" not in str(ei.value.__cause__)  # said once, as what failed
    assert list_checkpoints(root) == []


def test_a_failed_stream_closes_its_descriptor_and_keeps_the_error(tmp_path, monkeypatch) -> None:
    """A full disk on the last direct pages: the error is the disk's (not a BufferError from
    releasing the bounce buffer while a traceback holds a slice of it), and no fd leaks."""
    storage, path = LocalStorage(), str(tmp_path / "f")
    f = storage.open_direct(path)
    assert isinstance(f, DirectStream)
    fd = f.fileno()
    f.write(b"x" * (3 * 4096 + 100))

    def full(fd_, data):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError) as ei:
        storage.finish_write(f, path, 3 * 4096 + 100)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_a_stream_refused_midway_goes_on_buffered_from_where_it_was(tmp_path, monkeypatch) -> None:
    """The first direct write passes, the next is refused: the stream goes on buffered and
    the file holds every byte once, in order."""
    storage, path = LocalStorage(), str(tmp_path / "f")
    f = storage.open_direct(path)
    assert isinstance(f, DirectStream)
    calls = {"direct": 0}

    def write(fd, data):  # type: ignore[no-untyped-def]
        if _direct(fd):
            calls["direct"] += 1
            if calls["direct"] > 1:
                raise OSError(errno.EINVAL, "Invalid argument")
        return _write(fd, data[: 1 << 20])  # short writes too

    monkeypatch.setattr(os, "write", write)
    data = os.urandom((80 << 20) + 12345)  # more than two bounce buffers
    for at in range(0, len(data), 7 << 20):
        f.write(data[at : at + (7 << 20)])
    storage.finish_write(f, path, len(data))
    monkeypatch.undo()
    assert calls["direct"] >= 2
    with open(path, "rb") as g:
        assert g.read() == data


def test_reads_fall_back_when_direct_reads_are_refused(tmp_path, monkeypatch) -> None:
    root, state = str(tmp_path / "ck"), _state()
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    refused = []

    def preadv(fd, bufs, off):  # type: ignore[no-untyped-def]
        if _direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return _preadv(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv)
    live = zeroed(state)
    assert resume(root, live) == 1
    assert_same(snapshot(live), snapshot(state))
    assert refused
