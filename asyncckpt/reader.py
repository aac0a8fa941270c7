"""A DCP ``StorageReader`` that never unpickles.

Metadata is rebuilt from ``manifest.json``; tensor bytes are read raw, straight into the
destination tensor when the read covers a whole stored chunk, and their crc32 is verified in
the same pass.  The ``.metadata`` pickle and the pickles inside the blobs are never parsed, so
a hostile file can't run code.  Because this plugs into ``dcp.load``, DCP's planner does the
resharding when the live tensors are laid out differently from the saved chunks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader

from . import layout
from .blob import dcp_metadata, read_chunk_into
from .checksum import checksum
from .chunkstore import PartSource, store_of
from .errors import CorruptCheckpointError
from .file_layout import PAGE, round_up
from .manifest import Chunk, Manifest
from .storage import BufferReads, RangedReads, Storage

__all__ = ["ManifestReader", "coalesce", "pieces"]

_MEMMOVE_MIN = 1 << 16  # below this, the memoryview copy is as fast and needs no address


class _RangeFile:
    """A fetched byte range that reads like the file it came from (absolute offsets)."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.view = memoryview(data)
        # the bytes object's own buffer (CPython): copies out of it go through memmove
        self.addr = ctypes.cast(data, ctypes.c_void_p).value if type(data) is bytes else None  # type: ignore[arg-type]
        self.base = base
        self.pos = base

    def seek(self, pos: int) -> None:
        self.pos = pos

    def readinto(self, buf: Any) -> int:
        out = memoryview(buf).cast("B")
        start = self.pos - self.base
        n = max(0, min(out.nbytes, len(self.view) - start))
        if n >= _MEMMOVE_MIN and self.addr is not None and not out.readonly:
            # ctypes.memmove releases the GIL, a memoryview copy holds it: a tensor's worth of
            # copying (and page faults, into fresh shadow buffers) would stall every other
            # thread, the event loop receiving the other ranges among them
            ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(out)), self.addr + start, n)
        else:
            out[:n] = self.view[start : start + n]
        self.pos += n
        return n


class _WholeRead:
    """A whole-file read under way: its pieces' futures, and the call that waits for them and
    checks every blob (``ManifestReader._whole_file``)."""

    def __init__(
        self, extent: tuple[int, int], futures: list[Future[int]], finish: Callable[[], None]
    ) -> None:
        self.extent = extent  # (address, bytes) it overwrites
        self.futures = futures
        self._finish = finish

    def __call__(self) -> None:
        self._finish()


def pieces(total: int, piece: int) -> list[tuple[int, int]]:
    """``[0, total)`` as (start, end) spans of ``piece`` bytes, one request each; a tail shorter
    than a quarter piece rides with the span before it rather than costing a request of its
    own (a 256 MiB shard with its headers is 8 GETs of 32 MiB, not 8 and a ninth of 1 MB)."""
    starts = list(range(0, total, piece))
    if len(starts) > 1 and total - starts[-1] < piece // 4:
        starts.pop()
    return [(a, starts[i + 1] if i + 1 < len(starts) else total) for i, a in enumerate(starts)]


def coalesce(reqs: list[tuple[Chunk, Any]], limit: int) -> list[list[tuple[Chunk, Any]]]:
    """Group one file's blobs (sorted by offset) so that each group is one ranged GET: a
    blob joins the previous group when it starts within 64 KiB of the group's end and the
    group's span stays within ``limit`` bytes.  A blob larger than ``limit`` is a group of
    its own.  Fewer, larger GETs cost fewer requests (and, on servers that read the whole
    object per GET, far less work); the groups are still fetched concurrently."""
    groups: list[list[tuple[Chunk, Any]]] = []
    start = end = 0
    for chunk, req in sorted(reqs, key=lambda cr: cr[0].offset):
        c_end = chunk.offset + chunk.length
        if groups and chunk.offset - end <= 64 << 10 and max(end, c_end) - start <= limit:
            groups[-1].append((chunk, req))
            end = max(end, c_end)
        else:
            groups.append([(chunk, req)])
            start, end = chunk.offset, c_end
    return groups


