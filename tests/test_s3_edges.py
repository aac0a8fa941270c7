"""Edge cases of the S3 request path (storage/s3.py, FsspecStorage's S3 branches), against the
real moto server on 127.0.0.1, some through the fault proxy (loopback only)."""

from __future__ import annotations

import errno
import os

import pytest

from asyncckpt import StorageError
from asyncckpt.storage import FsspecStorage, is_file, probe_file

from .faultproxy import matching

pytestmark = pytest.mark.s3

MiB = 1 << 20
PART = 5 * MiB


def _put(fs, url: str, data: bytes = b"x") -> None:
    bucket, _, key = url[5:].partition("/")
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)


def _keys(fs, url: str) -> list[str]:
    bucket, _, prefix = url[5:].partition("/")
    out, query = [], {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_objects_v2", **query)
        out += [o["Key"] for o in page.get("Contents") or []]
        if not page.get("IsTruncated"):
            return out
        query["ContinuationToken"] = page["NextContinuationToken"]


# --------------------------------------------------------------------------- listing, deleting


def test_listdir_and_remove_at_exactly_one_page(s3) -> None:
    """Exactly 1,000 names under the delimiter (one full page, no continuation), and a removal
    of 1,001 objects plus the key itself (1,002 keys: a full bulk DELETE and a short one)."""
    root, opts, fs = s3
    s = FsspecStorage(root, opts)
    fs.pipe({f"{root}/a/f{i:04d}": b"x" for i in range(999)})
    fs.pipe({f"{root}/a/zz/1": b"1", f"{root}/a/zz/2": b"2", f"{root}/a0/keep": b"k", f"{root}/a.bin": b"k"})
    names = s.listdir(f"{root}/a")
    assert len(names) == 1000
    assert names == sorted([f"f{i:04d}" for i in range(999)] + ["zz"])
    s.remove(f"{root}/a")
    fs.invalidate_cache()
    assert _keys(fs, f"{root}/a/") == []
    prefix = root[5:].partition("/")[2]
    assert sorted(_keys(fs, root)) == [f"{prefix}/a.bin", f"{prefix}/a0/keep"]
    assert s.listdir(root) == ["a.bin", "a0"]


def test_remove_a_step_whose_name_is_also_a_file_keeps_siblings_sharing_its_prefix(s3) -> None:
    """``step_1`` is both an object and a prefix (and has a directory marker): all of it goes;
    step_10, step_1.tmp, step_1-x and step_1_ stay."""
    root, opts, fs = s3
    s = FsspecStorage(root, opts)
    gone = ["step_1", "step_1/", "step_1/manifest.json", "step_1/sub/deep.bin"]
    kept = ["step_10/manifest.json", "step_1.tmp", "step_1-x/a", "step_1_/b", "step_100"]
    for k in gone + kept:
        _put(fs, f"{root}/{k}")
    assert s.listdir(root) == sorted(["step_1", "step_10", "step_1.tmp", "step_1-x", "step_1_", "step_100"])
    assert is_file(s, f"{root}/step_1") and probe_file(s, f"{root}/step_10") is None
    s.remove(f"{root}/step_1")
    prefix = root[5:].partition("/")[2]
    assert sorted(_keys(fs, root)) == sorted(f"{prefix}/{k}" for k in kept)
    assert s.listdir(root) == sorted(["step_10", "step_1.tmp", "step_1-x", "step_1_", "step_100"])


NAMES = ["a b.bin", "x+y.bin", "p%20q.bin", "ü-é.bin", "amp&lt<>.bin", "q'\"=.bin", "t~!()@,;$.bin"]


def test_special_characters_in_keys(s3) -> None:
    """Names that URL encoding (the LIST's EncodingType=url) or XML escaping (the bulk
    DELETE's body) could mangle: listed, probed, read and removed exactly."""
    root, opts, fs = s3
    s = FsspecStorage(root, opts)
    for i, n in enumerate(NAMES):
        _put(fs, f"{root}/d/{n}", bytes([i]) * (i + 1))
        _put(fs, f"{root}/d/sub {n}/x", b"y")
    assert s.listdir(f"{root}/d") == sorted(NAMES + [f"sub {n}" for n in NAMES])
    for i, n in enumerate(NAMES):
        st = probe_file(s, f"{root}/d/{n}")
        assert st is not None and st.kind == "file" and st.size == i + 1, n
        out = bytearray(i + 5)
        assert s.read_into(f"{root}/d/{n}", 0, memoryview(out)) == i + 1
        assert bytes(out[: i + 1]) == bytes([i]) * (i + 1)
    s.remove(f"{root}/d/{NAMES[0]}")  # one file with a space: only it
    assert NAMES[0] not in s.listdir(f"{root}/d")
    s.remove(f"{root}/d")
    assert _keys(fs, f"{root}/d") == []


def test_listdir_of_a_file_is_empty_on_s3_like_local(s3) -> None:
    """s3fs's ls of a key lists the key itself; the library's single LIST of ``key/``
    answers [] (what LocalStorage answers)."""
    root, opts, fs = s3
    s = FsspecStorage(root, opts)
    _put(fs, f"{root}/f.bin")
    assert s.listdir(f"{root}/f.bin") == []


# --------------------------------------------------------------------------- writes


@pytest.mark.parametrize("size", [0, 1, PART, PART + 1, 2 * PART])
def test_write_file_sizes_at_the_boundaries(s3, size: int) -> None:
    """write_file of 0 bytes (one PUT: s3fs touches), exactly part_size (the largest single
    PUT), part_size + 1 (a 1-byte last part) and an exact multiple of the part size, from a
    writable padded buffer like a staging slot."""
    root, opts, fs = s3
    s = FsspecStorage(root, opts, part_size=PART, upload_concurrency=2)
    raw = os.urandom(size)
    data = memoryview(bytearray(raw + b"\xee" * 4096))
    path = f"{root}/w{size}.bin"
    s.write_file(path, data, size)
    st = probe_file(s, path)
    assert st is not None and st.size == size
    fs.invalidate_cache()
    assert fs.cat_file(path[5:]) == raw
    assert s.pending_uploads(root) == []
    if size:
        out = memoryview(bytearray(size + 10))
        assert s.read_into(path, 0, out) == size
        assert bytes(out[:size]) == raw
    else:
        assert s.read_into(path, 0, memoryview(bytearray(8))) == 0  # empty object: a 416, read as 0


def test_a_single_put_that_fails_leaves_nothing_and_is_an_error(proxied) -> None:
    """The single-PUT path skips the HEAD: a PUT that the store throttles (or whose connection
    drops) must still fail the write, and leave no object behind."""
    root, opts, fs, px = proxied
    s = FsspecStorage(root, opts)
    s.retries = 0
    for mode in ("throttle", "drop"):
        px.set(mode, matching("PUT"))
        path = f"{root}/{mode}.bin"
        with pytest.raises(StorageError):
            s.write_file(path, memoryview(bytearray(b"abc" * 100)), 300)
        px.set("pass")
        fs.invalidate_cache()
        assert not fs.exists(path[5:])


def test_a_multipart_completion_whose_answer_is_lost(proxied) -> None:
    """The store completes the upload but its answer is cut: the write may fail (a transient
    error) but must leave no open upload, and whatever object is there is whole."""
    root, opts, fs, px = proxied
    s = FsspecStorage(root, opts, part_size=PART, upload_concurrency=2)
    s.retries = 0
    size = 2 * PART + 7
    raw = os.urandom(size)
    path = f"{root}/mp.bin"
    px.set("cut", matching("POST", r"uploadId="), count=1)
    try:
        s.write_file(path, memoryview(bytearray(raw)), size)
    except StorageError as e:
        assert s.is_transient(e), e
    px.set("pass")
    assert s.pending_uploads(root) == []
    fs.invalidate_cache()
    if fs.exists(path[5:]):
        assert fs.cat_file(path[5:]) == raw


# --------------------------------------------------------------------------- errors never "missing"


@pytest.mark.timeout(120)
def test_throttled_requests_raise_never_read_as_missing(proxied) -> None:
    root, opts, fs, px = proxied
    s = FsspecStorage(root, opts)
    s.retries = 1
    _put(fs, f"{root}/d/f.bin", b"abc")
    px.set("throttle", matching("HEAD"))
    for p in (f"{root}/d/f.bin", f"{root}/d/nope.bin"):
        with pytest.raises(StorageError) as ei:
            probe_file(s, p)
        assert ei.value.errno != errno.ENOENT
    px.set("throttle", matching("GET", r"list-type=2"))
    with pytest.raises(StorageError):
        s.listdir(f"{root}/d")
    px.set("throttle", matching("POST", r"delete"))  # the LIST passes, the bulk DELETE does not
    with pytest.raises(StorageError) as ei:
        s.remove(f"{root}/d")
    assert s.is_transient(ei.value)
    px.set("throttle", matching("GET", r"f\.bin"))
    with pytest.raises(StorageError):
        s.read_into(f"{root}/d/f.bin", 0, memoryview(bytearray(3)))
    px.set("pass")
    assert is_file(s, f"{root}/d/f.bin")  # nothing was deleted


@pytest.mark.timeout(120)
@pytest.mark.parametrize("op", ["probe_file", "stat"])
def test_a_head_answered_500_is_retried_like_other_5xx(proxied, op: str) -> None:
    """A HEAD has no body, so a 500 reaches the library as OSError(EREMOTEIO, "Internal Server
    Error"); is_transient must call it transient (the Storage protocol: 5xx is worth
    retrying), as it does a 503 HEAD, or a 500 with a body."""
    root, opts, fs, px = proxied
    s = FsspecStorage(root, opts)
    s.retries = 2
    _put(fs, f"{root}/f.bin", b"abc")
    px.set("error", matching("HEAD"))
    with pytest.raises(StorageError) as ei:
        (probe_file if op == "probe_file" else FsspecStorage.stat)(s, f"{root}/f.bin")  # never None
    assert ei.value.errno != errno.ENOENT
    assert px.faulted["HEAD"] == s.retries + 1, (px.faulted, ei.value)  # retried


@pytest.mark.timeout(120)
def test_a_ranged_read_the_store_answers_whole_is_an_error_not_wrong_bytes(proxied) -> None:
    """A server (or a proxy) that ignores ``Range`` answers 200 with the object from byte 0:
    a read at an offset must fail, never fill the buffer with the wrong bytes."""
    root, opts, fs, px = proxied
    s = FsspecStorage(root, opts)
    s.retries = 0
    raw = os.urandom(64 * 1024)
    _put(fs, f"{root}/r.bin", raw)
    out = memoryview(bytearray(len(raw)))
    assert s.read_into(f"{root}/r.bin", 1000, out[:4096]) == 4096
    assert bytes(out[:4096]) == raw[1000:5096]
    px.set("norange", matching("GET", r"r\.bin"))
    out = memoryview(bytearray(len(raw)))
    with pytest.raises(StorageError, match="Range"):
        s.read_into(f"{root}/r.bin", 1000, out)
    assert s.read_into(f"{root}/r.bin", 0, out) == len(raw)  # from byte 0 the answer is right
    assert bytes(out) == raw


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [r"\.distcp", r"\.metadata", r"manifest\.json"])
def test_one_throttled_put_of_any_file_of_a_save_is_retried(proxied, name: str) -> None:
    """Shard files were retried, the small commit files (``.metadata``, the manifest) were
    not: one 503 on either lost the whole step."""
    import torch

    from asyncckpt import AsyncCheckpointer, StorageOptions, resume

    root, opts, fs, px = proxied
    storage = FsspecStorage(root, opts)
    storage.retries = 3
    state = {"w": torch.arange(1000.0)}
    with AsyncCheckpointer(root, state, storage=StorageOptions(backend=storage)) as ck:
        px.set("throttle", matching("PUT", name), count=1)
        ck.save_async(1).result()
    assert px.faulted["PUT"] == 1
    live = {"w": torch.zeros(1000)}
    assert resume(root, live, storage_options=opts) == 1
    assert torch.equal(live["w"], state["w"])
