"""The storage protocol, its optional capabilities, and helpers over them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar, runtime_checkable


@dataclass(frozen=True)
class Stat:
    """What :meth:`Storage.stat` knows of a path.

    Attributes:
        kind: ``"file"``, ``"dir"``, ``"link"`` (a symlink, never followed) or ``"other"``
            (a FIFO, a socket, a device: never opened).
        size: bytes, for a file; 0 otherwise.
        mtime: last modification, seconds since the epoch (the store's clock on object
            stores), or None where the backend does not say.
    """

    kind: str
    size: int = 0
    mtime: float | None = None


class Storage(Protocol):
    """What the pipeline needs from a storage backend.

    Attributes:
        retries: how often a whole unit (a file write, a ranged read) is retried after a
            transient error; the data is still at hand (in the staging slot, or unread).
    """

    retries: int

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents if the backend has directories; no-op otherwise."""
        ...

    def open_write(self, path: str) -> BinaryIO:
        """A new file for writing; never replaces an existing one where the backend can tell."""
        ...

    def finish_write(self, f: BinaryIO, path: str, size: int | None = None) -> None:
        """Make ``f`` durable (fsync, or complete the upload) and close it; with ``size``,
        confirm that the stored object holds exactly that many bytes."""
        ...

    def abort_write(self, f: BinaryIO) -> None:
        """Abandon ``f``: close it without completing it (aborts a multipart upload)."""
        ...

    def open_read(self, path: str) -> BinaryIO:
        """A file for reading, with ``seek`` and ``readinto``."""
        ...

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """The whole file, or its first ``limit`` bytes."""
        ...

    def stat(self, path: str) -> Stat | None:
        """What ``path`` is, or None when the backend *definitely* says it does not exist.

        Any other failure (throttling, a timeout, a 5xx, access denied) raises
        :class:`~asyncckpt.StorageError`: a transient error is never taken for "missing".
        """
        ...

    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path``, sorted; empty when ``path`` does not exist."""
        ...

    def remove(self, path: str) -> None:
        """Delete a file, or a directory and everything under it; absent is fine.
        Symlinks and special files are unlinked, never followed or opened."""
        ...

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth retrying (throttling, 5xx, timeouts, dropped connections)."""
        ...


@runtime_checkable
class AtomicRename(Protocol):
    """A backend whose directory rename is atomic: a step commits by renaming its temp dir."""

    def rename_dir(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``; fails if ``dst`` exists."""
        ...

    def sync_dir(self, path: str) -> None:
        """Make the directory entries of ``path`` durable (fsync of the directory)."""
        ...


@runtime_checkable
class BufferWrites(Protocol):
    """A backend that writes a whole file from memory better than a stream of writes can
    (``O_DIRECT`` from page-aligned memory on local disk; parallel multipart parts on S3)."""

    def write_file(
        self,
        path: str,
        data: memoryview,
        size: int,
        pace: Callable[[int], None] | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> None:
        """Write ``data[:size]`` as a new durable file (never replacing one).

        ``data`` may extend past ``size`` (zero padding to a page), which lets a direct write
        cover whole pages.  ``pace(n)``, if given, is called after every ``n`` bytes sent, so
        the caller can cap the bandwidth by sleeping in it.  ``ready(n)``, if given, blocks
        until ``data[:n]`` is final (the staging copy may still be filling the rest): a
        backend calls it before it reads bytes below ``n``.
        """
        ...


@runtime_checkable
class DirectStreams(Protocol):
    """A backend that can take a stream of writes without its page cache (local disks:
    ``O_DIRECT`` through an aligned bounce buffer), for bytes not already in aligned memory."""

    def open_direct(self, path: str) -> BinaryIO:
        """Like ``open_write``; ``finish_write`` and ``abort_write`` end it."""
        ...


@runtime_checkable
class BufferReads(Protocol):
    """A backend that reads a file's bytes straight into memory (local disks: ``pread``,
    with ``O_DIRECT`` when the memory, offset and length are page-aligned; S3: one ranged
    GET whose body is copied in as it arrives; other fsspec stores: a ranged read, copied)."""

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """Fill ``out`` from ``path`` at ``offset``; returns the bytes read (fewer only at
        the end of the file)."""
        ...


@runtime_checkable
class FileProbes(Protocol):
    """A backend where asking about a file costs less than asking about any path (S3: one
    HEAD, where ``stat`` must also list the prefix when the HEAD finds nothing)."""

    def probe_file(self, path: str) -> Stat | None:
        """``stat(path)`` when ``path`` is a regular file; None when no file is there (a
        directory, or a prefix with objects under it, reads as None)."""
        ...


@runtime_checkable
class RangedReads(Protocol):
    """A backend where a byte range is one request; loads fetch many concurrently."""

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``path``, retried on transient errors."""
        ...