class ManifestReader(StorageReader):
    """Reads one committed step described by ``manifest`` from ``directory``."""

    READ_CONCURRENCY = 8
    COALESCE_BYTES = 32 << 20  # neighbouring blobs share one read (one GET) up to this span
    PIECE = 16 << 20  # a whole-file read is this many bytes per request, READ_CONCURRENCY in flight
    MAX_GET = 256 << 20  # an object store's whole-file pieces grow with the load up to this
    DECODE_THREADS = 4  # compressed records: chunks decoded in parallel (the codec releases the GIL)

    def __init__(
        self,
        storage: Storage,
        directory: str,
        manifest: Manifest,
        progress: Any = None,
        region: tuple[int, int] | None = None,
        paths: dict[str, str] | None = None,
    ) -> None:
        """``region`` (address, bytes): memory the reader may overwrite as a whole, the
        staging slot holding the shadows.  A shard file whose blobs all land in it at their
        file offsets (the slot's layout is the file's: ``file_layout``) is read whole,
        straight into it."""
        super().__init__()
        self.storage = storage
        self.directory = directory
        self.manifest = manifest
        self.progress = progress  # called with the byte count of each blob read
        self.region = region
        self.paths = paths or {}  # file name -> where to open it (a pinned descriptor's path)
        self._chunks: dict[tuple[str, tuple[int, ...]], Chunk] = {
            (fqn, tuple(c.offsets)): c for fqn, t in manifest.tensors.items() for c in t.chunks
        }
        self.bytes_read = 0
        self._decode: ThreadPoolExecutor | None = None

    # -- StorageReader interface
    def reset(self, checkpoint_id: Any = None) -> None:
        self.bytes_read = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return dcp_metadata(self.manifest.tensors)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *a: Any, **k: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        by_file: dict[str, list[Any]] = {}
        for req in plan.items:
            idx: MetadataIndex = req.storage_index
            chunk = self._chunks.get((idx.fqn, tuple(idx.offset or ())))
            if chunk is None:
                raise CorruptCheckpointError(
                    f"{self.directory}: no stored chunk for {idx.fqn} at {list(idx.offset or ())}"
                )
            by_file.setdefault(chunk.file, []).append((chunk, req))
        differential = by_file.pop("", [])  # chunks whose parts lie in the chunk store
        if self.region is not None and isinstance(self.storage, BufferReads):
            # where every target lies: a file read whole must not overwrite another file's
            spans = {
                name: [(d.data_ptr(), d.numel() * d.element_size()) for d in self._dests(reqs, planner)]
                for name, reqs in by_file.items()
            }
            piece = self._piece(sum(int(self.manifest.files[n]["size"]) for n in by_file))
            with ThreadPoolExecutor(self.READ_CONCURRENCY, "asyncckpt-read") as pool:
                # every file's pieces are queued before the first is checked, so up to
                # READ_CONCURRENCY requests are in flight across files (an object store's
                # shards are a few pieces each)
                started: list[tuple[str, _WholeRead]] = []
                try:
                    for name in list(by_file):
                        others = [sp for other, sps in spans.items() if other != name for sp in sps]
                        others += [r.extent for _, r in started]  # files read at the same time
                        reading = self._whole_file(name, by_file[name], planner, pool, others, piece)
                        if reading is not None:
                            started.append((name, reading))
                    for name, reading in started:
                        reading()
                        del by_file[name]
                finally:  # a failed file: the others' reads end before their buffers are let go
                    for f in [f for _, r in started for f in r.futures]:
                        f.cancel()
        # Groups of neighbouring blobs, read concurrently: one ranged GET each on an object
        # store; on a local disk, each group reads straight into its tensors on its own file
        # handle, and the reads and checksums of different groups overlap (both release the GIL).
        jobs = [
            (name, group) for name, reqs in by_file.items() for group in coalesce(reqs, self.COALESCE_BYTES)
        ] + [("", [item]) for item in differential]
        parts_pool = ThreadPoolExecutor(self.READ_CONCURRENCY, "asyncckpt-parts") if differential else None

        def run(job: tuple[str, list[tuple[Chunk, Any]]]) -> None:
            name, group = job
            if not name:
                parts = PartSource(self.storage, store_of(self.directory), parts_pool, self.paths)
                for chunk, req in group:
                    self._read_one(parts, chunk, req, planner, f"{self.directory} ({req.storage_index.fqn})")
                return
            path, opened = layout.join(self.directory, name), self._path(name)
            if isinstance(self.storage, RangedReads):
                start, end = group[0][0].offset, max(c.offset + c.length for c, _ in group)
                src: Any = _RangeFile(self.storage.read_range(opened, start, end), start)
            else:
                src = self.storage.open_read(opened)
            try:
                for chunk, req in group:
                    self._read_one(src, chunk, req, planner, f"{path} ({req.storage_index.fqn})")
            finally:
                if not isinstance(src, _RangeFile):
                    src.close()

        compressed = any(c.codec for _, group in jobs for c, _ in group)
        self._decode = ThreadPoolExecutor(self.DECODE_THREADS, "asyncckpt-decode") if compressed else None
        try:
            with ThreadPoolExecutor(min(self.READ_CONCURRENCY, max(1, len(jobs)))) as pool:
                list(pool.map(run, jobs))
        finally:
            if self._decode is not None:
                self._decode.shutdown()
            if parts_pool is not None:
                parts_pool.shutdown()
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _path(self, name: str) -> str:
        return self.paths.get(name) or layout.join(self.directory, name)

    @staticmethod
    def _dests(reqs: list[tuple[Chunk, Any]], planner: LoadPlanner) -> list[torch.Tensor]:
        return [planner.resolve_tensor(req).detach() for _, req in reqs]

    def _piece(self, total: int) -> int:
        """Bytes per request of the whole-file reads of a load of ``total`` bytes.  A local
        disk reads ``PIECE`` at a time.  On an object store a GET costs a round trip and a
        request fee whatever its size, so pieces start at ``COALESCE_BYTES`` and grow with the
        load (up to ``MAX_GET``) to about two rounds of ``READ_CONCURRENCY`` GETs: as many in
        flight, fewer requests."""
        if not isinstance(self.storage, RangedReads):
            return self.PIECE
        return self.get_size(total)

    @classmethod
    def get_size(cls, total: int) -> int:
        """An object store's whole-file piece for a load of ``total`` bytes (see ``_piece``)."""
        want = total // (2 * cls.READ_CONCURRENCY) >> 20 << 20  # whole MiB
        return max(cls.COALESCE_BYTES, min(cls.MAX_GET, want))

    def _whole_file(
        self,
        name: str,
        reqs: list[tuple[Chunk, Any]],
        planner: LoadPlanner,
        pool: ThreadPoolExecutor,
        others: list[tuple[int, int]],
        piece: int,
    ) -> _WholeRead | None:
        """Start reading file ``name`` in one pass into the region when its blobs' targets sit
        there at their file offsets: its pieces are queued on ``pool`` and the returned call
        waits for them, checking each blob's checksum as soon as its bytes are in.  None
        (nothing read) when the targets are laid out otherwise, when the load does not want
        every blob of the file, or when the file's extent would reach another file's targets
        or a file being read (``others``: address, bytes)."""
        if self.region is None or not isinstance(self.storage, BufferReads):
            return None
        if any(chunk.codec for chunk, _ in reqs):  # compressed records never match the slot
            return None
        # every blob with bytes must be wanted (DCP asks for no empty tensors)
        in_file = {
            id(c) for t in self.manifest.tensors.values() for c in t.chunks if c.file == name and c.nbytes
        }
        if not in_file <= {id(c) for c, _ in reqs}:
            return None
        dtype = {fqn: t.torch_dtype for fqn, t in self.manifest.tensors.items()}
        base, dests = None, []
        for chunk, req in reqs:
            dest = planner.resolve_tensor(req).detach()
            if not (
                list(req.storage_offsets) == [0] * len(chunk.sizes)
                and list(req.lengths) == chunk.sizes
                and dest.device.type == "cpu"
                and dest.is_contiguous()
                and dest.dtype == dtype[req.storage_index.fqn]
                and list(dest.shape) == chunk.sizes
            ):
                return None
            at = dest.data_ptr() - chunk.data_offset if chunk.nbytes else None
            if at is not None:
                if base is not None and at != base:
                    return None
                base = at
            dests.append(dest)
        size = self.manifest.files[name]["size"]
        padded = round_up(size, PAGE)
        lo, n = self.region
        if base is None or base % PAGE or base < lo or base + padded > lo + n:
            return None
        if any(a < base + padded and base < a + k for a, k in others if k):
            return None
        path, opened = layout.join(self.directory, name), self._path(name)
        out = memoryview((ctypes.c_char * padded).from_address(base)).cast("B")
        spans = pieces(padded, piece)
        reads = [pool.submit(self.storage.read_into, opened, a, out[a:b]) for a, b in spans]

        def finish() -> None:
            pending = sorted(reqs, key=lambda cr: cr[0].offset)
            got = 0
            for (a, b), fut in zip(spans, reads):
                got = a + fut.result()
                if got < min(size, b):
                    raise CorruptCheckpointError(
                        f"{path}: file ended after {got} of {size} bytes; the shard is truncated"
                    )
                while pending and pending[0][0].offset + pending[0][0].length <= got:
                    chunk, req = pending.pop(0)  # checked while the next pieces are read
                    crc = checksum(chunk.algo, out[chunk.offset : chunk.offset + chunk.length])
                    if crc != chunk.crc:
                        raise CorruptCheckpointError(
                            f"{path} ({req.storage_index.fqn}): checksum mismatch ({chunk.algo} {crc:#010x}, "
                            f"manifest says {chunk.crc:#010x}); the file is corrupt"
                        )
            for (chunk, req), dest in zip(reqs, dests):
                self.bytes_read += chunk.length
                if self.progress is not None:
                    self.progress(chunk.length)
                planner.commit_tensor(req, dest)

        return _WholeRead((base, padded), reads, finish)

    def _read_one(self, f: Any, chunk: Chunk, req: Any, planner: LoadPlanner, where: str) -> None:
        dest = planner.resolve_tensor(req).detach()
        dtype = self.manifest.tensors[req.storage_index.fqn].torch_dtype
        whole = list(req.storage_offsets) == [0] * len(chunk.sizes) and list(req.lengths) == chunk.sizes
        direct = (
            whole
            and dest.device.type == "cpu"
            and dest.is_contiguous()
            and dest.dtype == dtype
            and list(dest.shape) == chunk.sizes
        )
        if direct:
            read_chunk_into(f, chunk, dest, where, self._decode)
        else:
            tmp = torch.empty(chunk.sizes, dtype=dtype)
            read_chunk_into(f, chunk, tmp, where, self._decode)
            src = tmp
            for dim, (off, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                src = src.narrow(dim, off, length)
            if dest.shape != src.shape:
                raise CorruptCheckpointError(
                    f"{where}: stored piece {list(src.shape)} does not fit target {list(dest.shape)}"
                )
            dest.copy_(src)
        self.bytes_read += chunk.length
        if self.progress is not None:
            self.progress(chunk.length)
        planner.commit_tensor(req, dest)
