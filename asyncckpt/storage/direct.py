"""Direct I/O on local disks: whole files written from, and read into, page-aligned memory.

``O_DIRECT`` moves bytes between the device and user memory without the page cache: about a
tenth of the CPU of a buffered write here, and a checkpoint no longer evicts the data
loaders' cached files.  It needs page-aligned memory, offsets and lengths, so a file is
written as whole pages straight from memory and only its tail (the last partial page) goes
through the cache, on the same descriptor with ``O_DIRECT`` cleared.

Whether a filesystem takes it is decided once per :class:`DirectIO` (one per storage, that
is per root) and logged: tmpfs on older kernels, some network and FUSE filesystems refuse it
with ``EINVAL``, and then every file is written buffered (and dropped from the cache after
its ``fsync``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["PAGE", "DirectIO", "address", "write_all", "read_into"]

log = logging.getLogger("asyncckpt")

PAGE = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none (macOS): never direct
_PIECE = 32 << 20  # one write() call; also the granularity of a bandwidth cap


def address(mv: memoryview) -> int | None:
    """The memory address of a writable buffer, or None (read-only buffers are never direct)."""
    if mv.readonly or mv.nbytes == 0:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def _write(
    fd: int,
    mv: memoryview,
    pace: Callable[[int], None] | None,
    ready: Callable[[int], None] | None = None,
    base: int = 0,
) -> None:
    done = 0
    while done < mv.nbytes:
        if ready is not None:
            ready(base + min(mv.nbytes, done + _PIECE))  # the staging copy may still be filling it
        n = os.write(fd, mv[done : done + _PIECE])
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n
        if pace is not None:
            pace(n)


def write_all(
    fd: int,
    data: memoryview,
    size: int,
    direct: bool,
    pace: Callable[[int], None] | None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Write ``data[:size]`` at the start of ``fd``; whole pages directly when ``direct``
    (``fd`` opened with ``O_DIRECT``), then the tail with ``O_DIRECT`` cleared.  Each
    piece waits for ``ready`` (``BufferWrites.write_file``) first."""
    data = data.cast("B")[:size] if data.format != "B" else data[:size]
    head = size // PAGE * PAGE if direct else 0
    if head:
        _write(fd, data[:head], pace, ready)
    if direct:
        _buffered(fd)
    if head < size:
        _write(fd, data[head:], pace, ready, head)


def _buffered(fd: int) -> None:
    """Clear ``O_DIRECT`` on an open descriptor: later writes go through the page cache."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)


def read_into(fd: int, offset: int, out: memoryview) -> int:
    """Fill ``out`` from ``fd`` at ``offset`` (``pread`` loop); returns the bytes read (less
    only at the end of the file)."""
    done = 0
    while done < out.nbytes:
        n = os.preadv(fd, [out[done : done + _PIECE]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class DirectStream:
    """A write-only stream through ``O_DIRECT`` for bytes that are not in page-aligned memory
    (compressed records): writes of any size gather in a page-aligned bounce buffer that is
    written out whole; :meth:`flush` writes the rest, its last partial page with ``O_DIRECT``
    cleared, and is called once, at the end (``finish_write``).  No page cache is filled
    and none has to be written back, at the price of one memmove (without the GIL)."""

    def __init__(self, fd: int, refused: Callable[[OSError], None], size: int = _PIECE) -> None:
        """``refused`` is told when the filesystem refuses a direct write (``EINVAL``; it
        raises where ``O_DIRECT`` is required); the stream then goes on buffered."""
        self.fd = fd
        self._refused = refused
        self._mm = mmap.mmap(-1, size)
        self._buf = memoryview(self._mm)
        self._at = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        self._n = 0
        self._pos = 0  # bytes written to the file so far
        self.closed = False

    def _out(self, mv: memoryview) -> None:
        try:
            _write(self.fd, mv, None)
        except OSError as e:
            if e.errno != errno.EINVAL or not fcntl.fcntl(self.fd, fcntl.F_GETFL) & O_DIRECT:
                raise
            self._refused(e)  # opened with O_DIRECT, but a write was refused: buffered from here
            _buffered(self.fd)
            _write(self.fd, mv[os.lseek(self.fd, 0, os.SEEK_CUR) - self._pos :], None)
        self._pos += mv.nbytes

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        src = address(mv) if not mv.readonly else None
        if src is None and isinstance(data, bytes):
            src = ctypes.cast(data, ctypes.c_void_p).value  # type: ignore[arg-type]  # bytes: its buffer
        done, size = 0, len(self._buf)
        while done < mv.nbytes:
            k = min(mv.nbytes - done, size - self._n)
            if src is not None and k >= 1 << 16:
                ctypes.memmove(self._at + self._n, src + done, k)  # releases the GIL
            else:
                self._buf[self._n : self._n + k] = mv[done : done + k]
            self._n += k
            done += k
            if self._n == size:
                self._out(self._buf)
                self._n = 0
        return mv.nbytes

    def flush(self) -> None:
        if self._n:
            head = self._n // PAGE * PAGE
            if head:
                self._out(self._buf[:head])
            _buffered(self.fd)
            self._out(self._buf[head : self._n])
            self._n = 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            os.close(self.fd)
        finally:
            try:
                self._buf.release()
                self._mm.close()
            except BufferError:  # a failed write's traceback still holds a slice: the GC frees it
                pass


class DirectIO:
    """Whether to use ``O_DIRECT`` under one root: ``mode`` None probes on first use."""

    def __init__(self, mode: bool | None) -> None:
        self.mode = mode if O_DIRECT else (False if mode is None else mode)
        self.supported: bool | None = None if O_DIRECT else False
        self._lock = threading.Lock()

    def wanted(self, data: memoryview, size: int) -> bool:
        """Try ``O_DIRECT`` for this buffer: enabled, not known to fail, page-aligned memory."""
        if self.mode is False or self.supported is False or size < PAGE:
            return False
        addr = address(data)
        return addr is not None and addr % PAGE == 0

    def refused(self, path: str, exc: OSError) -> None:
        """The filesystem refused ``O_DIRECT`` (EINVAL): buffered from now on, logged once."""
        with self._lock:
            first = self.supported is not False
            self.supported = False
        if self.mode is True:
            from .local import wrap_os_error

            raise wrap_os_error(
                "direct write (direct_io=True; use direct_io=None to fall back to buffered writes)",
                path,
                exc,
            ) from exc
        if first:
            log.info(
                "asyncckpt: the filesystem of %s refused O_DIRECT (%s); shard files are written buffered",
                path,
                exc.strerror,
            )

    def worked(self, path: str) -> None:
        with self._lock:
            first = self.supported is None
            self.supported = True
        if first:
            log.info("asyncckpt: shard files are written with O_DIRECT (the first: %s)", path)
