"""The writer gives way to training: one CPU nice level and I/O class for every thread that
writes or uploads, never the trainer's; and a bandwidth cap that holds on the wire."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageOptions, WriterOptions
from asyncckpt import writer as writer_mod
from asyncckpt.priority import Pacer
from asyncckpt.storage import s3 as s3_requests

linux = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
MiB = 1 << 20


def _nice(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice


@linux
def test_a_thread_writer_and_its_helpers_get_one_level_and_the_trainer_none(tmp_path, monkeypatch) -> None:
    """The helper threads inherit the writer thread's level; their pools' initializer used
    to add it again (nice=4 gave helpers 8, compression threads 12)."""
    seen: list[int] = []
    real = writer_mod._write_file

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        seen.append(_nice(os.getpid(), threading.get_native_id()))  # on an asyncckpt-io thread
        return real(*a, **k)

    monkeypatch.setattr(writer_mod, "_write_file", spy)
    before = _nice(os.getpid(), threading.get_native_id())
    state = {f"w{i}": torch.randn(1 << 16) for i in range(4)}
    with AsyncCheckpointer(tmp_path / "ck", state, writer=WriterOptions(nice=4, threads=2)) as ck:
        ck.save_async(1).result()
        ck.save_async(2).result()
    assert seen and set(seen) == {min(19, before + 4)}, seen
    assert _nice(os.getpid(), threading.get_native_id()) == before  # the trainer's is untouched


def test_an_s3_multipart_upload_sends_its_parts_at_the_cap() -> None:
    """Parts go on the wire when the cap allows, at most ``concurrency`` ahead: a part's
    buffer used to be handed on before its pacing, so the next parts went out while the
    pacers slept and only the completion waited.  (``call`` stands in for the store here:
    what is tested is when each part is sent.)"""
    part, n, rate, conc = MiB, 40, 10e6, 8
    starts: list[float] = []
    t0 = time.monotonic()

    async def call(op: str, **kw):  # type: ignore[no-untyped-def]
        if op == "create_multipart_upload":
            return {"UploadId": "u"}
        if op == "upload_part":
            starts.append(time.monotonic() - t0)
            await asyncio.sleep(0.005)
            return {"ETag": "e"}
        return {}

    data = memoryview(bytearray(n * part))
    asyncio.run(s3_requests.multipart_upload(call, "b", "k", data, part, conc, Pacer(rate)))
    early = [i for i, t in enumerate(starts) if t < (i - conc) * part / rate - 0.05]
    assert not early, f"parts {early} went out before the cap allowed"
    assert starts[-1] >= 0.9 * (n - 1) * part / rate  # the wire, not only the completion, waited


def test_the_local_first_tier_uploads_at_the_cap(tmp_path) -> None:
    """The uploads of the local-first tier used to ignore ``max_bandwidth``."""
    state = {f"w{i}": torch.randn(MiB) for i in range(24)}  # 96 MiB: one shard file
    cap = 40e6
    opts = StorageOptions(local_dir=str(tmp_path / "local"))
    with AsyncCheckpointer(
        tmp_path / "remote", state, writer=WriterOptions(max_bandwidth=cap), storage=opts
    ) as ck:
        h = ck.save_async(1)
        h.result()
        t = time.perf_counter()
        h.uploaded.result(timeout=120)
        took = time.perf_counter() - t
    floor = (96 - 64) * MiB / cap  # the first 64 MiB piece is sent at once
    assert took >= 0.8 * floor, (
        f"uploaded 96 MiB in {took:.2f} s; a {cap / 1e6:.0f} MB/s cap needs {floor:.2f} s"
    )


@linux
@pytest.mark.s3
def test_a_writer_process_lowers_the_threads_that_upload(s3, tmp_path) -> None:
    """Every thread of a writer process is lowered.  It lowered its main thread only after
    the storage had started fsspec's event loop thread, so the threads that send an S3
    upload kept the trainer's level."""
    root, opts, _ = s3
    state = {f"w{i}": torch.randn(MiB) for i in range(16)}  # 64 MiB: a multipart upload
    base = _nice(os.getpid(), threading.get_native_id())
    writer = WriterOptions(executor="process", nice=5, max_bandwidth=20e6)
    with AsyncCheckpointer(root, state, writer=writer, storage=StorageOptions(fsspec=opts)) as ck:
        h = ck.save_async(1)
        time.sleep(1.5)  # the upload is under way (64 MiB at 20 MB/s)
        pid = ck._pipeline.executor.pid  # type: ignore[union-attr]
        levels = sorted(_nice(pid, int(t)) for t in os.listdir(f"/proc/{pid}/task"))
        h.result()
    lowered = min(19, base + 5)
    assert len(levels) >= 3 and set(levels) == {lowered}, levels
