"""Write one staged snapshot to one location, and commit it.

The writer knows nothing of policies or naming beyond what it is handed.  Shard files are
DCP-compatible: each tensor is a ``torch.save`` blob (what stock ``FileSystemReader`` reads),
written straight from the staging buffer through an alias (no copy), with a crc32 of every
blob computed on the fly as the bytes go out.  A stock ``.metadata`` is written for plain
``dcp.load``; asyncckpt itself only reads ``manifest.json``, which is written last.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from . import layout
from .manifest import Chunk, Manifest, TensorEntry, dtype_name
from .staging import TensorSlot, host_alias
from .storage import Storage, wrap_os_error

__all__ = ["WriteJob", "WriteOutcome", "write_and_commit", "write_shards"]

_WRITE_CHUNK = 64 << 20  # bound single write() calls; large enough for sequential throughput


@dataclass
class WriteJob:
    """Everything the writer needs for one step; small apart from the buffer reference."""

    root: str
    step: int
    entries: Sequence[TensorSlot]
    buffer: torch.Tensor
    tree: dict[str, Any]
    paths: dict[str, tuple[str | int, ...]]
    metrics: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    library_version: str = ""


@dataclass
class WriteOutcome:
    """What a committed step produced."""

    step: int
    path: str
    manifest: Manifest
    bytes_written: int
    write_seconds: float
    commit_seconds: float


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
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.raw.flush()


class _RangeReader(io.RawIOBase):
    """A read-only view of [start, start+length) of a file descriptor (for zipfile)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        data = os.pread(self.fd, n, self.start + self.pos) if n > 0 else b""
        self.pos += len(data)
        return data


def _storage_data_offset(fd: int, start: int, length: int, nbytes: int) -> int:
    """Absolute file offset of the tensor's raw bytes inside a torch.save blob.

    The blob is a zip archive; its directory names the storage record.  Reading it back from
    the page cache costs a few small preads per tensor and keeps us independent of the exact
    layout torch uses for headers.
    """
    if nbytes == 0:
        return start + length
    with zipfile.ZipFile(_RangeReader(fd, start, length)) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data" and info.file_size == nbytes:
                header = os.pread(fd, 30, start + info.header_offset)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                return start + info.header_offset + 30 + name_len + extra_len
    raise RuntimeError("torch.save blob has no storage record of the expected size")


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
    storage: Storage, path: str, name: str, entries: Sequence[TensorSlot], buffer: torch.Tensor
) -> tuple[dict[str, Chunk], int]:
    f = storage.open_write(path)
    w = _ChecksumWriter(f, path)
    chunks: dict[str, Chunk] = {}
    rfd = os.open(path, os.O_RDONLY) if hasattr(f, "fileno") else -1
    try:
        for e in entries:
            start = w.pos
            w.crc = 0
            try:
                torch.save(host_alias(buffer, e), w)  # type: ignore[arg-type]
            except RuntimeError as exc:
                if w.error is not None:
                    raise w.error from exc
                raise
            length = w.pos - start
            f.flush()
            data_offset = _storage_data_offset(rfd, start, length, e.nbytes)
            chunks[e.fqn] = Chunk(
                offsets=[0] * len(e.shape),
                sizes=list(e.shape),
                file=name,
                offset=start,
                length=length,
                data_offset=data_offset,
                nbytes=e.nbytes,
                crc32=w.crc,
            )
    except BaseException:
        f.close()
        raise
    finally:
        if rfd >= 0:
            os.close(rfd)
    storage.finish_write(f)
    return chunks, w.pos


def write_shards(
    storage: Storage,
    directory: str,
    entries: Sequence[TensorSlot],
    buffer: torch.Tensor,
    rank: int,
    pool: ThreadPoolExecutor | None,
    n_files: int,
) -> tuple[dict[str, Chunk], dict[str, dict[str, int]]]:
    """Write this rank's tensors into ``n_files`` shard files (in parallel on ``pool``)."""
    groups = _split(entries, n_files)
    names = [layout.shard_filename(rank, i) for i in range(len(groups))]
    args = [(storage, layout.join(directory, n), n, g, buffer) for n, g in zip(names, groups)]
    if pool is not None and len(groups) > 1:
        results = list(pool.map(lambda a: _write_file(*a), args))
    else:
        results = [_write_file(*a) for a in args]
    chunks: dict[str, Chunk] = {}
    files: dict[str, dict[str, int]] = {}
    for name, (c, size) in zip(names, results):
        chunks.update(c)
        files[name] = {"size": size}
    return chunks, files


