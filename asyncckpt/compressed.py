"""Compressed shard files: asyncckpt's own record format, both directions.

With ``WriterOptions(compression=...)`` a shard file is the concatenation of one *record* per
tensor, in the file image's order.  A record is::

    chunk 0 | chunk 1 | ... | chunk n-1 | index (n x 16 bytes) | footer (32 bytes)

- The tensor's raw little-endian bytes are cut into fixed ``chunk_size`` pieces (4 MiB; the
  last may be shorter).  Each is stored compressed (a blosc2 chunk: shuffled by element size,
  then LZ4 or ZSTD) or, when that saves less than 5%, raw.
- Index entry ``i`` (little-endian u32s): stored length, flags (0 raw, 1 compressed), the
  checksum of the stored bytes and the checksum of the raw bytes.
- Footer: ``b"ACKZ"``, version u8 (1), codec id u8 (1 = blosc2), element size u16, chunk
  size u32, chunk count u32, raw byte count u64, checksum of the index u32, checksum of the
  footer's first 28 bytes u32.

Checksums use the manifest chunk's algorithm (CRC-32C where available).  The manifest
records each record's extent (``offset``, ``length``; ``data_offset == offset``), the raw
byte count ``nbytes``, the codec name, and the checksum of the whole record, so damage is
found before anything is decompressed, and the raw checksums catch anything after.

The index trails the chunks so the writer can stream: chunks are compressed on a thread
pool (the C code releases the GIL) a few ahead of the write, and written in order as they
complete; memory stays at a few chunks per file, never a compressed copy of the file.
Stock ``dcp.load`` cannot read these files; asyncckpt loads them, and ``asyncckpt export``
turns them into plain DCP or safetensors.
"""

from __future__ import annotations

import ctypes
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .checksum import checksum
from .codec import Codec, decoder, encoder
from .errors import CorruptCheckpointError
from .manifest import Chunk
from .storage import DirectStreams, Storage, write_fully

__all__ = ["CHUNK_SIZE", "Compressor", "write_compressed_file", "read_record_into"]

CHUNK_SIZE = 4 << 20  # a multiple of every element size; ratio is flat above 1 MiB
MIN_GAIN = 1.05  # a chunk is stored compressed only when that saves at least ~5%
_SMALL = 256  # chunks shorter than this are stored raw (a blosc2 header alone is 32 bytes)
MAGIC = b"ACKZ"
VERSION = 1
CODEC_IDS = {"blosc2": 1}
_FOOT = struct.Struct("<4sBBHIIQI")  # 28 bytes, then the footer's own checksum
FOOTER = _FOOT.size + 4
_ENTRY = struct.Struct("<IIII")  # stored length, flags, stored checksum, raw checksum
_RAW, _CODEC = 0, 1
_READ_WINDOW = 32 << 20  # a reader holds at most this much of a record's stored bytes

Pace = Callable[[int], None]


def _mem(address: int, n: int) -> memoryview:
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


