"""One storage conformance suite, run against every backend (in the spirit of fsspec's
``tests/abstract``): what :class:`asyncckpt.storage.Storage` documents must hold on

- ``local``:  :class:`LocalStorage` on a tmp dir,
- ``memory``: :class:`FsspecStorage` on fsspec's in-memory filesystem (a unique root per test),
- ``s3``:     :class:`FsspecStorage` on a moto S3 server on 127.0.0.1 (``-m s3``).

Backend-specific behaviour (POSIX special files, multipart uploads, an unreachable endpoint)
follows the shared part.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import asyncckpt.storage.base as storage_base
from asyncckpt import StorageError
from asyncckpt.storage import (
    AtomicRename,
    BufferReads,
    FsspecStorage,
    LocalStorage,
    MultipartUploads,
    RangedReads,
    RootCheck,
    Storage,
    exists,
    is_file,
    renames_atomically,
    retrying,
)

from .conftest import KEY_ID, SECRET


def _kind_size(st):
    """(kind, size) of a Stat: what every backend must agree on (mtimes differ by design)."""
    return None if st is None else (st.kind, st.size)


def _ks(kind, size=0):
    return (kind, size)


MiB = 1 << 20
PART = 5 * MiB  # S3's smallest multipart part; the s3 backend here uploads in parts this big


@dataclass
class Backend:
    name: str
    storage: Any  # a Storage, plus whichever optional capabilities the backend has
    root: str

    @property
    def object_store(self) -> bool:
        return self.name != "local"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write(self, rel: str, data: bytes) -> str:
        """Write ``data`` at ``root/rel`` through the protocol (parents created first)."""
        path = self.path(rel)
        self.storage.makedirs(path.rsplit("/", 1)[0])
        f = self.storage.open_write(path)
        f.write(data)
        self.storage.finish_write(f, path, len(data))
        return path


def _local(tmp_path: Any) -> Iterator[Backend]:
    root = str(tmp_path / "root")
    storage = LocalStorage()
    storage.makedirs(root)
    yield Backend("local", storage, root)


def _memory() -> Iterator[Backend]:
    root = f"memory://conformance-{uuid.uuid4().hex[:12]}"
    storage = FsspecStorage(root)
    storage.makedirs(root)
    yield Backend("memory", storage, root)
    storage.remove(root)
    # the memory filesystem is process-wide: leave nothing behind for other tests
    prefix = root.split("://", 1)[1]
    fs = storage.fs
    assert not [k for k in fs.store if k.lstrip("/").startswith(prefix)]
    assert not [d for d in fs.pseudo_dirs if d.lstrip("/").startswith(prefix)]


def _s3(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A fresh bucket on the session's moto server, deleted afterwards.

    conftest's ``s3`` fixture builds a new botocore client per test (about a second each);
    here every test shares one S3FileSystem (fsspec's instance cache: same options, no
    ``skip_instance_cache``) and only the bucket is new, which keeps the suite fast.
    """
    endpoint = request.getfixturevalue("moto_endpoint")
    opts = {
        "key": KEY_ID,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "default_block_size": PART,
    }
    bucket = f"conf{uuid.uuid4().hex[:12]}"
    root = f"s3://{bucket}/run7"
    storage = FsspecStorage(root, opts)
    storage.fs.call_s3("create_bucket", Bucket=bucket)
    yield Backend("s3", storage, root)
    for url, upload_id, _ in storage.pending_uploads(f"s3://{bucket}"):
        storage.abort_upload(url, upload_id)
    storage.remove(f"s3://{bucket}/run7")
    storage.fs.call_s3("delete_bucket", Bucket=bucket)  # fails if anything was left in it
    storage.fs.invalidate_cache()


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    if request.param == "local":
        yield from _local(tmp_path)
    elif request.param == "memory":
        yield from _memory()
    else:
        yield from _s3(request)


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.s3)])
def fsspec_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        yield from _memory()
    else:
        yield from _s3(request)


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``retrying`` backs off with ``time.sleep``; record the delays instead of waiting."""
    delays: list[float] = []
    monkeypatch.setattr(storage_base, "time", types.SimpleNamespace(sleep=delays.append))
    return delays


def _payload(n: int) -> bytes:
    return os.urandom(n)


# -- writing and reading back ------------------------------------------------------------------


def test_satisfies_the_protocol(backend: Backend) -> None:
    s: Storage = backend.storage
    for name in (
        "makedirs",
        "open_write",
        "finish_write",
        "abort_write",
        "open_read",
        "read_bytes",
        "stat",
        "listdir",
        "remove",
        "is_transient",
    ):
        assert callable(getattr(s, name)), name
    assert isinstance(s.retries, int) and s.retries >= 0


def test_write_then_stat_and_read(backend: Backend) -> None:
    data = _payload(300_000)
    path = backend.write("step/shard.bin", data)
    s = backend.storage
    assert _kind_size(s.stat(path)) == _ks("file", len(data))
    assert exists(s, path) and is_file(s, path)
    assert s.read_bytes(path) == data
    assert s.read_bytes(path, 10) == data[:10]
    assert s.read_bytes(path, len(data) + 100) == data  # a limit past the end: the whole file


def test_zero_length_reads(backend: Backend, request: pytest.FixtureRequest) -> None:
    path = backend.write("ten.bin", b"0123456789")
    assert backend.storage.read_bytes(path, 0) == b""
    if isinstance(backend.storage, RangedReads):
        assert backend.storage.read_range(path, 5, 5) == b""


def test_empty_file(backend: Backend, request: pytest.FixtureRequest) -> None:
    path = backend.write("empty.bin", b"")
    assert _kind_size(backend.storage.stat(path)) == _ks("file", 0)
    assert backend.storage.read_bytes(path) == b""


def test_open_read_seek_readinto(backend: Backend) -> None:
    data = _payload(200_000)
    path = backend.write("r.bin", data)
    f = backend.storage.open_read(path)
    try:
        for offset, n in [(0, 16), (123_456, 1000), (len(data) - 7, 7), (5, 65_536)]:
            f.seek(offset)
            buf = bytearray(n)
            assert f.readinto(buf) == n
            assert bytes(buf) == data[offset : offset + n]
    finally:
        f.close()


def test_finish_write_checks_size(backend: Backend) -> None:
    s = backend.storage
    path = backend.path("sized.bin")
    f = s.open_write(path)
    f.write(b"abcd")
    if backend.object_store:
        with pytest.raises(StorageError) as info:
            s.finish_write(f, path, 5)
        assert info.value.errno == errno.EIO
    else:
        # LocalStorage ignores ``size``: the bytes went through a local write() that either
        # wrote them all or raised, so there is no upload to confirm; it only fsyncs.
        s.finish_write(f, path, 5)
        assert _kind_size(s.stat(path)) == _ks("file", 4)


def test_abort_write(backend: Backend, request: pytest.FixtureRequest) -> None:
    s = backend.storage
    path = backend.path("aborted.bin")
    f = s.open_write(path)
    f.write(b"partial")
    s.abort_write(f)
    if backend.name == "local":
        # LocalStorage.abort_write only closes the file: the partial (never fsynced) file stays
        # where open_write created it, and the caller's temp step dir is what gets removed.
        assert _kind_size(s.stat(path)) == _ks("file", 7)
        return
    assert s.stat(path) is None
    assert s.listdir(backend.root) == []


# -- stat, listdir, remove, makedirs -----------------------------------------------------------


def test_stat_missing_is_none(backend: Backend) -> None:
    s = backend.storage
    assert s.stat(backend.path("nope")) is None
    assert s.stat(backend.path("nope", "deeper", "x.bin")) is None
    assert not exists(s, backend.path("nope")) and not is_file(s, backend.path("nope"))


def test_stat_of_a_directory(backend: Backend) -> None:
    backend.write("d/sub/x.bin", b"x")
    s = backend.storage
    assert _kind_size(s.stat(backend.path("d"))) == _ks("dir")
    assert _kind_size(s.stat(backend.path("d", "sub"))) == _ks("dir")
    assert exists(s, backend.path("d")) and not is_file(s, backend.path("d"))


def test_listdir(backend: Backend) -> None:
    for rel in ["d/b.bin", "d/a.bin", "d/sub/c.bin", "d/sub/deeper/e.bin", "other/z.bin"]:
        backend.write(rel, b"1")
    s = backend.storage
    assert s.listdir(backend.path("d")) == ["a.bin", "b.bin", "sub"]  # immediate children, sorted
    assert s.listdir(backend.path("d", "sub")) == ["c.bin", "deeper"]
    assert s.listdir(backend.root) == ["d", "other"]
    assert s.listdir(backend.path("missing")) == []


def test_probe_file(backend: Backend) -> None:
    """``probe_file`` answers only "is a regular file there": a directory (on S3, a prefix
    with objects under it) and a missing path both read as None."""
    from asyncckpt.storage import probe_file

    f = backend.write("d/sub/x.bin", b"xyz")
    s = backend.storage
    assert _kind_size(probe_file(s, f)) == _ks("file", 3)
    st = probe_file(s, backend.path("d"))
    assert st is None or st.kind == "dir"  # a backend without a cheaper probe answers with stat
    assert not is_file(s, backend.path("d")) and not is_file(s, backend.path("d", "sub"))
    assert probe_file(s, backend.path("d", "nope.bin")) is None
    empty = backend.write("d/empty.bin", b"")
    assert _kind_size(probe_file(s, empty)) == _ks("file", 0)


def test_remove_file(backend: Backend) -> None:
    a = backend.write("d/a.bin", b"a")
    b = backend.write("d/b.bin", b"b")
    backend.storage.remove(a)
    assert backend.storage.stat(a) is None
    assert _kind_size(backend.storage.stat(b)) == _ks("file", 1)
    assert backend.storage.listdir(backend.path("d")) == ["b.bin"]


def test_remove_tree(backend: Backend) -> None:
    for rel in ["t/a.bin", "t/sub/b.bin", "t/sub/deeper/c.bin"]:
        backend.write(rel, b"abc")
    keep = backend.write("keep.bin", b"k")
    s = backend.storage
    s.remove(backend.path("t"))
    assert s.stat(backend.path("t")) is None
    assert s.stat(backend.path("t", "sub", "b.bin")) is None
    assert s.listdir(backend.path("t")) == []
    assert _kind_size(s.stat(keep)) == _ks("file", 1)
    assert s.listdir(backend.root) == ["keep.bin"]


def test_remove_missing_is_fine(backend: Backend) -> None:
    backend.storage.remove(backend.path("never", "was"))
    backend.storage.remove(backend.path("never"))


def test_makedirs_is_idempotent(backend: Backend) -> None:
    s = backend.storage
    d = backend.path("a", "b", "c")
    s.makedirs(d)
    s.makedirs(d)
    s.makedirs(backend.path("a"))
    path = backend.write("a/b/c/f.bin", b"f")  # the directory is usable
    s.makedirs(d)  # and still fine once it has content
    assert _kind_size(s.stat(path)) == _ks("file", 1)
    assert s.listdir(d) == ["f.bin"]


# -- errors and retries ------------------------------------------------------------------------


def test_is_transient(backend: Backend) -> None:
    s = backend.storage
    assert not s.is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not s.is_transient(PermissionError(errno.EACCES, "denied"))
    for exc in (TimeoutError("timed out"), ConnectionError("reset"), ConnectionResetError()):
        # LocalStorage is never transient: a local OSError will not go away by retrying
        assert s.is_transient(exc) is backend.object_store, exc


def test_retrying_retries_transient_errors_then_raises(backend: Backend, no_sleep: list[float]) -> None:
    s = backend.storage
    s.retries = 3
    calls = 0

    def always_times_out() -> None:
        nonlocal calls
        calls += 1
        raise TimeoutError("timed out")

    with pytest.raises(TimeoutError):
        retrying(s, always_times_out)
    if backend.object_store:
        assert calls == 4  # the first try and 3 retries
        assert no_sleep == [0.2, 0.4, 0.8]  # exponential backoff
    else:
        assert calls == 1 and no_sleep == []  # nothing is transient on LocalStorage


def test_retrying_recovers(fsspec_backend: Backend, no_sleep: list[float]) -> None:
    s = fsspec_backend.storage
    s.retries = 3
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retrying(s, flaky) == "ok"
    assert calls == 3 and len(no_sleep) == 2


def test_retrying_raises_permanent_errors_at_once(backend: Backend, no_sleep: list[float]) -> None:
    s = backend.storage
    s.retries = 5
    calls = 0

    def denied() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError(errno.EACCES, "access denied")

    with pytest.raises(PermissionError):
        retrying(s, denied)
    assert calls == 1 and no_sleep == []


def test_retrying_with_zero_retries(fsspec_backend: Backend, no_sleep: list[float]) -> None:
    s = fsspec_backend.storage
    s.retries = 0
    calls = 0

    def times_out() -> None:
        nonlocal calls
        calls += 1
        raise TimeoutError

    with pytest.raises(TimeoutError):
        retrying(s, times_out)
    assert calls == 1 and no_sleep == []


def _flaky_cat_file(
    monkeypatch: pytest.MonkeyPatch, storage: FsspecStorage, exc: BaseException
) -> Callable[[], int]:
    """Make the filesystem's ``cat_file`` fail once with ``exc``; returns the call count."""
    real = storage.fs.cat_file
    calls = 0

    def cat_file(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(storage.fs, "cat_file", cat_file)
    return lambda: calls


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(TimeoutError("timed out"), id="TimeoutError"),
        pytest.param(
            ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            id="ConnectionRefusedError",
        ),
    ],
)
def test_reads_retry_transient_filesystem_errors(
    fsspec_backend: Backend, monkeypatch: pytest.MonkeyPatch, no_sleep: list[float], exc: BaseException
) -> None:
    data = b"0123456789"
    path = fsspec_backend.write("flaky.bin", data)
    s = fsspec_backend.storage
    s.retries = 2
    calls = _flaky_cat_file(monkeypatch, s, exc)
    assert s.read_bytes(path) == data
    assert calls() == 2
    calls = _flaky_cat_file(monkeypatch, s, exc)
    assert s.read_range(path, 2, 5) == b"234"
    assert calls() == 2


