"""The DCP-compatible byte format, both directions, and DCP metadata from the manifest.

A shard item is one ``torch.save`` blob per tensor (what stock ``FileSystemReader`` reads):
``prefix + raw tensor bytes + suffix``.  The prefix and suffix come from one real
``torch.save`` per dtype and shape (a :class:`BlobTemplate`), so a save writes the raw bytes
straight from the staging slot with no pickling.  Reading takes the raw bytes back out by the
offsets recorded in the manifest and checks the blob's crc32; the pickles inside are never
parsed.
"""

from __future__ import annotations

import ctypes
import io
import struct
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .checksum import checksum
from .compressed import read_record_into
from .errors import CorruptCheckpointError
from .manifest import Chunk, TensorEntry

__all__ = [
    "TensorSlot",
    "host_alias",
    "BlobTemplate",
    "blob_template",
    "blob_templates",
    "raw_bytes",
    "read_chunk_into",
    "dcp_metadata",
]


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a slot buffer."""

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def host_alias(buffer: torch.Tensor, entry: TensorSlot) -> torch.Tensor:
    """A tensor over ``entry``'s bytes whose storage is exactly those bytes.

    ``torch.save`` of a view would write the whole underlying storage; this alias has a
    storage of its own (not owning the memory), so only the tensor's bytes are written and
    nothing is copied.  ``buffer`` must outlive the alias.
    """
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    raw = (ctypes.c_char * entry.nbytes).from_address(buffer.data_ptr() + entry.offset)
    flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(entry.dtype).view(entry.shape)


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
    stock DCP loads.  The zip's crc32 fields of the data record (local header, data
    descriptor, central directory) are zeroed (torch.load does not check them); asyncckpt's own crc32 covers the whole blob.  Building it once per staging
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
    if suffix[:4] == b"PK\x07\x08":  # a data descriptor right after the data: its crc32 too
        struct.pack_into("<I", suffix, 4, 0)
    return BlobTemplate(bytes(prefix), bytes(suffix))


def blob_templates(entries: Sequence[TensorSlot], buffer: torch.Tensor) -> dict[str, BlobTemplate]:
    """Templates for every entry of a plan (built once per plan, in the writer)."""
    return {e.fqn: blob_template(host_alias(buffer, e)) for e in entries}


def raw_bytes(buffer: torch.Tensor, e: TensorSlot) -> memoryview:
    """A zero-copy view of ``e``'s bytes in a staging buffer."""
    if e.nbytes == 0:
        return memoryview(b"")
    raw = (ctypes.c_char * e.nbytes).from_address(buffer.data_ptr() + e.offset)
    return memoryview(raw).cast("B")


def dcp_metadata(
    tensors: dict[str, TensorEntry], paths: dict[str, tuple[str | int, ...]] | None = None
) -> Metadata:
    """DCP ``Metadata`` for the manifest's tensors.

    With ``paths`` (the state's DCP planner paths) it is the stock ``.metadata`` written beside
    the shards, so plain ``dcp.load`` works; without, it is what asyncckpt's own reader hands
    to DCP's planner (built from the manifest's JSON: the ``.metadata`` pickle is never read).
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md: dict[str, Any] = {}
    storage_data = {}
    for fqn, t in tensors.items():
        chunks = []
        for i, c in enumerate(t.chunks):
            chunks.append(ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
            storage_data[MetadataIndex(fqn, c.offsets, i)] = _StorageInfo(c.file, c.offset, c.length)
        md[fqn] = TensorStorageMetadata(TensorProperties(dtype=t.torch_dtype), torch.Size(t.shape), chunks)
    if paths is None:
        return Metadata(state_dict_metadata=md, storage_meta=StorageMeta())
    return Metadata(
        state_dict_metadata=md,
        planner_data={k: paths.get(k, (k,)) for k in tensors},
        storage_data=storage_data,
        storage_meta=StorageMeta(save_id=uuid.uuid4().hex),
        version="1.0.0",
    )


# --------------------------------------------------------------------------- reading


_READ_CHUNK = 64 << 20
# a blob is read and checksummed in pieces this big, each checked while it is still in the
# CPU cache: one trip through memory instead of two (a 32 MiB range: 4.7 against 5.7 ms)
_CHECK_PIECE = 1 << 20


def _readinto(f: Any, target: memoryview, where: str) -> None:
    done, n = 0, target.nbytes
    while done < n:
        got = f.readinto(target[done : min(n, done + _READ_CHUNK)])
        if not got:
            raise CorruptCheckpointError(
                f"{where}: file ended after {done} of {n} bytes; the shard is truncated"
            )
        done += got


def _read_exact(f: Any, n: int, where: str) -> bytes:
    buf = bytearray(n)
    _readinto(f, memoryview(buf), where)
    return bytes(buf)


def read_chunk_into(f: Any, chunk: Chunk, out: torch.Tensor, where: str, pool: Any = None) -> None:
    """Read ``chunk``'s blob: raw bytes into contiguous CPU ``out``, crc over the whole blob.

    A compressed record (``chunk.codec``) is decoded straight into ``out`` instead, its
    chunks on ``pool`` (a ``ThreadPoolExecutor``) when given.  A differential chunk
    (``chunk.parts``) is read from ``f``, a ``chunkstore.PartSource``."""
    if (
        out.device.type != "cpu"
        or not out.is_contiguous()
        or out.numel() * out.element_size() != chunk.nbytes
    ):
        raise ValueError(
            f"{where}: read target must be a contiguous CPU tensor of {chunk.nbytes} bytes, got "
            f"{out.device} {list(out.shape)} {out.dtype}"
        )
    if chunk.codec is not None or chunk.parts is not None:
        mv = (
            memoryview((ctypes.c_char * chunk.nbytes).from_address(out.data_ptr())).cast("B")
            if chunk.nbytes
            else memoryview(bytearray())
        )
        if chunk.parts is not None:
            f.read_parts(chunk, mv, where)
        else:
            read_record_into(f, chunk, mv, where, pool)
        return
    head_len = chunk.data_offset - chunk.offset
    tail_len = chunk.offset + chunk.length - chunk.data_offset - chunk.nbytes
    f.seek(chunk.offset)
    crc = checksum(chunk.algo, _read_exact(f, head_len, where))
    if chunk.nbytes:
        raw = (ctypes.c_char * chunk.nbytes).from_address(out.data_ptr())
        mv = memoryview(raw).cast("B")
        for at in range(0, chunk.nbytes, _CHECK_PIECE):
            piece = mv[at : at + _CHECK_PIECE]
            _readinto(f, piece, where)
            crc = checksum(chunk.algo, piece, crc)  # while the piece is still in the cache
    crc = checksum(chunk.algo, _read_exact(f, tail_len, where), crc)
    if crc != chunk.crc:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch ({chunk.algo} {crc:#010x}, manifest says {chunk.crc:#010x}); "
            "the file is corrupt"
        )
