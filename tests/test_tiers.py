"""The local-first tier: commit locally, upload to S3 (moto) in the background."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from asyncckpt import AsyncCheckpointer, StorageError, WriteError, list_checkpoints, resume
from asyncckpt.storage import FsspecStorage

pytestmark = pytest.mark.s3


def _state() -> dict:
    return {"w": torch.zeros(4096), "extra": {"step": 0}}


def _train(ck: AsyncCheckpointer, state: dict, steps) -> list:
    handles = []
    for step in steps:
        state["w"].add_(1)
        state["extra"]["step"] = step
        h = ck.save_async(step)
        if h is not None:
            handles.append(h)
    return handles


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_local_commit_then_background_upload(s3, tmp_path, executor: str) -> None:
    root, opts, fs = s3
    local = str(tmp_path / "nvme")
    state = _state()
    with AsyncCheckpointer(root, state, local_dir=local, storage_options=opts, executor=executor) as ck:
        handles = _train(ck, state, range(1, 4))
        for h in handles:
            info = h.result()
            assert info.path.startswith(local)  # committed locally first
            remote = h.uploaded.result(timeout=60)
            assert remote.path == f"{root}/step_{h.step:09d}" and remote.upload == "uploaded"
    assert [(c.step, c.upload) for c in list_checkpoints(local)] == [
        (1, "uploaded"),
        (2, "uploaded"),
        (3, "uploaded"),
    ]
    assert [c.step for c in list_checkpoints(root, storage_options=opts)] == [1, 2, 3]
    assert fs.exists(f"{root[5:]}/step_000000003/manifest.json")


def test_resume_prefers_local_and_falls_back_to_remote_on_a_new_machine(s3, tmp_path) -> None:
    root, opts, _ = s3
    local = str(tmp_path / "nvme")
    state = _state()
    with AsyncCheckpointer(root, state, local_dir=local, storage_options=opts) as ck:
        _train(ck, state, range(1, 6))
    # the local copy wins for the same step: make it distinguishable
    fresh = _state()
    with AsyncCheckpointer(root, fresh, local_dir=local, storage_options=opts) as ck:
        assert ck.resume() == 5
    assert fresh["extra"]["step"] == 5 and torch.equal(fresh["w"], torch.full((4096,), 5.0))
    shutil.rmtree(local)  # a new machine: the local disk is empty
    fresh = _state()
    assert resume(root, fresh, local_dir=local, storage_options=opts) == 5
    assert torch.equal(fresh["w"], torch.full((4096,), 5.0))
    fresh = _state()
    with AsyncCheckpointer(root, fresh, local_dir=local, storage_options=opts) as ck:
        assert ck.resume() == 5


def test_retention_applies_to_both_tiers(s3, tmp_path) -> None:
    root, opts, _ = s3
    local = str(tmp_path / "nvme")
    state = _state()
    with AsyncCheckpointer(root, state, local_dir=local, storage_options=opts, keep=2) as ck:
        for h in _train(ck, state, range(1, 7)):
            h.result()
            h.uploaded.result(timeout=60)
    assert [c.step for c in list_checkpoints(local)] == [5, 6]
    assert [c.step for c in list_checkpoints(root, storage_options=opts)] == [5, 6]


class _DenyingS3(FsspecStorage):
    def open_write(self, path: str):
        raise self._wrap("open for writing", path, PermissionError(errno.EACCES, "Access Denied"))


def test_failed_upload_is_reported_and_retried_by_the_next_run(s3, tmp_path) -> None:
    root, opts, _ = s3
    local = str(tmp_path / "nvme")
    state = _state()
    ck = AsyncCheckpointer(root, state, local_dir=local, storage=_DenyingS3(root, opts))
    h = ck.save_async(1)
    assert h.result().step == 1  # the local commit succeeded
    with pytest.raises(StorageError) as denied:
        h.uploaded.result(timeout=60)
    assert denied.value.errno == errno.EACCES
    with pytest.raises(WriteError, match="uploading step 1"):
        ck.save_async(2)  # the error is raised instead of saving step 2
    ck.save_async(3).result()
    with pytest.raises(WriteError, match="uploading step 3"):  # a failed final upload is not silent
        ck.close()
    assert [(c.step, c.upload) for c in list_checkpoints(local)] == [(1, "pending"), (3, "pending")]
    # the next run, with working credentials, finishes the pending uploads
    with AsyncCheckpointer(root, _state(), local_dir=local, storage_options=opts) as ck2:
        ck2.wait_uploaded(timeout=60)
    assert [c.step for c in list_checkpoints(root, storage_options=opts)] == [1, 3]
    assert all(c.upload == "uploaded" for c in list_checkpoints(local))
    assert os.path.isdir(local)
