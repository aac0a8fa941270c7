"""Any fsspec filesystem (``s3://``, ``gs://``, ``memory://`` ...) as a :class:`Storage`."""

from __future__ import annotations

import errno
import inspect
from collections.abc import Callable
from typing import Any, BinaryIO

from fsspec.asyn import sync

from ..errors import StorageError
from . import s3
from .base import Stat, retrying
from .redact import install_log_redaction, redact, secrets_of

__all__ = ["FsspecStorage"]

# Words in the errors s3fs/botocore/aiohttp raise for conditions worth retrying: throttling,
# 5xx, connection resets and timeouts.  Access denied and missing buckets are not among them.
_TRANSIENT_WORDS = (
    "throttl", "slowdown", "slow down", "timeout", "timed out", "connection reset",
    "connectionreset", "internalerror", "internal error", "serviceunavailable",
    "service unavailable", "bad gateway", "requesttimeout", "broken pipe", "server disconnected",
    "could not connect", "connection was closed", "endpointconnectionerror", "connectionclosederror",
    "clientconnectorerror", "clientoserror", "connection refused", "reduce your request rate",
    "clientpayloaderror", "incompleteread", "response payload is not completed",
    "internal server error",
)  # fmt: skip
# The errnos s3fs gives HTTP answers worth retrying: 503 SlowDown and 409 (EBUSY), 500 with or
# without an error body (EREMOTEIO: a HEAD's 500 has no body, so no words to match).
_TRANSIENT_ERRNOS = (errno.EBUSY, errno.EAGAIN, getattr(errno, "EREMOTEIO", errno.EBUSY))