# -- capabilities ------------------------------------------------------------------------------


def test_capabilities(backend: Backend) -> None:
    s = backend.storage
    if backend.name == "local":
        assert isinstance(s, AtomicRename) and renames_atomically(s)
        assert not isinstance(s, RangedReads)
        assert not isinstance(s, RootCheck)
        assert not isinstance(s, MultipartUploads)
    else:
        assert not isinstance(s, AtomicRename) and not renames_atomically(s)
        assert isinstance(s, RangedReads)
        assert isinstance(s, RootCheck)
        # the class has the methods for every protocol (runtime_checkable only looks for them);
        # off S3, pending_uploads() is always [] and check_root() a no-op
        assert isinstance(s, MultipartUploads)


def test_read_range(fsspec_backend: Backend) -> None:
    data = _payload(100_000)
    path = fsspec_backend.write("ranged.bin", data)
    s = fsspec_backend.storage
    for start, end in [(0, 1), (0, len(data)), (17, 4113), (len(data) - 3, len(data))]:
        assert s.read_range(path, start, end) == data[start:end]
    assert s.read_range(path, len(data) - 3, len(data) + 50) == data[-3:]  # clipped at the end


def test_read_into(backend: Backend) -> None:
    """Every backend reads straight into memory (S3: one ranged GET whose body is copied in as
    it arrives): whole, partial, clipped at the end, past the end, and a missing file."""
    s = backend.storage
    assert isinstance(s, BufferReads)
    data = _payload(3 * MiB + 4321)  # several network chunks
    path = backend.write("into.bin", data)
    buf = bytearray(len(data))
    assert s.read_into(path, 0, memoryview(buf)) == len(data) and bytes(buf) == data
    for offset, n in [(0, 1), (17, 4113), (MiB - 5, 2 * MiB + 9), (len(data) - 3, 3)]:
        out = bytearray(n)
        assert s.read_into(path, offset, memoryview(out)) == n
        assert bytes(out) == data[offset : offset + n]
    tail = bytearray(100)
    assert s.read_into(path, len(data) - 3, memoryview(tail)) == 3  # fewer only at the end
    assert bytes(tail[:3]) == data[-3:]
    assert s.read_into(path, len(data), memoryview(bytearray(8))) == 0
    assert s.read_into(path, len(data) + 10, memoryview(bytearray(8))) == 0
    assert s.read_into(path, 0, memoryview(bytearray())) == 0
    with pytest.raises(StorageError) as info:
        s.read_into(backend.path("missing.bin"), 0, memoryview(bytearray(4)))
    assert info.value.errno == errno.ENOENT


