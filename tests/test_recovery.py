"""Crashes, corruption and hostile files: the previous checkpoint always survives."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from asyncckpt import AsyncCheckpointer, CorruptCheckpointError, list_checkpoints, resume
from asyncckpt.catalog import list_leftovers

from .helpers import assert_same, rewrite_manifest, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": {f"t{i}": torch.randn(1000, generator=g) for i in range(3)}, "extra": {"epoch": seed}}


def _two_checkpoints(root: str) -> tuple[dict, dict]:
    """Steps 1 and 2 with different values; returns their snapshots."""
    state = _state(1)
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
        first = snapshot(state)
        for t in state["w"].values():
            t.add_(5)
        ck.save_async(2).result()
    return first, snapshot(state)


def _run_child(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


_CHILD_KILLED_BEFORE_COMMIT = """
    import sys, torch
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.storage import LocalStorage

    class PausingStorage(LocalStorage):
        def rename_dir(self, src, dst):
            if dst.endswith("step_000000002"):
                print("ABOUT_TO_COMMIT", flush=True)
                import time; time.sleep(600)
            super().rename_dir(src, dst)

    g = torch.Generator().manual_seed(1)
    state = {"w": {f"t{i}": torch.randn(1000, generator=g) for i in range(3)}, "extra": {"epoch": 1}}
    ck = AsyncCheckpointer(sys.argv[1], state, storage=PausingStorage())
    ck.save_async(1).result()
    for t in state["w"].values():
        t.add_(5)
    ck.save_async(2)
    import time; time.sleep(600)