@runtime_checkable
class MultipartUploads(Protocol):
    """A backend that keeps the parts of unfinished uploads until they are aborted."""

    def pending_uploads(self, root: str) -> list[tuple[str, str, float | None]]:
        """(object URL, upload id, start time or None) of every open upload under ``root``."""
        ...

    def abort_upload(self, url: str, upload_id: str) -> None:
        """Abort one open upload, freeing its parts."""
        ...


@runtime_checkable
class RootCheck(Protocol):
    """A backend that can tell, before the first save, that a root is unusable."""

    def check_root(self, root: str) -> None:
        """Raise :class:`~asyncckpt.StorageError` naming the problem (e.g. a missing bucket)."""
        ...


def renames_atomically(storage: Any) -> bool:
    """Whether steps on ``storage`` commit by an atomic rename (else: manifest last)."""
    return isinstance(storage, AtomicRename)


def exists(storage: Storage, path: str) -> bool:
    """Whether anything is at ``path`` (a transient error raises, never answers False)."""
    return storage.stat(path) is not None


def probe_file(storage: Storage, path: str) -> Stat | None:
    """What is at ``path``, for a caller that only wants a regular file there: the cheapest
    question that tells one from anything else (one HEAD on S3).  A Stat of another kind may
    come back (a FIFO on a local disk); None means no file."""
    if isinstance(storage, FileProbes):
        return storage.probe_file(path)
    return storage.stat(path)


def is_file(storage: Storage, path: str) -> bool:
    """Whether ``path`` is a regular file (a symlink or a FIFO is not)."""
    st = probe_file(storage, path)
    return st is not None and st.kind == "file"


T = TypeVar("T")


def retrying(storage: Storage, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` again, with backoff, while it fails with a transient error.

    At most ``storage.retries`` retries; permanent errors (access denied, no such bucket)
    are raised at once.  Callers retry whole units (a file, a range), whose data is still
    at hand.
    """
    for n in range(storage.retries + 1):
        try:
            return attempt()
        except Exception as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            if n == storage.retries or not (storage.is_transient(e) or storage.is_transient(cause)):
                raise
            time.sleep(min(8.0, 0.2 * 2**n))
    raise AssertionError("unreachable")


_WRITE_CHUNK = 64 << 20  # bound single write() calls; large enough for sequential throughput


def write_fully(f: Any, data: Any, path: str, pace: Callable[[int], None] | None = None) -> None:
    """Write every byte of ``data`` to the stream ``f`` in bounded calls, retrying short
    writes; ``pace(n)`` after each.  OSErrors come back as ``StorageError`` naming ``path``."""
    import errno

    from .local import wrap_os_error

    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        try:
            n = f.write(view[done : done + _WRITE_CHUNK])
        except OSError as e:
            raise wrap_os_error("write", path, e) from e
        if n is None or n <= 0:
            raise wrap_os_error("write", path, OSError(errno.EIO, "short write"))
        done += n
        if pace is not None:
            pace(n)


def write_stream(storage: Storage, path: str, data: Any, pace: Callable[[int], None] | None = None) -> None:
    """Write ``data`` as a new durable file through ``open_write``: a stream of bounded
    writes; a failure (a failed completion too) aborts it (an object store's multipart)."""
    f = storage.open_write(path)
    try:
        write_fully(f, data, path, pace)
        storage.finish_write(f, path, memoryview(data).nbytes)
    except BaseException:
        storage.abort_write(f)
        raise
