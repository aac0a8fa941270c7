"""The S3 requests ``FsspecStorage`` issues itself, through s3fs's async client.

s3fs's file-level calls are general, and they spend requests on that: ``rm`` of a key HEADs
it before deleting it, and ``ls`` of an empty prefix lists the parent as well to tell a file
from a directory.  A checkpoint's layout needs neither, and on a real store each request is a
round trip of tens of milliseconds.  So the few calls a save and its retention make are
written here as exactly the requests they need:

- :func:`multipart_upload`: one file from memory, ``concurrency`` parts in flight, aborted
  on failure;
- :func:`get_into`: one ranged GET, its body copied into place as it arrives;
- :func:`list_names`: one LIST per page of a prefix;
- :func:`delete_tree`: one LIST per page and one bulk DELETE per 1,000 keys.

Each takes ``call``, s3fs's ``S3FileSystem._call_s3`` (its retries and credentials), and
runs on s3fs's event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import StorageError

__all__ = ["multipart_upload", "get_into", "list_names", "delete_tree"]

Call = Callable[..., Awaitable[Any]]


async def multipart_upload(
    call: Call,
    bucket: str,
    key: str,
    data: memoryview,
    part: int,
    concurrency: int,
    pace: Callable[[int], None] | None,
) -> None:
    """Upload ``data`` as one object in ``part``-byte parts, ``concurrency`` in flight; the
    upload is aborted, not completed, if any part fails."""
    size = data.nbytes
    upload = await call("create_multipart_upload", Bucket=bucket, Key=key)
    uid = upload["UploadId"]
    loop = asyncio.get_running_loop()
    n_parts = -(-size // part)
    # ``concurrency`` part buffers, each reused by the parts that follow it (a buffer is free
    # again once its part's request has returned)
    free: asyncio.Queue[bytearray] = asyncio.Queue()
    for _ in range(min(concurrency, n_parts)):
        free.put_nowait(bytearray())
    src = ctypes.addressof(ctypes.c_char.from_buffer(data)) if not data.readonly else None

    def fill(buf: bytearray, lo: int, hi: int) -> bytearray:
        if len(buf) != hi - lo:
            buf = bytearray(hi - lo)  # first use, or the short last part
        if src is not None:  # memmove releases the GIL; a memoryview copy would hold it
            ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), src + lo, hi - lo)
        else:
            buf[:] = data[lo:hi]
        return buf

    async def one(n: int) -> dict[str, Any]:
        lo, hi = n * part, min(size, (n + 1) * part)
        buf = await free.get()
        try:
            # copied off the loop: the loop keeps the other parts' sockets moving meanwhile
            copying = loop.run_in_executor(None, fill, buf, lo, hi)
            copies.append(copying)
            buf = await asyncio.shield(copying)  # cancelled, the part leaves the copy running
            if pace is not None:  # a part is sent when the cap allows it, holding its buffer:
                await loop.run_in_executor(None, pace, hi - lo)  # so no more than concurrency run ahead
            out = await call("upload_part", Bucket=bucket, Key=key, UploadId=uid, PartNumber=n + 1, Body=buf)
        finally:
            free.put_nowait(buf)
        return {"PartNumber": n + 1, "ETag": out["ETag"]}

    copies: list[asyncio.Future[bytearray]] = []
    tasks = [asyncio.ensure_future(one(n)) for n in range(n_parts)]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:  # one part failed: stop the others
            t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        parts = [t.result() for t in tasks]
        await call(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=uid,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        # a cancelled part's copy still runs on its thread: let it finish reading ``data``
        # before the caller may reuse (or free) the memory behind it
        await asyncio.gather(*copies, return_exceptions=True)
        try:  # free the parts now; gc aborts what a killed writer leaves behind
            await call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=uid)
        except Exception:
            pass
        raise


async def get_into(call: Call, bucket: str, key: str, offset: int, out: memoryview) -> int:
    """Fill ``out`` from the object at ``offset`` with one ranged GET; returns the bytes
    read (fewer only at the end of the object, 0 for a range past it)."""
    n = out.nbytes
    try:
        resp = await call("get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}")
    except OSError as e:  # a range starting at or past the end: S3 answers 416
        response = getattr(e.__cause__, "response", None)  # botocore's ClientError
        response = response if isinstance(response, dict) else {}
        code = str((response.get("Error") or {}).get("Code", ""))
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        text = str(e).lower()
        if code == "InvalidRange" or status == 416 or "invalidrange" in text or "not satisfiable" in text:
            return 0
        raise
    body, got = resp["Body"], 0
    if offset and not str(resp.get("ContentRange") or "").startswith(f"bytes {offset}-"):
        body.close()  # a server (or proxy) that ignored the Range sends the object from byte 0
        if resp.get("ContentLength") == 0:
            return 0  # nothing at all: the range lies past the end of the object
        raise StorageError(
            errno.EIO,
            f"asked for bytes from {offset}, the store answered {resp.get('ContentRange') or 'the whole object'}"
            "; is a proxy in front of the store dropping Range headers?",
            f"s3://{bucket}/{key}",
        )
    dst = ctypes.addressof(ctypes.c_char.from_buffer(out))
    try:
        # each piece as the connection delivers it (at most 1 MiB); the body checks that the
        # whole Content-Length came, and raises otherwise (retried)
        while chunk := await body.read(1 << 20):
            k = len(chunk)
            if got + k > n:
                raise StorageError(
                    errno.EIO, f"the store sent more than the {n} bytes asked for", f"s3://{bucket}/{key}"
                )
            if type(chunk) is bytes:
                ctypes.memmove(dst + got, chunk, k)  # releases the GIL
            else:
                out[got : got + k] = chunk
            got += k
    finally:
        body.close()
    return got


async def _pages(call: Call, **query: Any) -> Any:
    """Every page of a ``list_objects_v2`` listing."""
    while True:
        page = await call("list_objects_v2", **query)
        yield page
        if not page.get("IsTruncated"):
            return
        query["ContinuationToken"] = page["NextContinuationToken"]


def _prefix(key: str) -> str:
    key = key.strip("/")
    return key + "/" if key else ""


async def list_names(call: Call, bucket: str, key: str) -> list[str]:
    """Names directly under the prefix ``key`` (objects and sub-prefixes), sorted; empty when
    nothing is there."""
    prefix, names = _prefix(key), set()
    async for page in _pages(call, Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for p in page.get("CommonPrefixes") or []:
            names.add(p["Prefix"][len(prefix) :].rstrip("/"))
        for o in page.get("Contents") or []:
            names.add(o["Key"][len(prefix) :])
    names.discard("")  # a directory marker (``key/``) names nothing under it
    return sorted(names)


async def delete_tree(call: Call, bucket: str, key: str) -> None:
    """Delete the object ``key`` and every object under the prefix ``key/``; nothing there is
    fine.  A key the store refuses to delete raises."""
    if not key.strip("/"):
        raise StorageError(errno.EINVAL, "refusing to delete a whole bucket", bucket)
    keys = [key.rstrip("/")]
    async for page in _pages(call, Bucket=bucket, Prefix=_prefix(key)):
        keys += [o["Key"] for o in page.get("Contents") or []]
    for i in range(0, len(keys), 1000):  # S3 takes at most 1,000 keys per request
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        out = await call("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = out.get("Errors") or []
        if errors:
            e = errors[0]
            code = errno.EACCES if e.get("Code") == "AccessDenied" else errno.EIO
            raise StorageError(
                code, f"the store refused to delete {len(errors)} object(s): {e.get('Code')}: {e.get('Message')}",
                f"s3://{bucket}/{e.get('Key')}",
            )  # fmt: skip
