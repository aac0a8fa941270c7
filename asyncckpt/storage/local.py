"""POSIX storage: fsync of files and directories, and an atomic directory rename."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat as stat_mod
from collections.abc import Callable
from typing import BinaryIO

from ..errors import StorageError
from .base import Stat
from .direct import O_DIRECT, PAGE, DirectIO, DirectStream, address, write_all
from .direct import read_into as pread_into

__all__ = ["LocalStorage", "wrap_os_error"]


def wrap_os_error(op: str, path: str, exc: OSError) -> StorageError:
    """An OSError as a StorageError that names the operation and path (cause kept by caller)."""
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = " The disk is full: free space or point the checkpointer at a larger volume."
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = " Check the permissions of the checkpoint root."
    # OSError's own formatting appends the path: "[Errno 28] write failed: ...: '/ckpt/...'"
    return StorageError(exc.errno or 0, f"{op} failed: {exc.strerror or exc}.{hint}", path)


class LocalStorage:
    """A local POSIX filesystem; commits by renaming a finished temp directory.

    Args:
        direct_io: write whole files with ``O_DIRECT`` (``direct.py``): None tries it and
            falls back to buffered writes where the filesystem refuses it, False never, True
            requires it.
    """

    retries = 0

    def __init__(self, direct_io: bool | None = None) -> None:
        self._direct = DirectIO(direct_io)

    @property
    def direct(self) -> DirectIO:
        """The root's direct-I/O state (a subclass that skips ``__init__`` gets the default)."""
        d = self.__dict__.get("_direct")
        if d is None:
            d = self.__dict__["_direct"] = DirectIO(None)
        return d

    def makedirs(self, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise wrap_os_error("mkdir", path, e) from e

    def open_write(self, path: str) -> BinaryIO:
        try:
            return open(path, "xb", buffering=0)  # exclusive: never clobber an existing file
        except OSError as e:
            raise wrap_os_error("open for writing", path, e) from e

    def open_direct(self, path: str) -> BinaryIO:
        """A new file for a stream of writes through ``O_DIRECT`` (``direct.DirectStream``),
        or a plain one where the root does not take it."""
        if self.direct.mode is False or self.direct.supported is False or not O_DIRECT:
            return self.open_write(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags | O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise wrap_os_error("open for writing", path, e) from e
            self.direct.refused(path, e)
            return self.open_write(path)
        try:
            return DirectStream(fd, lambda e: self.direct.refused(path, e))  # type: ignore[return-value]
        except BaseException:
            os.close(fd)
            raise

    def finish_write(self, f: BinaryIO, path: str, size: int | None = None) -> None:
        """Flush and fsync; a file is durable only after this returns."""
        try:
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # a checkpoint is not read back soon
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # its buffered part
        except StorageError:
            raise  # already says what failed (a direct write that direct_io=True requires)
        except OSError as e:
            raise wrap_os_error("fsync", path, e) from e
        finally:
            f.close()

    def abort_write(self, f: BinaryIO) -> None:
        f.close()

    # -- BufferWrites
    def write_file(
        self,
        path: str,
        data: memoryview,
        size: int,
        pace: Callable[[int], None] | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> None:
        """Whole pages with ``O_DIRECT`` where possible, the tail buffered; fsync; then the
        file's pages are dropped from the cache (a checkpoint is not read back soon)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        direct = self.direct.wanted(data, size)
        try:
            try:
                fd = os.open(path, flags | (O_DIRECT if direct else 0), 0o644)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                self.direct.refused(path, e)
                direct = False
                fd = os.open(path, flags, 0o644)
            try:
                try:
                    write_all(fd, data, size, direct, pace, ready)
                except OSError as e:
                    if not (direct and e.errno == errno.EINVAL):
                        raise
                    self.direct.refused(path, e)  # opened, but the first write was refused
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    direct = False
                    write_all(fd, data, size, False, pace, ready)
                if direct:
                    self.direct.worked(path)
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except StorageError:
            raise
        except OSError as e:
            raise wrap_os_error("write", path, e) from e

    # -- BufferReads
    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """``pread`` into ``out``; with ``O_DIRECT`` when everything is page-aligned (no page
        cache: a resume does not evict the data loaders' files)."""
        addr = address(out)
        direct = (
            self.direct.mode is not False
            and self.direct.supported is not False
            and O_DIRECT != 0
            and addr is not None
            and (addr | offset | out.nbytes) % PAGE == 0
        )
        try:
            try:
                fd = os.open(path, os.O_RDONLY | (O_DIRECT if direct else 0))
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                direct = False
                fd = os.open(path, os.O_RDONLY)
            try:
                try:
                    return pread_into(fd, offset, out)
                except OSError as e:
                    if not (direct and e.errno == errno.EINVAL):
                        raise
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
                    return pread_into(fd, offset, out)
            finally:
                os.close(fd)
        except OSError as e:
            raise wrap_os_error("read", path, e) from e

    def open_read(self, path: str) -> BinaryIO:
        try:
            return open(path, "rb", buffering=0)
        except OSError as e:
            raise wrap_os_error("open for reading", path, e) from e

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read() if limit is None else f.read(limit)
        except OSError as e:
            raise wrap_os_error("read", path, e) from e

    def stat(self, path: str) -> Stat | None:
        # lstat: a symlink is reported as one, never followed, so a checkpoint cannot point
        # outside itself
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise wrap_os_error("stat", path, e) from e
        mode = st.st_mode
        if stat_mod.S_ISREG(mode):
            return Stat("file", st.st_size, st.st_mtime)
        if stat_mod.S_ISDIR(mode):
            return Stat("dir", 0, st.st_mtime)
        if stat_mod.S_ISLNK(mode):
            return Stat("link", 0, st.st_mtime)
        return Stat("other", 0, st.st_mtime)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise wrap_os_error("list", path, e) from e

    def remove(self, path: str) -> None:
        try:
            if not stat_mod.S_ISDIR(os.lstat(path).st_mode):  # a file, a symlink, a FIFO: never opened
                os.unlink(path)
                return
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise wrap_os_error("remove", path, e) from e

    def is_transient(self, exc: BaseException) -> bool:
        return False

    # -- AtomicRename
    def rename_dir(self, src: str, dst: str) -> None:
        try:
            if os.path.lexists(dst):  # rename() would replace an empty dir silently
                raise FileExistsError(errno.EEXIST, "destination exists", dst)
            os.rename(src, dst)
        except OSError as e:
            raise wrap_os_error("rename", f"{src} -> {dst}", e) from e

    def sync_dir(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise wrap_os_error("open directory", path, e) from e
        try:
            os.fsync(fd)
        except OSError as e:
            raise wrap_os_error("fsync directory", path, e) from e
        finally:
            os.close(fd)
