"""Resume reads whole shard files straight into the staging slot (reader.py, BufferReads)."""

from __future__ import annotations

import os

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageOptions, WriterOptions, list_checkpoints, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.reader import verify_files
from asyncckpt.storage import LocalStorage

from .helpers import assert_same, snapshot


class CountingReads(LocalStorage):
    """Local storage that records each whole-file read (path, offset, bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        self.reads.append((os.path.basename(path), offset, out.nbytes))
        return super().read_into(path, offset, out)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(5 << 20, generator=g),  # 20 MiB: two read pieces
        "w": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "n": torch.tensor(seed),
        "empty": torch.empty(0),
        "meta": {"seed": seed},
    }


@pytest.mark.parametrize("threads", [1, 3])
def test_resume_reads_each_shard_file_whole_into_the_slot(tmp_path, threads: int) -> None:
    root = str(tmp_path / "ck")
    state = _state(1)
    opts = dict(writer=WriterOptions(threads=threads))
    with AsyncCheckpointer(root, state, **opts) as ck:
        ck.save_async(1).result()
    saved = snapshot(state)
    storage = CountingReads()
    live = _state(2)
    with AsyncCheckpointer(root, live, storage=StorageOptions(backend=storage), **opts) as ck:
        assert ck.resume() == 1
        assert_same(snapshot(live), saved)
        # one whole-file read per shard file (through the descriptor the resume pinned)
        assert len({name for name, _, _ in storage.reads}) == threads
        # the slot holds the blobs' headers again: the next save is a valid checkpoint
        live["big"].add_(1)
        info = ck.save_async(2).result()
        m = read_manifest(LocalStorage(), info.path)
        assert verify_files(LocalStorage(), info.path, m) == []
        expected = snapshot(live)
    fresh = _state(3)
    assert resume(root, fresh, step=2) == 2
    assert_same(snapshot(fresh), expected)


@pytest.mark.parametrize("where", ["data", "prefix", "suffix"])
def test_a_corrupt_file_read_whole_falls_back_and_leaves_nothing_behind(tmp_path, where: str) -> None:
    root = str(tmp_path / "ck")
    state = _state(1)
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
        older = snapshot(state)
        state["big"].mul_(2)
        info = ck.save_async(2).result()
    chunk = read_manifest(LocalStorage(), info.path).tensors["big"].chunks[0]
    pos = {
        "data": chunk.data_offset + chunk.nbytes - 5,  # in the second read piece
        "prefix": chunk.offset + 100,
        "suffix": chunk.data_offset + chunk.nbytes + 10,
    }[where]
    path = os.path.join(info.path, chunk.file)
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    live = _state(2)
    storage = CountingReads()
    with AsyncCheckpointer(root, live, storage=StorageOptions(backend=storage), keep=10) as ck:
        with pytest.warns(RuntimeWarning, match="checksum mismatch"):
            assert ck.resume() == 1
        assert storage.reads  # the whole-file path was taken
        assert_same(snapshot(live), older)
        # a damaged header read into the slot never reaches a later checkpoint
        info3 = ck.save_async(3).result()
        assert verify_files(LocalStorage(), info3.path, read_manifest(LocalStorage(), info3.path)) == []
    # step 2 (damaged, then abandoned by the resume) went once the new line passed it
    assert [c.step for c in list_checkpoints(root)] == [1, 3]


def test_a_load_that_wants_part_of_a_file_reads_blob_by_blob(tmp_path) -> None:
    """Reading a file whole would also write the blobs nobody asked for into the slot: when
    the load skips one (``exclude=``), that file is read blob by blob instead."""
    root = str(tmp_path / "ck")
    state = _state(1)
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    live = _state(2)
    kept_w = live["w"].clone()
    storage = CountingReads()
    with AsyncCheckpointer(root, live, storage=StorageOptions(backend=storage)) as ck:
        assert ck.resume(exclude=["w"]) == 1
    assert storage.reads == []  # no whole-file read
    assert torch.equal(live["w"], kept_w)  # excluded: untouched
    for k in ("big", "n", "empty"):
        assert torch.equal(live[k], state[k])