def dcp_metadata(tensors: dict[str, TensorEntry], paths: dict[str, tuple[str | int, ...]]) -> Metadata:
    """Stock DCP metadata equivalent to the manifest, so plain ``dcp.load`` works too."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md: dict[str, Any] = {}
    storage_data = {}
    for fqn, t in tensors.items():
        chunks = []
        for i, c in enumerate(t.chunks):
            chunks.append(ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
            storage_data[MetadataIndex(fqn, c.offsets, i)] = _StorageInfo(c.file, c.offset, c.length)
        md[fqn] = TensorStorageMetadata(TensorProperties(dtype=t.torch_dtype), torch.Size(t.shape), chunks)
    return Metadata(
        state_dict_metadata=md,
        planner_data={k: paths.get(k, (k,)) for k in tensors},
        storage_data=storage_data,
        storage_meta=StorageMeta(save_id=uuid.uuid4().hex),
        version="1.0.0",
    )


def _write_small(storage: Storage, path: str, data: bytes) -> dict[str, int]:
    f = storage.open_write(path)
    try:
        _ChecksumWriter(f, path).write(data)
    except BaseException:
        f.close()
        raise
    storage.finish_write(f)
    return {"size": len(data), "crc32": zlib.crc32(data)}


def write_and_commit(
    storage: Storage,
    job: WriteJob,
    pool: ThreadPoolExecutor | None,
    n_files: int,
    on_shards_written: Callable[[], None] | None = None,
) -> WriteOutcome:
    """Write ``job`` into a temp directory, then commit it with the manifest written last.

    Commit order: shards fsynced, ``.metadata``, ``manifest.json`` fsynced, temp directory
    fsynced and renamed to its final name, root fsynced.  A crash at any point before the
    rename leaves only a temp directory, which is never read and is swept at start.
    """
    t0 = time.perf_counter()
    tmp_root = layout.join(job.root, layout.TMP_DIR)
    tmp = layout.join(tmp_root, layout.tmp_dirname(job.step))
    final = layout.join(job.root, layout.step_dirname(job.step))
    storage.makedirs(tmp)
    try:
        chunks, files = write_shards(storage, tmp, job.entries, job.buffer, job.rank, pool, n_files)
        if on_shards_written is not None:
            on_shards_written()  # the staging slot may be reused from here on
        t_written = time.perf_counter()
        tensors = {
            e.fqn: TensorEntry(dtype=dtype_name(e.dtype), shape=list(e.shape), chunks=[chunks[e.fqn]])
            for e in job.entries
        }
        meta = pickle.dumps(dcp_metadata(tensors, job.paths))
        files[layout.DCP_METADATA] = _write_small(storage, layout.join(tmp, layout.DCP_METADATA), meta)
        manifest = Manifest(
            step=job.step,
            world_size=job.world_size,
            created_at=time.time(),
            tensors=tensors,
            files=files,
            state=job.tree,
            metrics=job.metrics,
            library_version=job.library_version,
            torch_version=torch.__version__,
        )
        _write_small(storage, layout.join(tmp, layout.MANIFEST), manifest.to_json())
        storage.sync_dir(tmp)
        storage.rename_dir(tmp, final)
        storage.sync_dir(job.root)
    except BaseException:
        try:
            storage.rmtree(tmp)
        except Exception:  # the original error matters more; the sweep at start retries
            pass
        raise
    t1 = time.perf_counter()
    return WriteOutcome(
        step=job.step,
        path=final,
        manifest=manifest,
        bytes_written=manifest.total_bytes,
        write_seconds=t1 - t0,
        commit_seconds=t1 - t_written,
    )


def encode_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Validate that metrics are a JSON object of plain values; returns a copy."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metrics key {k!r} must be a str")
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise TypeError(f"metrics[{k!r}] = {v!r} is not a JSON value") from None
        out[k] = v
    return out
