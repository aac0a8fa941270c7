"""Differential checkpoints: parts of tensors stored once and referenced by every step that
holds them.

With ``WriterOptions(incremental=True)`` a step writes no shard files.  Each tensor's raw
bytes are cut into parts of :data:`PART_SIZE`.  The writer hashes each part (xxh3-128) as it
reads the slot; a part whose content the writer's *parent* stored is referenced, not copied,
and every other part becomes one object under the kind root's ``.chunks/``, raw (straight
from the slot, ``O_DIRECT`` where the disk takes it) or compressed with the writer's codec.
The manifest lists each tensor's parts with both checksums, so reading checks exactly what
a compressed record's reader checks (``compressed._decode``).

Object names are ``<xxh3-128 hex>.<owner token>.<step>.<nonce>``: two saves never share a
name, so no save ever relies on an object it did not see committed.  The rules that keep
every committed step whole (the reasoning is in ``docs/design.md``):

- **Dedup only against the parent**: the last step *this writer* committed in this kind root
  since it started or last resumed, never against "an object like it exists".  The parent's
  objects are held by its manifest and by the pruner (:class:`Sweeper` ``hold``), so they
  outlive the save that reuses them even if someone deletes the parent step meanwhile.
- **Deletion by reference**: an object goes only when no committed manifest of its kind root
  references it, and either its owner is this live writer (then it is not held and its step
  is not in flight) or its owner is gone.  Objects of another live writer are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import layout
from .checksum import checksum
from .codec import decoder
from .errors import CorruptCheckpointError, StorageError
from .manifest import Chunk, Manifest, Part
from .storage import BufferReads, BufferWrites, Storage, retrying, write_stream

if TYPE_CHECKING:  # torch and the codecs load only where parts are written or read
    import torch

    from .compressed import Compressor

__all__ = [
    "PART_SIZE",
    "PartSource",
    "PartWriter",
    "object_name",
    "parse_object",
    "parts_of",
    "read_parts_into",
    "referenced",
    "unreferenced",
]

PART_SIZE = 4 << 20  # a multiple of every element size and of a page
_OBJECT_RE = re.compile(r"^([0-9a-f]{32})\.([0-9a-f]{16})\.(\d{1,20})\.([0-9a-f]{8})$")

Pace = Callable[[int], None]


def _digest(view: memoryview) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(view)


def object_name(digest: str, owner: str, step: int, nonce: str) -> str:
    """The store name of a part with content ``digest`` written by ``owner`` for ``step``."""
    return f"{digest}.{owner}.{step}.{nonce}"


def parse_object(name: str) -> tuple[str, int] | None:
    """(owner token, step) of a store object's name, or None for anything else."""
    m = _OBJECT_RE.match(name)
    return (m.group(2), int(m.group(3))) if m else None


def _mem(address: int, n: int) -> memoryview:
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