def test_a_storage_error_raised_inside_a_call_comes_out_unchanged(fsspec_backend: Backend) -> None:
    """``_call`` wrapped an error that was already a StorageError as its own cause, and
    ``is_transient`` then followed that cause forever (a RecursionError, not the error)."""
    s = fsspec_backend.storage
    mine = StorageError(errno.EIO, "the store sent more than the 8 bytes asked for", "k")

    def bad() -> None:
        raise mine

    with pytest.raises(StorageError) as info:
        retrying(s, lambda: s._call("read", "k", bad))
    assert info.value is mine and not s.is_transient(info.value)


def test_check_root(fsspec_backend: Backend) -> None:
    s = fsspec_backend.storage
    s.check_root(fsspec_backend.root)  # the bucket (or memory root) is there
    if fsspec_backend.name == "s3":
        missing = f"s3://nobucket{uuid.uuid4().hex[:8]}/run"
        with pytest.raises(StorageError, match="does not exist") as info:
            s.check_root(missing)
        assert info.value.errno == errno.ENOENT


def test_pending_uploads_empty_without_multipart(fsspec_backend: Backend) -> None:
    fsspec_backend.write("small.bin", b"small")
    assert fsspec_backend.storage.pending_uploads(fsspec_backend.root) == []


# -- LocalStorage specifics --------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Any) -> Iterator[Backend]:
    yield from _local(tmp_path)