def _bucket_and_key(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` as ("bucket", "some/key")."""
    bucket, _, key = url.split("://", 1)[-1].partition("/")
    return bucket, key


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time from an fsspec ``info()`` dict, whatever the backend calls it."""
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


class FsspecStorage:
    """Any fsspec filesystem (``s3://``, ``gs://``, ``memory://`` ...) behind the same interface.

    Object stores have no atomic rename, so a step commits when its ``manifest.json`` is
    written, after every shard upload has been confirmed (closed and its size checked).
    Credentials live only in the filesystem object; they are redacted from every message.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        block_size: int = 64 << 20,
        retries: int = 3,
        part_size: int = 16 << 20,
        upload_concurrency: int = 8,
    ) -> None:
        import fsspec

        self.url = url
        self.protocol = url.split("://", 1)[0]
        self._s3 = self.protocol in ("s3", "s3a")  # multipart uploads and streamed GETs through s3fs
        # the multipart part size: s3fs's own option, honoured here too (we pass it per open)
        self.block_size = int((storage_options or {}).get("default_block_size", block_size))
        self.retries = retries
        # parts of write_file's parallel uploads: s3fs's block size too, if one is given
        opt_part = (storage_options or {}).get("default_block_size", part_size)
        self.part_size = max(5 << 20, int(opt_part))  # S3's smallest part (but the last)
        self.upload_concurrency = max(1, int(upload_concurrency))
        self._secrets = secrets_of(storage_options)
        self._shown = redact(storage_options)
        install_log_redaction(self._secrets)
        try:
            self.fs = fsspec.filesystem(self.protocol, **(storage_options or {}))
        except ImportError as e:
            from ..errors import ConfigError

            raise ConfigError(
                f"no fsspec backend for {self.protocol}:// ({e}); install it, e.g. "
                "`pip install asyncckpt[s3]` for s3://"
            ) from e
        # recent s3fs splits a whole-file cat into concurrent ranges, after a HEAD to size
        # it; manifests and other small files are better read with one GET
        cat = getattr(self.fs, "_cat_file", None)
        self._cat_one_get = cat is not None and "max_concurrency" in inspect.signature(cat).parameters

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
        except StorageError:
            raise  # already ours (chained to itself, is_transient would never end)
        except Exception as e:
            raise self._wrap(op, path, e) from e  # the cause decides whether it is retried

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, StorageError) and exc.__cause__ is not None and exc.__cause__ is not exc:
            return self.is_transient(exc.__cause__)  # judge the store's error, not our message
        if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError)):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
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
        bucket = _bucket_and_key(root)[0]
        if self.stat(f"{self.protocol}://{bucket}") is None:  # an unreachable store raises
            raise StorageError(
                errno.ENOENT,
                f"bucket {bucket!r} does not exist or these credentials cannot see it; create "
                "it or fix storage_options",
                root,
            )

    def open_write(self, path: str) -> BinaryIO:
        return self._call("open for writing", path, self.fs.open, path, "wb", block_size=self.block_size)

    def finish_write(self, f: BinaryIO, path: str, size: int | None = None) -> None:
        """Close (completing the upload) and confirm the object's size.

        On S3 a file small enough for one PUT needs no HEAD: the PUT carried exactly the bytes
        the file took (its length, and botocore's CRC32 of them, which S3 checks), so the size
        to confirm is the file's own count.  A multipart upload's size is checked with a HEAD."""
        took = f.tell() if self._s3 else None
        self._call("upload", path, f.close)
        if size is None:
            return
        one_put = self._s3 and getattr(f, "mpu", False) is None  # s3fs began no multipart upload
        self._confirm_size(path, size, took if one_put else None)

    def _confirm_size(self, path: str, size: int, stored: int | None = None) -> None:
        """Raise unless the object holds ``size`` bytes (``stored``, or asked with a HEAD)."""
        if stored is None:
            self.fs.invalidate_cache(path)
            stored = self._call("stat", path, self.fs.size, path)
        if stored != size:
            raise StorageError(errno.EIO, f"upload incomplete: {stored} bytes stored, {size} written", path)

    # -- BufferWrites
    def write_file(
        self,
        path: str,
        data: memoryview,
        size: int,
        pace: Callable[[int], None] | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> None:
        """On S3, one multipart upload with ``upload_concurrency`` parts in flight at once
        (aborted on failure, its size confirmed after completion); elsewhere, a stream.
        Waits for the whole file to be ``ready`` first."""
        if ready is not None:
            ready(size)
        data = data[:size]
        if not self._s3 or size <= self.part_size:
            f = self.open_write(path)
            try:
                self._call("write", path, f.write, data)
                if pace is not None:
                    pace(size)
                self.finish_write(f, path, size)
            except BaseException:
                self.abort_write(f)
                raise
            return
        bucket, key = _bucket_and_key(path)
        part = max(self.part_size, -(-size // 9_000))  # S3 allows 10,000 parts
        up = (self.fs._call_s3, bucket, key, data, part, self.upload_concurrency, pace)
        self._call("upload", path, sync, self.fs.loop, s3.multipart_upload, *up)
        self._confirm_size(path, size)

    def abort_write(self, f: BinaryIO) -> None:
        """Abandon an upload (aborts a multipart upload instead of completing it)."""
        from fsspec.spec import AbstractBufferedFile

        try:
            if isinstance(f, AbstractBufferedFile):  # s3fs, gcsfs, ...: drop the upload
                f.discard()
                # nothing is left to flush: without this, s3fs tries anyway when the file is
                # garbage-collected, and warns
                f.closed = True
            else:  # e.g. memory://, whose close() stores the file: store it, then remove it
                f.close()
                path = getattr(f, "path", None)
                if path is not None:
                    self.fs.rm(path)
        except Exception:
            pass

    def pending_uploads(self, root: str) -> list[tuple[str, str, float | None]]:
        """Multipart uploads begun under ``root`` and never completed nor aborted, as
        (object URL, upload id, start time); a writer killed mid-upload leaves these behind,
        and the store keeps (and bills) their parts until they are aborted."""
        if not self._s3:
            return []
        bucket, prefix = _bucket_and_key(root)
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
        bucket, key = _bucket_and_key(url)
        self._call(
            "abort multipart upload", url, self.fs.call_s3, "abort_multipart_upload",
            Bucket=bucket, Key=key, UploadId=upload_id,
        )  # fmt: skip

    def open_read(self, path: str) -> BinaryIO:
        return self._call("open for reading", path, self.fs.open, path, "rb", block_size=self.block_size)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        if limit is not None and limit <= 0:
            return b""
        # no Range header for a whole file: a range on an empty object is an error on S3
        rng: dict[str, Any] = {} if limit is None else {"start": 0, "end": limit}
        if limit is None and self._cat_one_get:
            rng["max_concurrency"] = 1  # one GET: s3fs would first HEAD it to consider splitting
        return retrying(self, lambda: bytes(self._call("read", path, self.fs.cat_file, path, **rng)))

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """One ranged GET; loads issue many of these concurrently."""
        if end <= start:
            return b""
        return retrying(
            self, lambda: bytes(self._call("read", path, self.fs.cat_file, path, start=start, end=end))
        )

    # -- BufferReads
    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """Fill ``out`` from ``path`` at ``offset``; returns the bytes read (fewer only at the
        end of the object).  On S3, one ranged GET whose body is copied into ``out`` as it
        arrives: no intermediate object the size of the range, and no second copy out of it."""
        n = out.nbytes
        if n == 0:
            return 0
        if not self._s3 or out.readonly:
            data = self.read_range(path, offset, offset + n)
            out[: len(data)] = data
            return len(data)
        bucket, key = _bucket_and_key(path)
        get = (self.fs._call_s3, bucket, key, offset, out)
        return retrying(self, lambda: self._call("read", path, sync, self.fs.loop, s3.get_into, *get))

    def stat(self, path: str) -> Stat | None:
        def attempt() -> Stat | None:
            self.fs.invalidate_cache(path)
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None  # the store's definite answer
            except Exception as e:
                raise self._wrap("stat", path, e) from e
            kind = {"file": "file", "directory": "dir", "link": "link"}.get(info.get("type"), "other")
            return Stat(kind, int(info.get("size") or 0) if kind == "file" else 0, _mtime(info))

        return retrying(self, attempt)

    # -- FileProbes
    def probe_file(self, path: str) -> Stat | None:
        """On S3 one HEAD; ``stat`` would list the prefix too when the HEAD finds nothing."""
        if not self._s3:
            st = self.stat(path)
            return st if st is not None and st.kind == "file" else None
        bucket, key = _bucket_and_key(path)

        def attempt() -> Stat | None:
            try:
                info = sync(self.fs.loop, self.fs._call_s3, "head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            except Exception as e:
                raise self._wrap("stat", path, e) from e
            return Stat("file", int(info.get("ContentLength") or 0), _mtime(info))

        return retrying(self, attempt)

    def listdir(self, path: str) -> list[str]:
        def attempt() -> list[str]:
            self.fs.invalidate_cache(path)
            try:
                if self._s3:  # one LIST; s3fs's ls lists the parent too when a prefix is empty
                    return sync(self.fs.loop, s3.list_names, self.fs._call_s3, *_bucket_and_key(path))
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            except Exception as e:
                raise self._wrap("list", path, e) from e
            return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries})

        return retrying(self, attempt)

    def remove(self, path: str) -> None:
        try:
            if self._s3:  # a LIST and a bulk DELETE; s3fs's rm would HEAD the key first
                sync(self.fs.loop, s3.delete_tree, self.fs._call_s3, *_bucket_and_key(path))
            else:
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._wrap("remove", path, e) from None
        self.fs.invalidate_cache(path)