"""


def test_sigkill_before_commit_resumes_previous_step(root: str) -> None:
    child = _run_child(_CHILD_KILLED_BEFORE_COMMIT, root)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ABOUT_TO_COMMIT", child.stderr.read()  # type: ignore[union-attr]
        # shards and manifest of step 2 are on disk in the temp dir, not yet renamed
        [tmp] = os.listdir(os.path.join(root, ".tmp"))  # the owner record lives in .owners/, not here
        assert os.path.exists(os.path.join(root, ".tmp", tmp, "manifest.json"))
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert [c.step for c in list_checkpoints(root)] == [1]
    assert list_leftovers(root) == [os.path.join(root, ".tmp", tmp)]
    fresh = _state(7)
    assert resume(root, fresh) == 1
    assert_same(snapshot(fresh), snapshot(_state(1)))
    assert fresh["extra"]["epoch"] == 1
    AsyncCheckpointer(root, fresh).close()  # a new checkpointer sweeps the leftover
    assert list_leftovers(root) == []


def _corrupt_truncate(step_dir: str) -> str:
    path = os.path.join(step_dir, "__0_0.distcp")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _corrupt_flip(step_dir: str) -> str:
    path = os.path.join(step_dir, "__0_0.distcp")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    return path


def _corrupt_remove_manifest(step_dir: str) -> str:
    path = os.path.join(step_dir, "manifest.json")
    os.remove(path)
    return path


def _corrupt_manifest_json(step_dir: str) -> str:
    path = os.path.join(step_dir, "manifest.json")
    with open(path, "r+b") as f:
        f.truncate(100)
    return path


@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_remove_manifest, _corrupt_manifest_json]
)
def test_corrupt_newest_falls_back_with_a_warning(root: str, corrupt) -> None:
    first, _ = _two_checkpoints(root)
    bad = corrupt(os.path.join(root, "step_000000002"))
    fresh = _state(9)
    with pytest.warns(RuntimeWarning, match="skipping step 2") as rec:
        assert resume(root, fresh) == 1
    assert any(os.path.basename(bad) in str(w.message) for w in rec)
    assert_same(snapshot(fresh), first)


def test_all_corrupt_raises_instead_of_silently_starting_over(root: str) -> None:
    _two_checkpoints(root)
    for step in (1, 2):
        _corrupt_flip(os.path.join(root, f"step_{step:09d}"))
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="no loadable checkpoint"):
        resume(root, _state(3))


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_metadata_is_never_unpickled(root: str, tmp_path) -> None:
    _, second = _two_checkpoints(root)
    canary = str(tmp_path / "canary")
    payload = pickle.dumps(_Canary(canary))
    # the payload is live: unpickling it creates the canary (so this test can fail)
    pickle.loads(payload)
    assert os.path.exists(canary)
    os.remove(canary)
    for name in (".metadata",):
        with open(os.path.join(root, "step_000000002", name), "wb") as f:
            f.write(payload)
    fresh = _state(4)
    assert resume(root, fresh) == 2
    assert_same(snapshot(fresh), second)
    assert list_checkpoints(root)[-1].step == 2
    assert not os.path.exists(canary)
    # a full verification does notice the tampered (unused) file
    from asyncckpt.catalog import read_manifest
    from asyncckpt.step_files import verify_files
    from asyncckpt.storage import LocalStorage

    step_dir = os.path.join(root, "step_000000002")
    problems = verify_files(LocalStorage(), step_dir, read_manifest(LocalStorage(), step_dir))
    assert any(".metadata" in p for p in problems)
    assert not os.path.exists(canary)


def test_verify_passes_clean_and_catches_a_flipped_byte(root: str) -> None:
    from asyncckpt.catalog import read_manifest
    from asyncckpt.step_files import verify_files
    from asyncckpt.storage import LocalStorage

    _two_checkpoints(root)
    step_dir = os.path.join(root, "step_000000002")
    m = read_manifest(LocalStorage(), step_dir)
    assert verify_files(LocalStorage(), step_dir, m) == []
    size = os.path.getsize(os.path.join(step_dir, "__0_0.distcp"))
    for pos in (0, 40, size // 3, size - 1):  # zip headers, pickle, raw data, directory
        path = os.path.join(step_dir, "__0_0.distcp")
        with open(path, "r+b") as f:
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 1]))
        assert verify_files(LocalStorage(), step_dir, m), f"flip at {pos} not caught"
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(b)
    assert verify_files(LocalStorage(), step_dir, m) == []


def test_hostile_manifest_file_names_are_rejected(root: str, tmp_path) -> None:
    import json

    first, _ = _two_checkpoints(root)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 100)
    mpath = os.path.join(root, "step_000000002", "manifest.json")
    doc = json.loads(open(mpath).read())
    name = next(iter(doc["tensors"]))
    doc["tensors"][name]["chunks"][0]["file"] = "../../outside.bin"
    rewrite_manifest(mpath, doc)  # a consistent edit: the name check itself must reject it
    fresh = _state(5)
    with pytest.warns(RuntimeWarning, match="unsafe file name"):
        assert resume(root, fresh) == 1
    assert_same(snapshot(fresh), first)


def test_symlinked_shard_is_not_followed(root: str, tmp_path) -> None:
    first, _ = _two_checkpoints(root)
    shard = os.path.join(root, "step_000000002", "__0_0.distcp")
    target = tmp_path / "elsewhere.distcp"
    os.rename(shard, target)
    os.symlink(target, shard)
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert resume(root, _state(6)) == 1


_CHILD_EXITS_WITHOUT_CLOSE = """
    import sys, torch
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.storage import LocalStorage

    class SlowStorage(LocalStorage):
        def rename_dir(self, src, dst):
            import time; time.sleep(0.5)
            super().rename_dir(src, dst)

    state = {"w": torch.arange(1000.0)}
    ck = AsyncCheckpointer(sys.argv[1], state, max_inflight=2, storage=SlowStorage())
    ck.save_async(1)
    ck.save_async(2)
    print("EXITING", flush=True)
"""


def test_interpreter_exit_drains_inflight_saves(root: str) -> None:
    child = _run_child(_CHILD_EXITS_WITHOUT_CLOSE, root)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "EXITING" in out
    assert [c.step for c in list_checkpoints(root)] == [1, 2]


_CHILD_FAILED_FINAL_SAVE = """
    import sys, torch
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.storage import LocalStorage

    class BrokenStorage(LocalStorage):
        def rename_dir(self, src, dst):
            raise OSError(5, "injected")

    ck = AsyncCheckpointer(sys.argv[1], {"w": torch.ones(3)}, storage=BrokenStorage())
    ck.save_async(1)
    ck.close()
"""


def test_failed_final_save_makes_close_raise_and_exit_nonzero(root: str) -> None:
    child = _run_child(_CHILD_FAILED_FINAL_SAVE, root)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0
    assert "WriteError" in err and "step 1" in err