class Compressor:
    """A codec and the thread pool that runs it; owned by an executor, one per writer."""

    def __init__(
        self,
        codec: Codec,
        threads: int,
        chunk_size: int = CHUNK_SIZE,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.codec = codec
        self.threads = threads
        self.chunk_size = chunk_size
        self.pool = ThreadPoolExecutor(threads, "asyncckpt-compress", initializer=initializer)

    @classmethod
    def for_options(
        cls,
        compression: str | None,
        level: int | None,
        threads: int,
        initializer: Callable[[], None] | None = None,
    ) -> Compressor | None:
        """The compressor ``WriterOptions`` asks for, or None when compression is off."""
        if compression is None:
            return None
        return cls(encoder(compression, level), threads, initializer=initializer)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def encode(self, raw: memoryview, typesize: int, algo: str) -> tuple[int, Any, int, int]:
        """(flags, stored bytes, stored checksum, raw checksum) of one chunk."""
        raw_crc = checksum(algo, raw)
        if raw.nbytes >= _SMALL:
            enc = self.codec.encode(raw, typesize)
            if len(enc) * MIN_GAIN <= raw.nbytes:
                return _CODEC, enc, checksum(algo, enc), raw_crc
        return _RAW, raw, raw_crc, raw_crc


def _tail(
    entries: list[tuple[int, int, int, int]],
    codec: str,
    typesize: int,
    chunk_size: int,
    nbytes: int,
    algo: str,
) -> bytes:
    index = b"".join(_ENTRY.pack(*e) for e in entries)
    foot = _FOOT.pack(MAGIC, VERSION, CODEC_IDS[codec], typesize, chunk_size, len(entries), nbytes,
                      checksum(algo, index))  # fmt: skip
    return index + foot + struct.pack("<I", checksum(algo, foot))


def write_compressed_file(
    storage: Storage,
    path: str,
    name: str,
    tensors: list[tuple[str, torch.dtype, tuple[int, ...], int, int]],
    buffer: torch.Tensor,
    comp: Compressor,
    algo: str,
    pace: Pace | None = None,
) -> tuple[dict[str, Chunk], int]:
    """Write one compressed shard file: a record per tensor ``(fqn, dtype, shape, slot
    offset, nbytes)``, in order.  Returns the manifest chunks and the file's size."""
    cs = comp.chunk_size
    tasks = [
        (_mem(buffer.data_ptr() + off + a, min(cs, nbytes - a)), dtype.itemsize)
        for _, dtype, _, off, nbytes in tensors
        for a in range(0, nbytes, cs)
    ]
    todo = iter(tasks)
    pending: deque[Future[tuple[int, Any, int, int]]] = deque()
    window = 2 * comp.threads + 2

    def next_result() -> tuple[int, Any, int, int]:
        while len(pending) < window and (t := next(todo, None)) is not None:
            pending.append(comp.pool.submit(comp.encode, t[0], t[1], algo))
        return pending.popleft().result()

    chunks: dict[str, Chunk] = {}
    # local disks: O_DIRECT through a bounce buffer (no page cache to fill and write back)
    f = storage.open_direct(path) if isinstance(storage, DirectStreams) else storage.open_write(path)
    try:
        pos = 0
        for fqn, dtype, shape, _, nbytes in tensors:
            start, crc, entries = pos, 0, []
            for _ in range(0, nbytes, cs):
                flags, stored, s_crc, r_crc = next_result()
                write_fully(f, stored, path, pace)
                crc = checksum(algo, stored, crc)
                n = memoryview(stored).nbytes
                entries.append((n, flags, s_crc, r_crc))
                pos += n
            tail = _tail(entries, comp.codec.name, dtype.itemsize, cs, nbytes, algo)
            write_fully(f, tail, path)
            crc = checksum(algo, tail, crc)
            pos += len(tail)
            chunks[fqn] = Chunk(
                offsets=[0] * len(shape), sizes=list(shape), file=name, offset=start,
                length=pos - start, data_offset=start, nbytes=nbytes, crc=crc, algo=algo,
                codec=comp.codec.name,
            )  # fmt: skip
        storage.finish_write(f, path, pos)
    except BaseException:
        # chunks still compressing read the slot: wait for them before the slot may be reused
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()
        storage.abort_write(f)
        raise
    return chunks, pos


# --------------------------------------------------------------------------- reading


def _read_exact(f: Any, n: int, where: str) -> memoryview:
    buf = memoryview(bytearray(n))
    done = 0
    while done < n:
        got = f.readinto(buf[done:])
        if not got:
            raise CorruptCheckpointError(
                f"{where}: file ended inside a compressed record; the shard is truncated"
            )
        done += got
    return buf


def _parse_tail(f: Any, chunk: Chunk, where: str) -> tuple[bytes, list[tuple[int, int, int, int]], int]:
    """The record's index and footer bytes, the index entries and the chunk size, checked."""

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: compressed record {what}; the file is corrupt")

    if chunk.length < FOOTER:
        raise bad("is shorter than its footer")
    end = chunk.offset + chunk.length
    f.seek(end - FOOTER)
    foot = bytes(_read_exact(f, FOOTER, where))
    if struct.unpack_from("<I", foot, _FOOT.size)[0] != checksum(chunk.algo, foot[: _FOOT.size]):
        raise bad("footer fails its checksum")
    magic, version, codec_id, typesize, cs, n, nbytes, index_crc = _FOOT.unpack_from(foot)
    if magic != MAGIC or version != VERSION:
        raise bad(f"has an unknown footer ({magic!r} version {version})")
    if codec_id != CODEC_IDS.get(chunk.codec or ""):
        raise bad(f"names codec id {codec_id}, the manifest says {chunk.codec!r}")
    if nbytes != chunk.nbytes or cs < 1 or n != -(-nbytes // cs) or _ENTRY.size * n + FOOTER > chunk.length:
        raise bad(f"footer does not match the manifest ({nbytes} bytes in {n} chunks of {cs})")
    f.seek(end - FOOTER - _ENTRY.size * n)
    index = bytes(_read_exact(f, _ENTRY.size * n, where))
    if checksum(chunk.algo, index) != index_crc:
        raise bad("index fails its checksum")
    entries = [_ENTRY.unpack_from(index, i * _ENTRY.size) for i in range(n)]
    if sum(e[0] for e in entries) != chunk.length - FOOTER - len(index):
        raise bad("index does not tile the record")
    for i, (stored, flags, _, _) in enumerate(entries):
        raw = min(cs, nbytes - i * cs)
        if flags not in (_RAW, _CODEC) or (flags == _RAW and stored != raw):
            raise bad(f"chunk {i} has a bad index entry")
    return index + foot, entries, cs


def read_record_into(
    f: Any, chunk: Chunk, out: memoryview, where: str, pool: ThreadPoolExecutor | None = None
) -> None:
    """Read ``chunk``'s compressed record from ``f`` (``seek`` and ``readinto``) and decode it
    straight into ``out`` (``chunk.nbytes`` writable bytes), checking every checksum: the
    record's (from the manifest), each stored chunk's before decoding, each raw chunk's after.
    Chunks are decoded on ``pool`` when given."""
    codec = decoder(chunk.codec or "")
    tail, entries, cs = _parse_tail(f, chunk, where)
    f.seek(chunk.offset)
    crc, i = 0, 0
    while i < len(entries):
        j, size = i, 0
        while j < len(entries) and (j == i or size + entries[j][0] <= _READ_WINDOW):
            size += entries[j][0]
            j += 1
        data = _read_exact(f, size, where)
        crc = checksum(chunk.algo, data, crc)
        jobs, at = [], 0
        for k in range(i, j):
            stored = data[at : at + entries[k][0]]
            args = (
                codec,
                stored,
                entries[k],
                out[k * cs : min(len(out), (k + 1) * cs)],
                chunk.algo,
                f"{where} chunk {k}",
            )
            if pool is None:
                _decode(*args)
            else:
                jobs.append(pool.submit(_decode, *args))
            at += entries[k][0]
        errors = [e for e in (fut.exception() for fut in jobs) if e is not None]  # all done first
        if errors:
            raise errors[0]
        i = j
    crc = checksum(chunk.algo, tail, crc)
    if crc != chunk.crc:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch ({chunk.algo} {crc:#010x}, manifest says {chunk.crc:#010x}); "
            "the file is corrupt"
        )


def _decode(codec: Codec, stored: memoryview, entry: tuple[int, int, int, int], out: memoryview,
            algo: str, where: str) -> None:  # fmt: skip
    _, flags, s_crc, r_crc = entry
    if checksum(algo, stored) != s_crc:
        raise CorruptCheckpointError(f"{where}: stored bytes fail their checksum; the file is corrupt")
    if flags == _RAW:
        out[:] = stored
    else:
        try:
            if codec.decoded_size(stored) != out.nbytes:
                raise ValueError("wrong decoded size")
            codec.decode_into(stored, out)
        except ValueError as e:
            raise CorruptCheckpointError(f"{where}: cannot be decompressed ({e}); the file is corrupt") from e
    if checksum(algo, out) != r_crc:
        raise CorruptCheckpointError(f"{where}: decompressed bytes fail their checksum; the file is corrupt")
