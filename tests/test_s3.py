"""URL roots: a real moto S3 server on 127.0.0.1 over HTTP, and fsspec's memory://."""

from __future__ import annotations

import errno
import logging
import os
import uuid

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageError, WriteError, list_checkpoints, resume
from asyncckpt.policy import KeepLast
from asyncckpt.storage import FsspecStorage

from .conftest import KEY_ID, SECRET
from .helpers import assert_same, snapshot, tiny_model, train_steps

pytestmark = pytest.mark.s3


def _state(seed: int = 0) -> dict:
    model = tiny_model(seed)
    opt = torch.optim.Adam(model.parameters())
    train_steps(model, opt, 2)
    return {"model": model, "optim": opt, "extra": {"epoch": seed}}


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_s3_round_trip_list_and_resume(s3, executor: str) -> None:
    root, opts, fs = s3
    state = _state(1)
    with AsyncCheckpointer(root, state, storage_options=opts, executor=executor) as ck:
        ck.save_async(1, metrics={"loss": 2.0}).result()
        train_steps(state["model"], state["optim"], 1)
        ck.save_async(2).result()
    expected = snapshot(state)
    infos = list_checkpoints(root, storage_options=opts)
    assert [(c.step, c.metrics) for c in infos] == [(1, {"loss": 2.0}), (2, {})]
    assert infos[-1].path == f"{root}/step_000000002"
    assert fs.exists(f"{root[5:]}/step_000000002/manifest.json")
    fresh = _state(9)
    fresh["optim"] = torch.optim.Adam(fresh["model"].parameters())
    assert resume(root, fresh, storage_options=opts) == 2
    assert_same(snapshot(fresh), expected)
    assert fresh["extra"]["epoch"] == 1