def test_local_rename_dir(local: Backend) -> None:
    s = local.storage
    local.write("tmp-step/a.bin", b"a")
    s.rename_dir(local.path("tmp-step"), local.path("step"))
    s.sync_dir(local.root)
    assert s.stat(local.path("tmp-step")) is None
    assert s.read_bytes(local.path("step", "a.bin")) == b"a"


@pytest.mark.parametrize("dst_kind", ["empty dir", "full dir", "file"])
def test_local_rename_dir_refuses_existing_destination(local: Backend, dst_kind: str) -> None:
    s = local.storage
    local.write("src/a.bin", b"a")
    dst = local.path("dst")
    if dst_kind == "file":
        local.write("dst", b"d")
    else:
        s.makedirs(dst)
        if dst_kind == "full dir":
            local.write("dst/old.bin", b"old")
    before = s.listdir(dst)
    with pytest.raises(StorageError) as info:
        s.rename_dir(local.path("src"), dst)
    assert info.value.errno == errno.EEXIST
    assert s.listdir(local.path("src")) == ["a.bin"]  # nothing moved
    assert s.listdir(dst) == before


def test_local_stat_symlink_is_link_never_followed(local: Backend) -> None:
    s = local.storage
    target = local.write("target.bin", b"secret")
    link = local.path("link.bin")
    os.symlink(target, link)
    dir_link = local.path("dir-link")
    os.symlink(local.root, dir_link)
    dangling = local.path("dangling")
    os.symlink(local.path("nowhere"), dangling)
    assert _kind_size(s.stat(link)) == _ks("link")
    assert _kind_size(s.stat(dir_link)) == _ks("link")
    assert _kind_size(s.stat(dangling)) == _ks("link")
    assert not is_file(s, link) and exists(s, dangling)
    s.remove(dir_link)  # unlinks the link, never the tree it points to
    assert s.stat(dir_link) is None and _kind_size(s.stat(target)) == _ks("file", 6)