class PartWriter:
    """Writes differential chunks; one per writer (thread or process), like a Compressor.

    It remembers, per kind root, the parts of the last step it committed there (the parent),
    by content.  ``epoch`` changes on every resume: the parent is then dropped, because a
    rollback may abandon it, and the next save is whole.
    """

    def __init__(
        self,
        threads: int,
        compressor: Compressor | None = None,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.compressor = compressor
        self.pool = ThreadPoolExecutor(threads, "asyncckpt-parts", initializer=initializer)
        self._parents: dict[str, dict[str, Part]] = {}
        self._epoch: int | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def parent(self, root: str, epoch: int) -> dict[str, Part]:
        """The parts (by digest) that a save under ``root`` may reference instead of writing."""
        if epoch != self._epoch:
            self._parents.clear()
            self._epoch = epoch
        return self._parents.get(root, {})

    def committed(self, root: str, parts: dict[str, Part]) -> None:
        """A step under ``root`` with ``parts`` is committed: it is the next save's parent."""
        self._parents[root] = parts

    def write(
        self,
        storage: Storage,
        root: str,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...], int, int]],
        buffer: torch.Tensor,
        owner: str,
        step: int,
        epoch: int,
        algo: str,
        pace: Pace | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, Chunk], dict[str, Part], int]:
        """Store tensors ``(fqn, dtype, shape, slot offset, nbytes)`` of one step.

        Returns the manifest chunks, every part the step references (by digest: the next
        parent), and the bytes written.  Parts are hashed here, each as soon as ``ready``
        says its bytes are in the slot (the staging copy may still run), while the pool
        writes the new ones, so hashing hides behind the copy and the writes."""
        parent = self.parent(root, epoch)
        store = layout.chunk_store(root)
        storage.makedirs(store)
        nonce = uuid.uuid4().hex[:8]
        new: dict[str, Future[Part]] = {}
        refs: list[tuple[str, list[tuple[str, Part | Future[Part]]]]] = []
        try:
            for fqn, dtype, _, off, nbytes in sorted(tensors, key=lambda t: t[3]):  # slot order
                mine: list[tuple[str, Part | Future[Part]]] = []
                for a in range(0, nbytes, PART_SIZE):
                    if ready is not None:
                        ready(off + min(nbytes, a + PART_SIZE))
                    view = _mem(buffer.data_ptr() + off + a, min(PART_SIZE, nbytes - a))
                    digest = _digest(view)
                    got: Part | Future[Part] | None = parent.get(digest) or new.get(digest)
                    if got is None:
                        path = layout.join(store, object_name(digest, owner, step, nonce))
                        got = new[digest] = self.pool.submit(
                            self._put, storage, path, view, dtype.itemsize, algo, pace
                        )
                    mine.append((digest, got))
                refs.append((fqn, mine))
            done = {d: f.result() for d, f in new.items()}
        except BaseException:
            for f in new.values():  # parts still being written read the slot: wait for them
                f.cancel()
            for f in new.values():
                if not f.cancelled():
                    f.exception()
            # nothing references this save's parts: take them back now (a full disk must not
            # stay full of a failed save's parts until the next commit's sweep)
            for d, f in new.items():  # a failed one too: a short write may have left a file
                if not f.cancelled():
                    with contextlib.suppress(Exception):
                        storage.remove(layout.join(store, object_name(d, owner, step, nonce)))
            raise
        meta = {fqn: (shape, nbytes) for fqn, _, shape, _, nbytes in tensors}
        chunks: dict[str, Chunk] = {}
        step_parts: dict[str, Part] = {}
        codec = self.compressor.codec.name if self.compressor is not None else None
        for fqn, mine in refs:
            parts = [done[d] if isinstance(p, Future) else p for d, p in mine]
            step_parts.update((d, p) for (d, _), p in zip(mine, parts))
            shape, nbytes = meta[fqn]
            chunks[fqn] = Chunk(
                offsets=[0] * len(shape), sizes=list(shape), file="", offset=0,
                length=sum(p.stored for p in parts), data_offset=0, nbytes=nbytes, crc=0, algo=algo,
                codec=codec if any(p.flags for p in parts) else None, parts=parts, part_size=PART_SIZE,
            )  # fmt: skip
        return chunks, step_parts, sum(p.stored for p in done.values())

    def _put(
        self, storage: Storage, path: str, raw: memoryview, typesize: int, algo: str, pace: Pace | None
    ) -> Part:
        comp = self.compressor
        if comp is not None:
            flags, stored, s_crc, r_crc = comp.encode(raw, typesize, algo)
        else:
            flags, stored, s_crc, r_crc = 0, raw, *(2 * (checksum(algo, raw),))
        n = memoryview(stored).nbytes

        def put() -> None:
            if flags == 0 and isinstance(storage, BufferWrites):
                storage.write_file(path, raw, n, pace)  # O_DIRECT from the slot where it can
            else:
                write_stream(storage, path, stored, pace)

        retrying(storage, put)
        return Part(layout.parent(path)[1], n, flags, s_crc, r_crc)


# --------------------------------------------------------------------------- reading