def test_prefix_without_manifest_is_ignored_and_corrupt_newest_falls_back(s3) -> None:
    root, opts, fs = s3
    state = _state(2)
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        ck.save_async(1).result()
        first = snapshot(state)
        train_steps(state["model"], state["optim"], 1)
        ck.save_async(2).result()
    bucket_root = root[5:]
    fs.pipe(f"{bucket_root}/step_000000003/__0_0.distcp", b"half an upload")  # crashed writer
    shard = f"{bucket_root}/step_000000002/__0_0.distcp"
    data = bytearray(fs.cat(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(shard, bytes(data))
    assert [c.step for c in list_checkpoints(root, storage_options=opts)] == [1, 2]
    fresh = _state(5)
    with pytest.warns(RuntimeWarning, match="skipping step 2.*checksum"):
        assert resume(root, fresh, storage_options=opts) == 1
    assert_same(snapshot(fresh), first)


def test_retention_on_s3_deletes_manifest_first(s3) -> None:
    root, opts, fs = s3
    state = {"w": torch.arange(100.0)}
    with AsyncCheckpointer(root, state, storage_options=opts, keep=[KeepLast(2)]) as ck:
        for step in range(1, 6):
            ck.save_async(step).result()
    assert [c.step for c in list_checkpoints(root, storage_options=opts)] == [4, 5]
    assert not fs.exists(f"{root[5:]}/step_000000001")


class _FlakyS3(FsspecStorage):
    """The real S3 storage with injected faults on whole-file writes."""

    def __init__(self, url: str, opts: dict, fail: list[BaseException]) -> None:
        super().__init__(url, opts)
        self.fail = fail
        self.opens = 0

    def open_write(self, path: str):
        self.opens += path.endswith(".distcp")  # shard files (not owner records or markers)
        if self.fail and path.endswith(".distcp"):
            raise self._wrap("open for writing", path, self.fail.pop(0))  # as a real failure would be
        return super().open_write(path)


def test_transient_errors_are_retried_to_success(s3) -> None:
    root, opts, _ = s3
    storage = _FlakyS3(
        root, opts, [ConnectionResetError("connection reset by peer"), TimeoutError("read timed out")]
    )
    storage.retries = 3
    state = {"w": torch.arange(1000.0)}
    with AsyncCheckpointer(root, state, storage=storage) as ck:
        ck.save_async(1).result()
    assert storage.opens == 2 + 1  # two failed attempts at the shard, then the shard
    fresh = {"w": torch.zeros(1000)}
    assert resume(root, fresh, storage_options=opts) == 1 and torch.equal(fresh["w"], state["w"])


def test_permanent_errors_fail_at_once_naming_the_url(s3) -> None:
    root, opts, _ = s3
    storage = _FlakyS3(root, opts, [PermissionError(errno.EACCES, "Access Denied")])
    with AsyncCheckpointer(root, {"w": torch.ones(10)}, storage=storage) as ck:
        with pytest.raises(WriteError) as ei:
            ck.save_async(1).result()
    assert storage.opens == 1  # not retried
    cause = ei.value.__cause__
    assert isinstance(cause, StorageError) and cause.errno == errno.EACCES
    assert root in str(cause) and "Access denied" in str(cause)


def test_missing_bucket_is_a_clear_storage_error(s3) -> None:
    _, opts, _ = s3
    root = "s3://no-such-bucket-here/run"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as ei:
        AsyncCheckpointer(root, {"w": torch.ones(10)}, storage_options=opts)  # before training starts
    assert ei.value.errno == errno.ENOENT


def test_upload_dropped_midway_leaves_no_manifest(s3) -> None:
    root, opts, fs = s3

    class Dropping(FsspecStorage):
        armed = False

        def open_write(self, path: str):
            f = super().open_write(path)
            if self.armed and path.endswith(".distcp"):
                real = f.write

                def write(b, _real=real, _f=f):
                    if _f.tell() + memoryview(b).nbytes > 100:  # the connection drops after 100 bytes
                        raise OSError(errno.EPIPE, "Broken pipe (injected drop)")
                    return _real(b)

                f.write = write
            return f

    storage = Dropping(root, opts)
    storage.retries = 1
    state = {"w": torch.arange(50_000.0)}
    with AsyncCheckpointer(root, state, storage=storage) as ck:
        ck.save_async(1).result()
        first = snapshot(state)
        state["w"].add_(1)
        storage.armed = True
        with pytest.raises(WriteError):
            ck.save_async(2).result()
    assert not fs.exists(f"{root[5:]}/step_000000002/manifest.json")
    fresh = {"w": torch.zeros(50_000)}
    assert resume(root, fresh, storage_options=opts) == 1
    assert_same(snapshot(fresh), first)
    assert list(fs.call_s3("list_multipart_uploads", Bucket=root[5:].split("/")[0]).get("Uploads", [])) == []


def test_credentials_never_leak(s3, caplog: pytest.LogCaptureFixture) -> None:
    root, opts, fs = s3
    caplog.set_level(logging.DEBUG)
    state = {"w": torch.arange(10.0), "extra": {"note": "hello"}}
    texts = []
    with AsyncCheckpointer(root, state, storage_options=opts, executor="process") as ck:
        ck.save_async(1).result()
        texts += [repr(ck), repr(ck._pipeline.storage), str(ck.stats())]
    with pytest.raises(StorageError) as missing:
        AsyncCheckpointer("s3://no-such-bucket-x/r", state, storage_options=opts)
    texts += [str(missing.value), repr(missing.value)]
    flaky = _FlakyS3(root, opts, [PermissionError(errno.EACCES, f"denied for {KEY_ID}")])
    with AsyncCheckpointer(root, state, storage=flaky) as ck:
        with pytest.raises(WriteError) as ei:
            ck.save_async(2).result()
    texts += [str(ei.value), repr(ei.value.__cause__), repr(flaky)]
    texts.append(caplog.text)
    for t in texts:
        assert SECRET not in t and KEY_ID not in t
    for path in fs.find(root[5:]):
        assert SECRET.encode() not in fs.cat(path) and KEY_ID.encode() not in fs.cat(path)


def test_memory_url_root(tmp_path) -> None:
    root = f"memory://asyncckpt-test-{uuid.uuid4().hex[:8]}/run"
    state = {"w": torch.randn(300), "extra": {"k": 1}}
    with AsyncCheckpointer(root, state, keep=1) as ck:
        ck.save_async(1)
        ck.save_async(2).result()
    fresh = {"w": torch.zeros(300), "extra": {"k": 0}}
    assert resume(root, fresh) == 2
    assert torch.equal(fresh["w"], state["w"]) and fresh["extra"]["k"] == 1
    assert [c.step for c in list_checkpoints(root)] == [2]
    assert not os.path.exists(root)


_UPLOADER = r"""
import json, os, sys, time
import torch
from asyncckpt import AsyncCheckpointer
opts = json.loads(os.environ["ASYNCCKPT_TEST_OPTS"])
ck = AsyncCheckpointer(sys.argv[1], state={"w": torch.ones(24 << 20)}, storage_options=opts)
ck.save_async(1)
time.sleep(600)
"""


@pytest.mark.multiproc
def test_gc_aborts_the_multipart_upload_of_a_writer_killed_mid_upload(s3, capsys) -> None:
    """SIGKILL a trainer while it uploads a 96 MiB shard in 5 MiB parts: the upload stays open
    on the store (its parts kept, and billed, invisible to listings); `asyncckpt gc` aborts
    it, and step 0 stays loadable throughout."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from asyncckpt.cli import main

    root, opts, _ = s3
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    with AsyncCheckpointer(root, state=state, storage_options=opts) as ck:
        ck.save_async(0).result()
    child_opts = {**opts, "default_block_size": 5 << 20}
    env = {**os.environ, "ASYNCCKPT_TEST_OPTS": json.dumps(child_opts)}
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, root], env=env)
    storage = FsspecStorage(root, opts)
    try:
        deadline = time.monotonic() + 120
        while not storage.pending_uploads(root) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert storage.pending_uploads(root), "the child never started a multipart upload"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    time.sleep(0.5)  # parts in flight at the kill land (or not) on the server
    pending = storage.pending_uploads(root)
    assert len(pending) == 1 and "/step_000000001/" in pending[0][0], pending
    assert pending[0][2] is not None  # the store's start time ...

    o = ["--storage-options", json.dumps(opts)]
    # ... which moto fixes at 2010-11-10, so only an age beyond that shows the upload kept as
    # possibly in progress (real S3 reports the true start time; the default is 1h)
    assert main([*o, "gc", root, "--min-age", "10000d"]) == 0
    assert "skipped multipart upload" in capsys.readouterr().out and storage.pending_uploads(root)
    assert main([*o, "gc", root, "--min-age", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would abort abandoned multipart upload" in out and storage.pending_uploads(root) == pending
    assert main([*o, "gc", root, "--min-age", "0"]) == 0
    out = capsys.readouterr().out
    assert "aborted abandoned multipart upload" in out and "1 abandoned multipart upload" in out
    assert storage.pending_uploads(root) == []
    like = {"w": torch.zeros(1000)}
    assert resume(root, like, storage_options=opts) == 0 and torch.equal(like["w"], state["w"])


def test_default_block_size_sets_the_part_size(s3) -> None:
    root, opts, _ = s3
    assert FsspecStorage(root, opts).block_size == 64 << 20
    assert FsspecStorage(root, {**opts, "default_block_size": 8 << 20}).block_size == 8 << 20


def test_loads_coalesce_neighbouring_blobs_into_few_ranged_gets(s3, monkeypatch) -> None:
    """60 tensors in one shard file load with one ranged GET per 32 MiB span, not one per
    tensor; a tensor bigger than the span still gets its own GET; the data is bit-exact."""
    from asyncckpt.manifest import Chunk
    from asyncckpt.reader import ManifestReader, coalesce

    root, opts, _ = s3
    torch.manual_seed(0)
    state = {f"t{i:02d}": torch.randn(1000 + i) for i in range(60)}
    with AsyncCheckpointer(root, state=state, storage_options=opts, write_threads=1) as ck:
        ck.save_async(1).result()
    calls: list[tuple[str, int, int]] = []
    real = FsspecStorage.read_range

    def counting(self, path: str, start: int, end: int) -> bytes:
        calls.append((path, start, end))
        return real(self, path, start, end)

    monkeypatch.setattr(FsspecStorage, "read_range", counting)
    # a load of part of the file (the whole file is read in one piece into a slab otherwise)
    part = [k for k in state if k != "t59"]
    like = {k: torch.zeros_like(state[k]) for k in part}
    assert resume(root, like, storage_options=opts, strict=False) == 1
    assert all(torch.equal(like[k], state[k]) for k in part)
    assert len(calls) == 1, calls  # ~240 KiB in one file: one GET
    calls.clear()
    monkeypatch.setattr(ManifestReader, "COALESCE_BYTES", 50_000)  # ~12 tensors per GET
    like = {k: torch.zeros_like(state[k]) for k in part}
    assert resume(root, like, storage_options=opts, strict=False) == 1
    assert all(torch.equal(like[k], state[k]) for k in part)
    assert 4 <= len(calls) <= 8 and all(end - start <= 50_000 for _, start, end in calls), calls

    def c(offset: int, length: int) -> Chunk:
        return Chunk([0], [length], "f", offset, length, offset, length, 0)

    groups = coalesce([(c(0, 100), "a"), (c(5000, 100), "b"), (c(100, 100), "c"), (c(200, 10**6), "d")], 1000)
    assert [[r for _, r in g] for g in groups] == [["a", "c"], ["d"], ["b"]]
    gap = coalesce([(c(0, 100), "a"), (c(200 << 10, 100), "b")], 10**9)
    assert [[r for _, r in g] for g in gap] == [["a"], ["b"]]


def test_write_file_uploads_parts_from_reused_buffers_and_aborts_on_a_failed_part(s3, monkeypatch) -> None:
    """More parts than buffers (5 parts, 2 in flight, a short last one) arrive bit-exact; a
    part that fails aborts the upload: no object, no open multipart upload."""
    root, opts, fs = s3
    storage = FsspecStorage(root, opts, part_size=5 << 20, upload_concurrency=2)
    size = 23 << 20
    data = memoryview(bytearray(os.urandom(size) + b"\0" * 4096))  # padded past size, like a slot
    sent: list[int] = []
    real = storage.fs._call_s3

    async def counting(method: str, *args, **kwargs):
        if method == "upload_part":
            sent.append(len(kwargs["Body"]))
            if fail and kwargs["PartNumber"] == 3:
                raise OSError(errno.EIO, "injected part failure")
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(storage.fs, "_call_s3", counting)
    fail = False
    storage.write_file(f"{root}/ok.bin", data, size)
    assert sorted(sent) == [3 << 20] + [5 << 20] * 4
    assert fs.cat_file(f"{root}/ok.bin") == bytes(data[:size])
    fail = True
    with pytest.raises(StorageError):
        storage.write_file(f"{root}/bad.bin", data, size)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/bad.bin")
    assert storage.pending_uploads(root) == []