def test_local_stat_fifo_is_other(local: Backend) -> None:
    s = local.storage
    fifo = local.path("fifo")
    os.mkfifo(fifo)
    assert _kind_size(s.stat(fifo)) == _ks("other")
    assert not is_file(s, fifo)
    s.remove(fifo)  # unlinked, never opened (opening a FIFO would block)
    assert s.stat(fifo) is None


def test_local_open_write_never_clobbers(local: Backend) -> None:
    s = local.storage
    path = local.write("f.bin", b"original")
    with pytest.raises(StorageError) as info:
        s.open_write(path)
    assert info.value.errno == errno.EEXIST
    assert s.read_bytes(path) == b"original"


def test_local_errors_are_storage_errors(local: Backend) -> None:
    s = local.storage
    with pytest.raises(StorageError) as info:
        s.read_bytes(local.path("missing.bin"))
    assert info.value.errno == errno.ENOENT and isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(StorageError):
        s.open_read(local.path("missing.bin"))
    with pytest.raises(StorageError):
        s.open_write(local.path("no", "parent", "f.bin"))


def test_local_listdir_of_a_file_is_empty(local: Backend) -> None:
    path = local.write("f.bin", b"f")
    assert local.storage.listdir(path) == []
    assert local.storage.stat(path + "/child") is None