def _missing(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or (isinstance(e, StorageError) and e.errno == errno.ENOENT)


def _read_part(
    storage: Storage, path: str, p: Part, out: memoryview, algo: str, codec: Any, where: str
) -> None:
    try:
        if p.flags == 0 and isinstance(storage, BufferReads):
            got = storage.read_into(path, 0, out)  # straight into the destination
            if got != out.nbytes:
                raise CorruptCheckpointError(
                    f"{where}: part {path} holds {got} of {out.nbytes} bytes; it is truncated"
                )
            if checksum(algo, out) != p.s_crc:
                raise CorruptCheckpointError(f"{where}: part {path} fails its checksum; the store is damaged")
            return
        with storage.open_read(path) as f:
            data = f.read(p.stored + 1)
    except (OSError, StorageError) as e:
        if _missing(e):
            raise CorruptCheckpointError(f"{where}: part {path} is missing from the chunk store") from e
        raise
    if len(data) != p.stored:
        raise CorruptCheckpointError(
            f"{where}: part {path} is {len(data)} bytes, the manifest says {p.stored}"
        )
    from .compressed import _decode

    _decode(codec, memoryview(data), p.entry(), out, algo, f"{where}: part {path}")


def read_parts_into(
    storage: Storage,
    store: str,
    chunk: Chunk,
    out: memoryview,
    where: str,
    pool: ThreadPoolExecutor | None,
    paths: dict[str, str] | None = None,
) -> None:
    """Read differential ``chunk``'s parts from ``store`` into ``out`` (``chunk.nbytes``
    writable bytes), checking each part's checksums; parts in parallel on ``pool``.
    ``paths``: where to open a part instead (a pinned descriptor's path), by name."""
    assert chunk.parts is not None
    codec = decoder(chunk.codec) if chunk.codec is not None else None
    ps = chunk.part_size
    paths = paths or {}
    jobs = [
        (
            storage,
            paths.get(p.name) or layout.join(store, p.name),
            p,
            out[i * ps : min(chunk.nbytes, (i + 1) * ps)],
            chunk.algo,
            codec,
            where,
        )
        for i, p in enumerate(chunk.parts)
    ]
    if pool is None or len(jobs) < 2:
        for job in jobs:
            _read_part(*job)
        return
    futures = [pool.submit(_read_part, *job) for job in jobs]
    errors = [e for e in (f.exception() for f in futures) if e is not None]  # all done first
    if errors:
        raise errors[0]


class PartSource:
    """What ``blob.read_chunk_into`` reads a differential chunk from: a kind root's chunk
    store, parts read in parallel on ``pool`` when given."""

    def __init__(
        self,
        storage: Storage,
        store: str,
        pool: ThreadPoolExecutor | None = None,
        paths: dict[str, str] | None = None,
    ) -> None:
        self.storage, self.store, self.pool, self.paths = storage, store, pool, paths

    def read_parts(self, chunk: Chunk, out: memoryview, where: str) -> None:
        read_parts_into(self.storage, self.store, chunk, out, where, self.pool, self.paths)

    def close(self) -> None:
        pass

    def __enter__(self) -> PartSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def store_of(step_dir: str) -> str:
    """The chunk store a step directory's parts live in (its kind root's)."""
    return layout.chunk_store(layout.parent(step_dir)[0])


def parts_of(manifest: Manifest) -> dict[str, int]:
    """Every store object a step references, with its stored size."""
    return {p.name: p.stored for t in manifest.tensors.values() for c in t.chunks for p in c.parts or ()}


def part_bytes(manifest: Manifest) -> tuple[int, int]:
    """(bytes of every part a step references, bytes of those it wrote itself)."""
    parts = parts_of(manifest)
    own = sum(n for name, n in parts.items() if (parse_object(name) or ("", -1))[1] == manifest.step)
    return sum(parts.values()), own


# --------------------------------------------------------------------------- deleting


def store_bytes(storage: Storage, store: str) -> tuple[int, int]:
    """(objects, bytes) in a chunk store: its real use of the disk."""
    names = storage.listdir(store)
    if not names:
        return 0, 0
    with ThreadPoolExecutor(16) as pool:  # one request each on an object store
        stats = list(pool.map(storage.stat, [layout.join(store, n) for n in names]))
    return len(names), sum(st.size for st in stats if st is not None and st.kind == "file")


def referenced(manifest: Manifest) -> set[str]:
    """The store objects a step references."""
    return set(parts_of(manifest))


def unreferenced(
    names: Iterable[str],
    live_refs: Collection[str],
    alive: Callable[[str], bool],
    me: str | None = None,
    held: Collection[str] = (),
    in_flight: Collection[int] = (),
    known: Collection[str] | None = None,
) -> list[str]:
    """The store objects (of ``names``) that may be deleted now.

    ``live_refs``: everything a committed manifest of the kind root references.  ``alive``:
    whether an owner token is a live writer.  ``me``: the deleting writer's own token, whose
    objects go unless ``held`` (its parent's) or written for a step ``in_flight``.  With
    ``known`` (several ranks, whose saves in flight the deleting rank cannot see; a remote
    tier, where uploads bring parts before their manifest), only objects that a committed
    step it saw once referenced go, whoever wrote them.  Names that are not store objects
    are left alone.
    """
    out = []
    for name in names:
        info = parse_object(name)
        if info is None or name in live_refs or name in held:
            continue
        owner, step = info
        if owner != me and alive(owner):
            continue  # another live writer's: never
        if known is not None:
            # parts may arrive before their manifest (another rank's save, an upload of a
            # dead run's step): only those a committed step once referenced may go
            if name in known:
                out.append(name)
        elif owner != me or step not in in_flight:
            out.append(name)
    return out
