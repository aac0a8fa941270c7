"""Resume reads whole shard files straight into the staging slot (reader.py, BufferReads)."""

from __future__ import annotations

import os

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageOptions, WriterOptions, list_checkpoints, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.step_files import verify_files
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


def test_pieces_cover_the_file_and_a_short_tail_rides_with_the_piece_before_it() -> None:
    from asyncckpt.reader import pieces

    for total, piece in [(1, 16), (16, 16), (17, 16), (19, 16), (20, 16), (21, 16), (100, 16), (0, 16)]:
        spans = pieces(total, piece)
        assert [a for a, _ in spans] == sorted({a for a, _ in spans})
        assert all(b > a for a, b in spans) and all(b1 == a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
        if total:
            assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(b - a < piece + piece // 4 for a, b in spans)  # never more than 1.25 pieces
    assert pieces(17, 16) == [(0, 17)]  # a 1-byte tail is no request of its own
    assert pieces(20, 16) == [(0, 16), (16, 20)]  # a quarter piece is
    assert pieces(0, 16) == []


def test_a_shard_just_over_a_piece_is_one_read(tmp_path, monkeypatch) -> None:
    from asyncckpt.reader import ManifestReader

    root = str(tmp_path / "ck")
    state = _state(1)
    with AsyncCheckpointer(root, state) as ck:
        info = ck.save_async(1).result()
    m = read_manifest(LocalStorage(), info.path)
    (name,) = [n for n in m.files if n.endswith(".distcp")]
    size = m.files[name]["size"]
    monkeypatch.setattr(ManifestReader, "PIECE", size - (64 << 10))  # the file is a piece and 64 KiB
    live, storage = _state(2), CountingReads()
    with AsyncCheckpointer(root, live, storage=StorageOptions(backend=storage)) as ck:
        assert ck.resume() == 1
    assert [off for _, off, _ in storage.reads] == [0], storage.reads
    assert_same(snapshot(live), snapshot(state))


def test_a_standalone_resume_reads_each_shard_file_whole(tmp_path, monkeypatch) -> None:
    """Without a checkpointer's staging slot, ``resume`` lays its shadow buffers out as the
    shard files in one slab and reads each file whole into it: a handful of reads, not one
    per tensor; the live state changes only once every byte is verified."""
    root = str(tmp_path / "ck")
    state = _state(1)
    with AsyncCheckpointer(root, state, writer=WriterOptions(threads=2)) as ck:
        ck.save_async(1).result()
    reads: list[tuple[str, int]] = []
    real = LocalStorage.read_into

    def counting(self, path: str, offset: int, out: memoryview) -> int:
        reads.append((path, offset))
        return real(self, path, offset, out)

    monkeypatch.setattr(LocalStorage, "read_into", counting)
    live = _state(2)
    assert resume(root, live) == 1
    assert_same(snapshot(live), snapshot(state))
    assert len({p for p, _ in reads}) == 2  # both shard files, each read whole
    assert len(reads) <= 4  # 20 MiB in 16 MiB pieces: two for the bigger file, one for the other


def test_a_partial_load_keeps_a_shadow_per_tensor_it_wants(tmp_path, monkeypatch) -> None:
    """A load of part of a checkpoint (``exclude``, ``strict=False``: say the weights of one
    larger than memory) never allocates the slab for all of it."""
    import importlib

    resume_mod = importlib.import_module("asyncckpt.resume")  # the package's `resume` is the function

    root = str(tmp_path / "ck")
    state = _state(1)
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()

    def no_slab(manifest):  # type: ignore[no-untyped-def]
        raise AssertionError("a partial load allocated the slab")

    monkeypatch.setattr(resume_mod, "_slab", no_slab)
    live = _state(2)
    before_w = live["w"].clone()
    assert resume(root, live, exclude=["w"]) == 1
    assert torch.equal(live["big"], state["big"]) and torch.equal(live["w"], before_w)
    part = {"big": torch.zeros_like(state["big"])}
    assert resume(root, part, strict=False) == 1
    assert torch.equal(part["big"], state["big"])
    with pytest.raises(AssertionError, match="slab"):
        resume(root, _state(3))  # a whole load does use it
