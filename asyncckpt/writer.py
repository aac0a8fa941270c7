"""Shard files from a staging slot: the bytes of one rank's tensors, with their checksums.

Each file is a run of DCP-compatible blobs (``blob.BlobTemplate`` around the raw bytes),
written straight from the slot through a zero-copy view.  The crc32 of each blob is
computed as the bytes go out, on a helper thread for large tensors, so a file costs
max(write, crc) rather than their sum.  This module knows nothing of commits or naming
beyond the shard file names.
"""

from __future__ import annotations

import errno
import io
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import torch

from . import layout
from .blob import BlobTemplate, TensorSlot, raw_bytes
from .manifest import Chunk
from .storage import Storage, retrying, wrap_os_error

__all__ = ["write_shards", "write_small"]

_WRITE_CHUNK = 64 << 20  # bound single write() calls; large enough for sequential throughput
_CRC_ASIDE = 4 << 20  # writes at least this large compute their crc on a helper thread


class _CrcAside(threading.Thread):
    """crc32 of a buffer on its own thread (zlib releases the GIL), joined by the writer."""

    def __init__(self, mv: memoryview, start: int) -> None:
        super().__init__(name="asyncckpt-crc", daemon=True)
        self.mv, self.value = mv, start
        self.start()

    def run(self) -> None:
        self.value = zlib.crc32(self.mv, self.value)


class _ChecksumWriter(io.RawIOBase):
    """A write-only stream that tracks its position and a running crc32 of a blob."""

    def __init__(self, raw: BinaryIO, path: str) -> None:
        self.raw = raw
        self.path = path
        self.pos = 0
        self.crc = 0
        # torch.save's C++ writer replaces an exception raised here by an opaque
        # RuntimeError ("unexpected pos"); keep the real one (ENOSPC, EIO) to re-raise.
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        # a tensor's bytes: the crc runs on another core while this thread writes (both
        # release the GIL), so the write costs max(write, crc) rather than their sum
        crc = _CrcAside(mv, self.crc) if n >= _CRC_ASIDE else None
        if crc is None:
            self.crc = zlib.crc32(mv, self.crc)
        done = 0
        try:
            while done < n:
                w = self.raw.write(mv[done : done + _WRITE_CHUNK])
                if w is None or w <= 0:
                    raise OSError(errno.EIO, "short write")
                done += w
        except OSError as e:
            self.error = wrap_os_error("write", self.path, e)
            self.error.__cause__ = e
            raise self.error from e
        except BaseException as e:
            self.error = e
            raise
        finally:
            if crc is not None:
                crc.join()
                self.crc = crc.value
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.raw.flush()


def _split(entries: Sequence[TensorSlot], n: int) -> list[list[TensorSlot]]:
    """Greedy size balancing into ``n`` files; each file keeps buffer order for locality."""
    bins: list[list[TensorSlot]] = [[] for _ in range(max(1, min(n, len(entries))))]
    sizes = [0] * len(bins)
    for e in sorted(entries, key=lambda e: -e.nbytes):
        i = sizes.index(min(sizes))
        bins[i].append(e)
        sizes[i] += e.nbytes
    return [sorted(b, key=lambda e: e.offset) for b in bins if b]


def _write_file(
    storage: Storage,
    path: str,
    name: str,
    entries: Sequence[TensorSlot],
    buffer: torch.Tensor,
    templates: dict[str, BlobTemplate],
) -> tuple[dict[str, Chunk], int]:
    f = storage.open_write(path)
    w = _ChecksumWriter(f, path)
    chunks: dict[str, Chunk] = {}
    try:
        for e in entries:
            t = templates[e.fqn]
            start = w.pos
            w.crc = 0
            w.write(t.prefix)
            w.write(raw_bytes(buffer, e))
            w.write(t.suffix)
            chunks[e.fqn] = Chunk(
                offsets=[0] * len(e.shape),
                sizes=list(e.shape),
                file=name,
                offset=start,
                length=w.pos - start,
                data_offset=start + len(t.prefix),
                nbytes=e.nbytes,
                crc32=w.crc,
            )
        storage.finish_write(f, path, w.pos)
    except BaseException:  # a failed completion too: an object store aborts the multipart upload
        storage.abort_write(f)
        raise
    return chunks, w.pos


def _write_file_retrying(storage: Storage, *args: Any) -> tuple[dict[str, Chunk], int]:
    """``_write_file``, retried with backoff on transient errors (the slot still holds the data)."""
    return retrying(storage, lambda: _write_file(storage, *args))


def write_shards(
    storage: Storage,
    directory: str,
    entries: Sequence[TensorSlot],
    buffer: torch.Tensor,
    rank: int,
    pool: ThreadPoolExecutor | None,
    n_files: int,
    templates: dict[str, BlobTemplate],
) -> tuple[dict[str, Chunk], dict[str, dict[str, int]]]:
    """Write this rank's tensors into ``n_files`` shard files (in parallel on ``pool``)."""
    groups = _split(entries, n_files)
    names = [layout.shard_filename(rank, i) for i in range(len(groups))]
    args = [(storage, layout.join(directory, n), n, g, buffer, templates) for n, g in zip(names, groups)]
    if pool is not None and len(groups) > 1:
        results = list(pool.map(lambda a: _write_file_retrying(*a), args))
    else:
        results = [_write_file_retrying(*a) for a in args]
    chunks: dict[str, Chunk] = {}
    files: dict[str, dict[str, int]] = {}
    for name, (c, size) in zip(names, results):
        chunks.update(c)
        files[name] = {"size": size}
    return chunks, files


def write_small(storage: Storage, path: str, data: bytes) -> dict[str, int]:
    """Write a small file durably; returns its size and crc32 for the manifest."""
    f = storage.open_write(path)
    try:
        _ChecksumWriter(f, path).write(data)
        storage.finish_write(f, path, len(data))
    except BaseException:
        storage.abort_write(f)
        raise
    return {"size": len(data), "crc32": zlib.crc32(data)}
