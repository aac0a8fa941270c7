"""Write one staged snapshot to one location, and commit it.

The writer knows nothing of policies or naming beyond what it is handed.  Shard files are
DCP-compatible: each tensor is a ``torch.save`` blob (what stock ``FileSystemReader`` reads),
written straight from the staging buffer through an alias (no copy), with a crc32 of every
blob computed on the fly as the bytes go out.  A stock ``.metadata`` is written for plain
``dcp.load``; asyncckpt itself only reads ``manifest.json``, which is written last.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import logging
import pickle
import struct
import threading
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
from .handle import CheckpointInfo
from .manifest import Chunk, Manifest, TensorEntry, dtype_name
from .staging import TensorSlot, host_alias
from .storage import Storage, retrying, wrap_os_error

__all__ = [
    "WriteJob",
    "WriteOutcome",
    "WriteAborted",
    "BlobTemplate",
    "blob_templates",
    "write_and_commit",
    "write_shards",
]

log = logging.getLogger("asyncckpt")

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
    tier: str = "permanent"
    remote: str | None = None
    # several ranks: where each staged tensor sits in its global tensor, and the global shapes
    chunk_offsets: dict[str, tuple[int, ...]] = field(default_factory=dict)
    global_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    run_id: str = ""
    commit_timeout: float = 600.0


@dataclass
class WriteOutcome:
    """What a committed step produced (small and picklable: it crosses process boundaries)."""

    info: CheckpointInfo
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


_HOLE_MIN = 4096  # writes this large inside torch.save are tensor data, never zip headers


class _SparseSink:
    """Captures what torch.save writes, keeping small writes and only the length of big ones.

    Building a blob template must not hold a second full copy of a multi-GiB tensor: the
    big writes are the tensor's bytes, which the template does not need.
    """

    def __init__(self) -> None:
        self.pos = 0
        self.segments: list[tuple[int, bytes | int]] = []

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        self.segments.append((self.pos, n if n >= _HOLE_MIN else mv.tobytes()))
        self.pos += n
        return n

    def flush(self) -> None:
        pass

    def read_range(self, start: int, n: int) -> bytes:
        out = bytearray(n)
        for seg_start, data in self.segments:
            if isinstance(data, int):
                continue
            lo, hi = max(start, seg_start), min(start + n, seg_start + len(data))
            if lo < hi:
                out[lo - start : hi - start] = data[lo - seg_start : hi - seg_start]
        return bytes(out)

    def holes(self) -> list[tuple[int, int]]:
        return [(s, s + d) for s, d in self.segments if isinstance(d, int)]


class _SinkReader(io.RawIOBase):
    """A read-only file view of a ``_SparseSink`` (holes read as zeros), for zipfile."""

    def __init__(self, sink: _SparseSink) -> None:
        self.sink, self.pos = sink, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = max(0, {0: 0, 1: self.pos, 2: self.sink.pos}[whence] + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.sink.pos - self.pos if n is None or n < 0 else min(n, self.sink.pos - self.pos)
        data = self.sink.read_range(self.pos, max(0, n))
        self.pos += len(data)
        return data


@dataclass(frozen=True)
class BlobTemplate:
    """The bytes ``torch.save`` writes around one tensor's data, for a given dtype and shape.

    A shard item is ``prefix + raw tensor bytes + suffix``: a valid ``torch.save`` zip that
    stock DCP loads.  The zip's crc32 field of the data record is zeroed (torch.load does not
    require it); asyncckpt's own crc32 covers the whole blob.  Building it once per staging
    plan turns every later save into three large sequential writes, with no pickling.
    """

    prefix: bytes
    suffix: bytes


def _zip_data_record(sink: _SparseSink, nbytes: int) -> tuple[int, int, int]:
    """(local header offset, data offset, central entry offset) of the storage record."""
    with zipfile.ZipFile(_SinkReader(sink)) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data" and info.file_size == nbytes:
                header = sink.read_range(info.header_offset, 30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                data_offset = info.header_offset + 30 + name_len + extra_len
                central = _central_entry(sink, z.start_dir, info.filename)
                return info.header_offset, data_offset, central
    raise RuntimeError("torch.save produced no storage record of the expected size")


def _central_entry(sink: _SparseSink, start_dir: int, name: str) -> int:
    pos = start_dir
    while True:
        head = sink.read_range(pos, 46)
        if struct.unpack_from("<I", head)[0] != 0x02014B50:
            raise RuntimeError(f"zip central directory entry for {name} not found")
        n, e, c = struct.unpack_from("<HHH", head, 28)
        if sink.read_range(pos + 46, n).decode() == name:
            return pos
        pos += 46 + n + e + c


def blob_template(alias: torch.Tensor) -> BlobTemplate:
    """Build the template for ``alias``'s dtype and shape from one real ``torch.save``."""
    nbytes = alias.numel() * alias.element_size()
    sink = _SparseSink()
    torch.save(alias, sink)  # type: ignore[arg-type]
    header, data_offset, central = _zip_data_record(sink, nbytes)
    if any(lo < data_offset or hi > data_offset + nbytes for lo, hi in sink.holes()):
        raise RuntimeError("unexpected torch.save layout: a large write outside the data record")
    prefix = bytearray(sink.read_range(0, data_offset))
    suffix = bytearray(sink.read_range(data_offset + nbytes, sink.pos - data_offset - nbytes))
    struct.pack_into("<I", prefix, header + 14, 0)  # local header crc32 of the data record
    struct.pack_into("<I", suffix, central - data_offset - nbytes + 16, 0)  # central entry crc32
    return BlobTemplate(bytes(prefix), bytes(suffix))


