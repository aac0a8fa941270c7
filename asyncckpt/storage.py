"""Storage behind one small interface, addressed by ``str`` paths.

``LocalStorage`` covers POSIX paths: it gives real durability (fsync of files and of parent
directories) and an atomic directory rename, which is how a local commit becomes visible.
Object stores get their own implementation with the same methods; the writer and the reader
only ever talk to this interface.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, TypeVar

from .errors import StorageError

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "storage_for", "wrap_os_error", "redact", "is_url"]


class Storage(Protocol):
    """What the writer, reader and retention need from a storage backend.

    ``atomic_rename`` says how a step commits: by renaming a finished temp directory
    (POSIX), or, on object stores that have no rename, by writing ``manifest.json`` last
    under the step's own prefix.  ``retries`` is how often a whole file write is retried
    after a transient error (the data is still in the staging buffer).
    """

    atomic_rename: bool
    retries: int

    def makedirs(self, path: str) -> None: ...
    def open_write(self, path: str) -> BinaryIO: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def finish_write(self, f: BinaryIO, path: str = "", size: int | None = None) -> None: ...
    def abort_write(self, f: BinaryIO) -> None: ...
    def is_transient(self, exc: BaseException) -> bool: ...
    def read_bytes(self, path: str, limit: int | None = None) -> bytes: ...
    def size(self, path: str) -> int: ...
    def exists(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def rename_dir(self, src: str, dst: str) -> None: ...
    def sync_dir(self, path: str) -> None: ...
    def rmtree(self, path: str) -> None: ...
    def is_regular_file(self, path: str) -> bool: ...
    def is_link(self, path: str) -> bool: ...


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
    retries = 0

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

    def finish_write(self, f: BinaryIO, path: str = "", size: int | None = None) -> None:
        """Flush and fsync; a file is durable only after this returns."""
        name = path or getattr(f, "name", "?")
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise wrap_os_error("fsync", str(name), e) from e
        finally:
            f.close()

    def abort_write(self, f: BinaryIO) -> None:
        f.close()

    def is_transient(self, exc: BaseException) -> bool:
        return False

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
        import stat

        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):  # a file, a symlink, a FIFO: never opened
                os.unlink(path)
                return
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise wrap_os_error("remove", path, e) from e

    def is_link(self, path: str) -> bool:
        return os.path.islink(path)


_SECRET_KEYS = (
    "key",
    "secret",
    "token",
    "password",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "sas_token",
)


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options safe to show: every credential-like value is ``***``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS):
            out[k] = "***"
        else:
            out[k] = v
    return out


_REDACTED: set[str] = set()


def _install_log_redaction(secrets: list[str]) -> None:
    """Redact ``secrets`` from every log record of the process, whichever library logs it.

    botocore's DEBUG logging prints request headers (the access key id) and more; a filter on
    one logger would not reach its children, so the record factory is wrapped instead.  It
    costs one ``getMessage()`` per record, only once a secret has been registered.
    """
    new = [s for s in secrets if len(s) >= 4 and s not in _REDACTED]
    if not new:
        return
    first = not _REDACTED
    _REDACTED.update(new)
    if not first:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:
            return record
        if any(s in text for s in _REDACTED):
            for s in _REDACTED:
                text = text.replace(s, "***")
            record.msg, record.args = text, None
        return record

    logging.setLogRecordFactory(factory)


def _secrets(options: dict[str, Any] | None) -> list[str]:
    found: list[str] = []
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            found += _secrets(v)
        elif isinstance(v, str) and v and any(s in k.lower() for s in _SECRET_KEYS):
            found.append(v)
    return found


# Words in the errors s3fs/botocore/aiohttp raise for conditions worth retrying: throttling,
# 5xx, connection resets and timeouts.  Access denied and missing buckets are not among them.
_TRANSIENT_WORDS = (
    "throttl", "slowdown", "slow down", "timeout", "timed out", "connection reset",
    "connectionreset", "internalerror", "internal error", "serviceunavailable",
    "service unavailable", "bad gateway", "requesttimeout", "broken pipe", "server disconnected",
)  # fmt: skip


class FsspecStorage:
    """Any fsspec filesystem (``s3://``, ``gs://``, ``memory://`` ...) behind the same interface.

    Object stores have no atomic rename, so a step commits when its ``manifest.json`` is
    written, after every shard upload has been confirmed (closed and its size checked).
    Credentials live only in the filesystem object; they are redacted from every message.
    """

    atomic_rename = False

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        block_size: int = 64 << 20,
        retries: int = 3,
    ) -> None:
        import fsspec

        self.url = url
        self.protocol = url.split("://", 1)[0]
        # the multipart part size: s3fs's own option, honoured here too (we pass it per open)
        self.block_size = int((storage_options or {}).get("default_block_size", block_size))
        self.retries = retries
        self._secrets = _secrets(storage_options)
        self._shown = redact(storage_options)
        _install_log_redaction(self._secrets)
        try:
            self.fs = fsspec.filesystem(self.protocol, **(storage_options or {}))
        except ImportError as e:
            from .errors import ConfigError

            raise ConfigError(
                f"no fsspec backend for {self.protocol}:// ({e}); install it, e.g. "
                "`pip install asyncckpt[s3]` for s3://"
            ) from e

    def __repr__(self) -> str:
        return f"FsspecStorage({self.protocol}://, options={self._shown})"

    def _clean(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _wrap(self, op: str, path: str, exc: BaseException) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        code = getattr(exc, "errno", None) or 0
        if isinstance(exc, PermissionError):
            code, hint = errno.EACCES, " Access denied: check the credentials and the bucket policy."
        elif isinstance(exc, FileNotFoundError):
            code, hint = errno.ENOENT, " Not found: check that the bucket exists."
        else:
            hint = " Retried and still failing; check the store." if self.is_transient(exc) else ""
        msg = self._clean(f"{op} failed: {type(exc).__name__}: {exc}.{hint}")
        return StorageError(code, msg, self._clean(path))

    def _call(self, op: str, path: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise self._wrap(op, path, e) from None

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError)):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        text = f"{type(exc).__name__} {exc}".lower()
        return any(w in text for w in _TRANSIENT_WORDS)

    _OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")

    def makedirs(self, path: str) -> None:
        if self.protocol in self._OBJECT_STORES:
            return  # prefixes need no creating; makedirs would try to create the bucket
        self._call("mkdir", path, self.fs.makedirs, path, exist_ok=True)

    def check_root(self, root: str) -> None:
        """Fail early, naming the bucket, if the root's bucket is missing or not ours to see."""
        if self.protocol not in self._OBJECT_STORES:
            return
        bucket = root.split("://", 1)[1].split("/", 1)[0]
        if not self._call("stat", root, self.fs.exists, f"{self.protocol}://{bucket}"):
            raise StorageError(
                errno.ENOENT,
                f"bucket {bucket!r} does not exist or these credentials cannot see it; create "
                "it or fix storage_options",
                root,
            )

    def open_write(self, path: str) -> BinaryIO:
        return self._call("open for writing", path, self.fs.open, path, "wb", block_size=self.block_size)

    def finish_write(self, f: BinaryIO, path: str = "", size: int | None = None) -> None:
        """Close (completing the upload) and confirm the object's size."""
        path = path or str(getattr(f, "path", "?"))
        self._call("upload", path, f.close)
        if size is not None:
            self.fs.invalidate_cache(path)
            actual = self._call("stat", path, self.fs.size, path)
            if actual != size:
                raise StorageError(
                    errno.EIO, f"upload incomplete: {actual} bytes stored, {size} written", path
                )

    def abort_write(self, f: BinaryIO) -> None:
        """Abandon an upload (aborts a multipart upload instead of completing it)."""
        try:
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
                # nothing is left to flush: without this, s3fs tries anyway when the file is
                # garbage-collected, and warns
                f.closed = True  # type: ignore[misc]
            else:
                f.close()
        except Exception:
            pass

    def pending_uploads(self, root: str) -> list[tuple[str, str, float | None]]:
        """Multipart uploads begun under ``root`` and never completed nor aborted, as
        (object URL, upload id, start time); a writer killed mid-upload leaves these behind,
        and the store keeps (and bills) their parts until they are aborted."""
        if self.protocol not in ("s3", "s3a"):
            return []
        bucket, _, prefix = root.split("://", 1)[1].partition("/")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        query: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        out: list[tuple[str, str, float | None]] = []
        while True:
            page = self._call(
                "list multipart uploads", root, self.fs.call_s3, "list_multipart_uploads", **query
            )
            for u in page.get("Uploads") or []:
                if not u["Key"].startswith(prefix):
                    continue
                started = u.get("Initiated")
                when = started.timestamp() if hasattr(started, "timestamp") else None
                out.append((f"{self.protocol}://{bucket}/{u['Key']}", u["UploadId"], when))
            if not page.get("IsTruncated"):
                return out
            query.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))

    def abort_upload(self, url: str, upload_id: str) -> None:
        bucket, _, key = url.split("://", 1)[1].partition("/")
        self._call(
            "abort multipart upload", url, self.fs.call_s3, "abort_multipart_upload",
            Bucket=bucket, Key=key, UploadId=upload_id,
        )  # fmt: skip

    def open_read(self, path: str) -> BinaryIO:
        return self._call("open for reading", path, self.fs.open, path, "rb", block_size=self.block_size)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        return self._call("read", path, self.fs.cat_file, path, start=0, end=limit)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """One ranged GET; loads issue many of these concurrently."""
        return retrying(
            self, lambda: bytes(self._call("read", path, self.fs.cat_file, path, start=start, end=end))
        )

    def size(self, path: str) -> int:
        return int(self._call("stat", path, self.fs.size, path))

    def exists(self, path: str) -> bool:
        return bool(self._call("stat", path, self.fs.exists, path))

    def is_regular_file(self, path: str) -> bool:
        try:
            return bool(self.fs.isfile(path))
        except Exception:
            return False

    def listdir(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._wrap("list", path, e) from None
        return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries})

    def rename_dir(self, src: str, dst: str) -> None:
        raise StorageError(errno.ENOTSUP, "object stores have no atomic rename", src)

    def sync_dir(self, path: str) -> None:
        pass  # a confirmed upload is durable

    def is_link(self, path: str) -> bool:
        return False

    def rmtree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._wrap("remove", path, e) from None
        self.fs.invalidate_cache(path)


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


def is_url(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def storage_for(root: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage backend for ``root``: local paths, or any fsspec URL."""
    if is_url(root):
        return FsspecStorage(root, storage_options)
    return LocalStorage()
