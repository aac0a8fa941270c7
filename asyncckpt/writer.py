"""Shard files from a staging slot: this rank's files, written whole, with their checksums.

A slot already holds every shard file byte for byte (``file_layout``), so writing a file is
handing one page-aligned range of memory to the storage: ``O_DIRECT`` in a few large writes
on local disks, parallel multipart parts on S3, a plain stream of writes elsewhere.  Each
blob's checksum is computed from the same memory on a helper thread while the write runs
(both release the GIL), so a file costs max(write, checksum), not their sum, and nothing is
read back.  This module knows nothing of commits or naming beyond the shard file names.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from . import layout
from .blob import TensorSlot
from .checksum import DEFAULT, checksum
from .compressed import Compressor, write_compressed_file
from .file_layout import FileImage
from .manifest import Chunk
from .storage import BufferWrites, Storage, retrying, write_stream

__all__ = ["write_shards", "write_small", "slot_bytes"]


Pace = Callable[[int], None]
Ready = Callable[[int], None]  # blocks until slot bytes [0, n) are final (slot_progress.Copied.wait)


def slot_bytes(buffer: torch.Tensor, start: int, n: int) -> memoryview:
    """A writable, zero-copy view of bytes ``[start, start + n)`` of a slot buffer."""
    if n == 0:
        return memoryview(bytearray())
    if start + n > buffer.numel():
        raise ValueError(f"range {start}..{start + n} lies outside a slot of {buffer.numel()} bytes")
    raw = (ctypes.c_char * n).from_address(buffer.data_ptr() + start)
    return memoryview(raw).cast("B")


class _Checksums(threading.Thread):
    """Each blob's checksum over the file image, on its own thread (the write runs meanwhile)."""

    def __init__(self, image: memoryview, f: FileImage, algo: str, ready: Ready | None = None) -> None:
        super().__init__(name="asyncckpt-checksum", daemon=True)
        self.image, self.file, self.algo, self.ready = image, f, algo, ready
        self.values: list[int] = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            if self.ready is not None:
                # after the copy, not beside it: checksums are CPU work that would slow the
                # trainer's copy (the stall); the write itself is DMA and overlaps it freely
                self.ready(self.file.start + self.file.padded)
            for b in self.file.blobs:
                self.values.append(checksum(self.algo, self.image[b.start : b.start + b.length]))
        except BaseException as e:  # re-raised by the writer after join
            self.error = e


def _write_file(
    storage: Storage,
    path: str,
    name: str,
    f: FileImage,
    buffer: torch.Tensor,
    shapes: dict[str, TensorSlot],
    algo: str,
    pace: Pace | None,
    ready: Ready | None = None,
) -> tuple[dict[str, Chunk], int]:
    image = slot_bytes(buffer, f.start, f.padded)
    sums = _Checksums(image, f, algo, ready)
    try:
        if isinstance(storage, BufferWrites):
            in_file = None if ready is None else (lambda n: ready(f.start + n))  # noqa: E731
            storage.write_file(path, image, f.size, pace, in_file)
        else:
            if ready is not None:
                ready(f.start + f.padded)
            write_stream(storage, path, image[: f.size], pace)
    finally:
        sums.join()
    if sums.error is not None:
        raise sums.error
    chunks = {}
    for b, crc in zip(f.blobs, sums.values):
        e = shapes[b.fqn]
        chunks[b.fqn] = Chunk(
            offsets=[0] * len(e.shape),
            sizes=list(e.shape),
            file=name,
            offset=b.start,
            length=b.length,
            data_offset=b.data_offset,
            nbytes=e.nbytes,
            crc=crc,
            algo=algo,
        )
    return chunks, f.size


def write_shards(
    storage: Storage,
    directory: str,
    files: Sequence[FileImage],
    entries: Sequence[TensorSlot],
    buffer: torch.Tensor,
    rank: int,
    pool: ThreadPoolExecutor | None,
    *,
    algo: str = DEFAULT,
    pace: Pace | None = None,
    compressor: Compressor | None = None,
    ready: Ready | None = None,
) -> tuple[dict[str, Chunk], dict[str, dict[str, int]]]:
    """Write this rank's shard files from the slot (in parallel on ``pool``).

    With ``compressor`` each file is instead a stream of compressed records, one per tensor
    (``compressed.py``), compressed on the compressor's threads.  Each file is retried
    whole, with backoff, on transient errors: the slot still holds it.  ``ready(n)`` blocks
    until slot bytes ``[0, n)`` are final: writing starts while the staging copy runs.
    """
    if compressor is not None and ready is not None:
        # compression is CPU work: beside the trainer's copy it would lengthen the stall
        ready(buffer.numel())
    shapes = {e.fqn: e for e in entries}
    names = [layout.shard_filename(rank, f.index) for f in files]

    def write(path: str, name: str, f: FileImage) -> tuple[dict[str, Chunk], int]:
        if compressor is None:
            return _write_file(storage, path, name, f, buffer, shapes, algo, pace, ready)
        tensors = [(b.fqn, *((e := shapes[b.fqn]).dtype, e.shape, e.offset, e.nbytes)) for b in f.blobs]
        return write_compressed_file(storage, path, name, tensors, buffer, compressor, algo, pace)

    def one(name: str, f: FileImage) -> tuple[dict[str, Chunk], int]:
        path = layout.join(directory, name)
        return retrying(storage, lambda: write(path, name, f))

    if pool is not None and len(files) > 1:
        # every file's write ends (failed or not) before this returns or raises: on a failure
        # the caller removes the temp directory and frees the slot, which the others still use
        futures = [pool.submit(one, n, f) for n, f in zip(names, files)]
        wait(futures)
        results = [f.result() for f in futures]
    else:
        results = [one(n, f) for n, f in zip(names, files)]
    chunks: dict[str, Chunk] = {}
    out: dict[str, dict[str, int]] = {}
    for name, (c, size) in zip(names, results):
        chunks.update(c)
        out[name] = {"size": size}
    return chunks, out


def write_small(storage: Storage, path: str, data: bytes, algo: str = DEFAULT) -> dict[str, Any]:
    """Write a small file durably, retried like a shard file on transient errors (writing
    the same bytes again is harmless); returns its size and checksum for the manifest."""
    retrying(storage, lambda: write_stream(storage, path, memoryview(data)))
    return {"size": len(data), algo: checksum(algo, data)}