def blob_templates(entries: Sequence[TensorSlot], buffer: torch.Tensor) -> dict[str, BlobTemplate]:
    """Templates for every entry of a plan (built once per plan, in the writer)."""
    return {e.fqn: blob_template(host_alias(buffer, e)) for e in entries}


def _raw_bytes(buffer: torch.Tensor, e: TensorSlot) -> memoryview:
    if e.nbytes == 0:
        return memoryview(b"")
    raw = (ctypes.c_char * e.nbytes).from_address(buffer.data_ptr() + e.offset)
    return memoryview(raw).cast("B")


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
            w.write(_raw_bytes(buffer, e))
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
    except BaseException:
        storage.abort_write(f)  # an object store aborts the multipart upload
        raise
    storage.finish_write(f, path, w.pos)
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
        storage.abort_write(f)
        raise
    storage.finish_write(f, path, len(data))
    return {"size": len(data), "crc32": zlib.crc32(data)}


def write_and_commit(
    storage: Storage,
    job: WriteJob,
    pool: ThreadPoolExecutor | None,
    n_files: int,
    templates: dict[str, BlobTemplate],
    on_shards_written: Callable[[], None] | None = None,
    should_abort: Callable[[], bool] | None = None,
) -> WriteOutcome:
    """Write ``job`` and commit it with the manifest written last.

    POSIX (``storage.atomic_rename``): shards fsynced, ``.metadata``, ``manifest.json``
    fsynced, temp directory fsynced and renamed to its final name, root fsynced.  A crash
    before the rename leaves only a temp directory, which is never read and is swept at start.

    Object stores: everything is uploaded under the step's own prefix and ``manifest.json``
    goes last, only after every other upload was confirmed.  A crash before it leaves a
    prefix without a manifest, which readers ignore and ``asyncckpt gc`` removes.
    """
    t0 = time.perf_counter()
    final = layout.join(job.root, layout.step_dirname(job.step))
    # several ranks with a local-first tier: each rank commits its own shards as a piece in
    # its own local root; the uploader joins the pieces on the remote root (tiers.py)
    piece = job.world_size > 1 and job.remote is not None
    several = job.world_size > 1 and not piece
    own_bytes = 0
    if storage.atomic_rename:
        # ranks share one temp directory per step, named by the run id they agreed on
        name = f"{layout.step_dirname(job.step)}.{job.run_id}" if several else layout.tmp_dirname(job.step)
        tmp = layout.join(job.root, layout.TMP_DIR, name)
    else:
        tmp = final
        if storage.exists(layout.join(final, layout.MANIFEST)):
            from .errors import StepExistsError

            raise StepExistsError(f"step {job.step} is already committed at {final}")
    storage.makedirs(tmp)
    try:
        chunks, files = write_shards(
            storage, tmp, job.entries, job.buffer, job.rank, pool, n_files, templates
        )
        if on_shards_written is not None:
            on_shards_written()  # the staging slot may be reused from here on
        _check_abort(should_abort, job.step)
        t_written = time.perf_counter()
        for e in job.entries:
            if e.fqn in job.chunk_offsets:
                chunks[e.fqn].offsets = list(job.chunk_offsets[e.fqn])
        tensors = {
            e.fqn: TensorEntry(
                dtype=dtype_name(e.dtype),
                shape=list(job.global_shapes.get(e.fqn, e.shape)),
                chunks=[chunks[e.fqn]],
            )
            for e in job.entries
        }
        if several:
            write_done_record(storage, tmp, job.rank, tensors, files, job.run_id)
            if job.rank != 0:
                return _await_commit(storage, job, final, t0, t_written, files, should_abort)
            own_bytes = sum(f["size"] for f in files.values())
            tensors, files = gather_done_records(
                storage, tmp, job.step, job.world_size, job.commit_timeout, should_abort, job.run_id
            )
        manifest = Manifest(
            step=job.step,
            world_size=job.world_size,
            created_at=time.time(),
            tensors=tensors,
            files=files,
            state={} if piece else job.tree,  # a piece's tree may name other ranks' tensors
            metrics=job.metrics,
            library_version=job.library_version,
            torch_version=torch.__version__,
            remote=job.remote,
            piece=job.rank if piece else None,
        )
        write_manifest(storage, tmp, manifest, job.paths, should_abort)
        if storage.atomic_rename:
            storage.sync_dir(tmp)
            _check_abort(should_abort, job.step)
            storage.rename_dir(tmp, final)
            try:
                storage.sync_dir(job.root)
            except OSError as e:  # the step is committed (visible); only its rename's durability is in doubt
                log.warning("asyncckpt: step %d committed, but fsync of %s failed: %s", job.step, job.root, e)
    except BaseException:
        if not several or job.rank == 0:  # a shared step directory is only ever removed by rank 0
            try:
                storage.rmtree(tmp)
            except Exception:  # the original error matters more; the sweep at start retries
                pass
        raise
    t1 = time.perf_counter()
    info = CheckpointInfo.from_manifest(manifest, final, job.tier)
    return WriteOutcome(
        info=info,
        # this rank's own bytes (rank 0 of several ranks commits, but wrote only its shards)
        bytes_written=own_bytes if several else manifest.total_bytes,
        write_seconds=t1 - t0,
        commit_seconds=t1 - t_written,
    )


