"""Storage behind one small interface, addressed by ``str`` paths.

``LocalStorage`` covers POSIX paths: it gives real durability (fsync of files and of parent
directories) and an atomic directory rename, which is how a local commit becomes visible.
Object stores get their own implementation with the same methods; the writer and the reader
only ever talk to this interface.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import BinaryIO, Protocol

from .errors import StorageError

__all__ = ["Storage", "LocalStorage", "storage_for", "wrap_os_error"]


class Storage(Protocol):
    """What the writer, reader and retention need from a storage backend."""

    atomic_rename: bool

    def makedirs(self, path: str) -> None: ...
    def open_write(self, path: str) -> BinaryIO: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def finish_write(self, f: BinaryIO) -> None: ...
    def read_bytes(self, path: str, limit: int | None = None) -> bytes: ...
    def size(self, path: str) -> int: ...
    def exists(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def rename_dir(self, src: str, dst: str) -> None: ...
    def sync_dir(self, path: str) -> None: ...
    def rmtree(self, path: str) -> None: ...
    def is_regular_file(self, path: str) -> bool: ...


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
    """A local POSIX filesystem; commits by renaming a finished temp directory."""

    atomic_rename = True

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

    def open_read(self, path: str) -> BinaryIO:
        try:
            return open(path, "rb", buffering=0)
        except OSError as e:
            raise wrap_os_error("open for reading", path, e) from e

    def finish_write(self, f: BinaryIO) -> None:
        """Flush and fsync; a file is durable only after this returns."""
        name = getattr(f, "name", "?")
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise wrap_os_error("fsync", str(name), e) from e
        finally:
            f.close()

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read() if limit is None else f.read(limit)
        except OSError as e:
            raise wrap_os_error("read", path, e) from e

    def size(self, path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError as e:
            raise wrap_os_error("stat", path, e) from e

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_regular_file(self, path: str) -> bool:
        # lstat: a symlink is never a regular file, so a checkpoint cannot point outside itself.
        try:
            import stat

            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise wrap_os_error("list", path, e) from e

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

    def rmtree(self, path: str) -> None:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise wrap_os_error("remove", path, e) from e


def storage_for(root: str) -> LocalStorage:
    """The storage backend for ``root`` (local paths in this version)."""
    if "://" in root and not root.startswith("file://"):
        from .errors import ConfigError

        raise ConfigError(
            f"checkpoint root {root!r} is a URL; this version supports local paths only. "
            "Pass a local directory."
        )
    return LocalStorage()