# -- FsspecStorage specifics -------------------------------------------------------------------


def test_fsspec_missing_backend_is_a_config_error(monkeypatch: pytest.MonkeyPatch, request) -> None:
    import fsspec

    from asyncckpt.errors import ConfigError

    def no_backend(protocol: str, **kwargs: Any) -> Any:
        raise ImportError(f"Install gcsfs to access {protocol}://")

    monkeypatch.setattr(fsspec, "filesystem", no_backend)
    with pytest.raises(ConfigError, match="no fsspec backend for gs://"):
        FsspecStorage("gs://bucket/run")


def test_fsspec_errors_are_storage_errors(fsspec_backend: Backend) -> None:
    s = fsspec_backend.storage
    with pytest.raises(StorageError) as info:
        s.read_bytes(fsspec_backend.path("missing.bin"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(StorageError):
        s.read_range(fsspec_backend.path("missing.bin"), 0, 4)


# -- S3 specifics ------------------------------------------------------------------------------


@pytest.fixture
def s3_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from _s3(request)


@pytest.mark.s3
def test_s3_abort_multipart_write(s3_backend: Backend) -> None:
    s = s3_backend.storage
    assert s.block_size == PART
    path = s3_backend.path("big.bin")
    f = s.open_write(path)
    f.write(b"\0" * (PART + MiB))  # over one part: s3fs starts a multipart upload
    pending = s.pending_uploads(s3_backend.root)
    assert [url for url, _, _ in pending] == [path]  # the upload really is multipart
    s.abort_write(f)
    assert s.pending_uploads(s3_backend.root) == []
    assert s.stat(path) is None
    assert s.listdir(s3_backend.root) == []


@pytest.mark.s3
def test_s3_multipart_write_round_trips(s3_backend: Backend) -> None:
    data = _payload(PART + 12_345)
    path = s3_backend.write("big.bin", data)  # finish_write confirms the size
    s = s3_backend.storage
    assert _kind_size(s.stat(path)) == _ks("file", len(data))
    assert s.pending_uploads(s3_backend.root) == []
    assert s.read_range(path, PART - 4, PART + 4) == data[PART - 4 : PART + 4]


@pytest.mark.s3
def test_s3_listdir_and_remove_past_one_page(s3_backend: Backend) -> None:
    """S3 lists at most 1,000 keys per page and deletes at most 1,000 per request: a prefix
    with more is listed and removed whole, and nothing next to it is touched."""
    s = s3_backend.storage
    n = 1001
    s.fs.pipe({s3_backend.path("many", f"k{i:05d}"): b"x" for i in range(n)})
    s.fs.pipe({s3_backend.path("many", "sub", "deep.bin"): b"y", s3_backend.path("many0", "keep.bin"): b"z"})
    names = s.listdir(s3_backend.path("many"))
    assert names == sorted([f"k{i:05d}" for i in range(n)] + ["sub"])
    s.remove(s3_backend.path("many"))
    assert s.listdir(s3_backend.path("many")) == []
    assert s.stat(s3_backend.path("many")) is None
    assert s.listdir(s3_backend.root) == ["many0"]  # a sibling sharing the name's prefix stays


@pytest.mark.s3
def test_s3_remove_refuses_a_whole_bucket(s3_backend: Backend) -> None:
    s = s3_backend.storage
    keep = s3_backend.write("keep.bin", b"k")
    bucket = s3_backend.root.split("/")[2]
    with pytest.raises(StorageError, match="whole bucket"):
        s.remove(f"s3://{bucket}")
    assert is_file(s, keep)


@pytest.mark.s3
def test_s3_abort_upload(s3_backend: Backend) -> None:
    """What ``gc`` does for a writer killed mid-upload: list its open upload and abort it."""
    s = s3_backend.storage
    path = s3_backend.path("killed.bin")
    f = s.open_write(path)
    f.write(b"\0" * (PART + MiB))
    [(url, upload_id, started)] = s.pending_uploads(s3_backend.root)
    assert url == path and upload_id and (started is None or started > 0)
    s.abort_upload(url, upload_id)
    assert s.pending_uploads(s3_backend.root) == []
    f.closed = True  # the file's upload is gone: keep s3fs from flushing it at collection


def test_botocore_connection_errors_are_transient() -> None:
    botocore_exceptions = pytest.importorskip("botocore.exceptions")
    s = FsspecStorage("memory://unused")
    assert s.is_transient(botocore_exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert s.is_transient(botocore_exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"))
    assert s.is_transient(botocore_exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))


def _closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _unreachable_s3() -> tuple[FsspecStorage, str]:
    """An S3 storage whose endpoint is a closed port on 127.0.0.1 (no traffic goes elsewhere)."""
    pytest.importorskip("s3fs")
    opts = {
        "key": KEY_ID,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
        "skip_instance_cache": True,
    }
    root = "s3://unreachable-bucket/run"
    s = FsspecStorage(root, opts, retries=0)
    s.fs.retries = 1  # s3fs's own retry loop (5 tries with backoff by default): keep this fast
    return s, root


@pytest.mark.s3
def test_s3_unreachable_is_an_error_never_missing() -> None:
    """A transient error is never taken for "missing": stat and listdir raise, not None / []."""
    s, root = _unreachable_s3()
    ops: list[Callable[[], Any]] = [
        lambda: s.stat(f"{root}/manifest.json"),  # not None
        lambda: s.listdir(root),  # not []
    ]
    for op in ops:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            op()
        assert time.monotonic() - t0 < 10
        assert SECRET not in str(info.value) and KEY_ID not in str(info.value)


@pytest.mark.s3
def test_s3_unreachable_is_not_a_missing_bucket() -> None:
    s, root = _unreachable_s3()
    with pytest.raises(StorageError) as info:
        s.check_root(root)
    assert "does not exist" not in str(info.value)