def write_manifest(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    paths: dict[str, tuple[str | int, ...]],
    should_abort: Callable[[], bool] | None = None,
) -> None:
    """DCP's ``.metadata`` (added to the manifest's files), then ``manifest.json``: the commit
    point on an object store, the last file before the rename on POSIX."""
    meta = pickle.dumps(dcp_metadata(manifest.tensors, paths))
    manifest.files[layout.DCP_METADATA] = _write_small(
        storage, layout.join(directory, layout.DCP_METADATA), meta
    )
    _check_abort(should_abort, manifest.step)
    _write_small(storage, layout.join(directory, layout.MANIFEST), manifest.to_json())


DONE_SUFFIX = ".done.json"


def write_done_record(
    storage: Storage,
    directory: str,
    rank: int,
    tensors: dict[str, TensorEntry],
    files: dict[str, dict[str, int]],
    run_id: str = "",
) -> None:
    """This rank's part of the manifest; written last by the rank, atomically.  ``run_id``
    (agreed by the ranks at construction) keeps a record left by an earlier, crashed run at
    the same step from being mistaken for this run's."""
    doc = {
        "rank": rank,
        "run_id": run_id,
        "files": files,
        "tensors": {
            k: {"dtype": t.dtype, "shape": t.shape, "chunks": [c.to_json() for c in t.chunks]}
            for k, t in tensors.items()
        },
    }
    path = layout.join(directory, f"__{rank}{DONE_SUFFIX}")
    data = json.dumps(doc).encode()
    if storage.atomic_rename:  # readers must never see half a record
        _write_small(storage, path + ".part", data)
        storage.rename_dir(path + ".part", path)
    else:
        _write_small(storage, path, data)  # an object PUT is atomic


def _poll(cond: Callable[[], Any], timeout: float, should_abort: Callable[[], bool] | None, step: int) -> Any:
    """Call ``cond`` with backoff until it returns something truthy; None on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        got = cond()
        if got:
            return got
        _check_abort(should_abort, step)
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


def gather_done_records(
    storage: Storage,
    directory: str,
    step: int,
    world_size: int,
    timeout: float,
    should_abort: Callable[[], bool] | None = None,
    run_id: str = "",
) -> tuple[dict[str, TensorEntry], dict[str, dict[str, int]]]:
    """Coordinator: wait for every rank's done record of this run and merge them."""
    records: dict[int, dict[str, Any]] = {}

    def collect() -> bool:
        for r in range(world_size):
            if r in records:
                continue
            path = layout.join(directory, f"__{r}{DONE_SUFFIX}")
            if storage.exists(path):
                try:
                    record = json.loads(storage.read_bytes(path))
                except (ValueError, OSError):
                    continue  # not fully visible yet
                if record.get("run_id", "") == run_id:  # else a crashed run's: wait for ours
                    records[r] = record
        return len(records) == world_size

    if not _poll(collect, timeout, should_abort, step):
        from .errors import CheckpointTimeoutError

        missing = sorted(set(range(world_size)) - set(records))
        raise CheckpointTimeoutError(
            f"step {step}: ranks {missing} did not finish writing within {timeout:.0f}s "
            "(crashed or stuck); the step is not committed. Check those ranks' logs, or raise "
            "commit_timeout for slow storage"
        )
    tensors: dict[str, TensorEntry] = {}
    files: dict[str, dict[str, int]] = {}
    for r in sorted(records):
        files.update(records[r]["files"])
        for fqn, t in records[r]["tensors"].items():
            entry = tensors.setdefault(fqn, TensorEntry(dtype=t["dtype"], shape=list(t["shape"]), chunks=[]))
            entry.chunks += [Chunk(**c) for c in t["chunks"]]
    for entry in tensors.values():
        entry.chunks.sort(key=lambda c: c.offsets)
    return tensors, files


def _await_commit(
    storage: Storage,
    job: WriteJob,
    final: str,
    t0: float,
    t_written: float,
    files: dict[str, dict[str, int]],
    should_abort: Callable[[], bool] | None,
) -> WriteOutcome:
    """A non-coordinating rank: its part is durable; wait for rank 0's manifest."""
    m = await_manifest(storage, final, job.step, job.commit_timeout, should_abort)
    t1 = time.perf_counter()
    info = CheckpointInfo.from_manifest(m, final, job.tier)
    mine = sum(f["size"] for f in files.values())
    return WriteOutcome(info=info, bytes_written=mine, write_seconds=t1 - t0, commit_seconds=t1 - t_written)


def await_manifest(
    storage: Storage, final: str, step: int, timeout: float, should_abort: Callable[[], bool] | None = None
) -> Manifest:
    manifest_path = layout.join(final, layout.MANIFEST)
    if not _poll(lambda: storage.exists(manifest_path), timeout, should_abort, step):
        from .errors import CheckpointTimeoutError

        raise CheckpointTimeoutError(
            f"step {step}: rank 0 did not commit within {timeout:.0f}s (crashed or "
            "stuck); this rank's shards are written but the step is not committed"
        )
    return Manifest.from_json(storage.read_bytes(manifest_path), manifest_path)


class WriteAborted(RuntimeError):
    """The writer was told to stop (its trainer died) before this step was committed."""


def _check_abort(should_abort: Callable[[], bool] | None, step: int) -> None:
    if should_abort is not None and should_abort():
        raise WriteAborted(f"save of step {step} aborted before commit: the trainer is gone")


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
