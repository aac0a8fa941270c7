"""A real full disk: an 8 MiB tmpfs, ENOSPC from the kernel (needs root / CAP_SYS_ADMIN).

The error reaches the trainer as a WriteError whose cause chain holds a StorageError with
errno ENOSPC that names the file and says the disk is full; the previous checkpoint still
loads; nothing is left under .tmp; training goes on with the save skipped, and a save after
space is freed commits.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from asyncckpt import AsyncCheckpointer, StorageError, WriteError, list_checkpoints, resume

from ..helpers import tree_digest
from ._support import cause_chain, fill, make_state, report, state_mismatch

NUMEL = 1 << 18  # ~2.2 MiB per step: three fit in 8 MiB, the fourth does not
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount an 8 MiB tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _enospc(err: BaseException) -> StorageError | None:
    for e in cause_chain(err):
        if isinstance(e, StorageError) and e.errno == errno.ENOSPC:
            return e
    return None


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _tmp_entries(root: str) -> list[str]:
    tmp = os.path.join(root, ".tmp")
    return os.listdir(tmp) if os.path.isdir(tmp) else []


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_fill_the_disk_with_saves_then_recover(tmpfs: str, executor: str) -> None:
    root = os.path.join(tmpfs, "ckpt")
    state = make_state(NUMEL)
    committed, failed = [], []
    ck = AsyncCheckpointer(root, state, executor=executor)
    try:
        step = 0
        while len(failed) < 3 and step < 20:
            fill(state, step)
            try:
                ck.save_async(step).result(timeout=60)
                committed.append(step)
            except WriteError as e:  # training goes on: this save is skipped
                failed.append((step, e))
                assert _tmp_entries(root) == [], "a failed save left temp files"
            step += 1
        assert len(committed) >= 2 and failed, (committed, failed)
        first_step, err = failed[0]
        cause = _enospc(err)
        assert cause is not None, f"no ENOSPC StorageError in the cause chain of {err!r}"
        assert cause.filename and cause.filename.startswith(
            os.path.join(root, ".tmp", f"step_{first_step:09d}.")
        )
        assert "disk is full" in str(cause) and f"step {first_step}" in str(err)
        # the previous checkpoint loads, bit-exact
        fresh = make_state(NUMEL)
        assert resume(root, fresh) == committed[-1]
        assert state_mismatch(fresh, committed[-1]) is None
        # free space (drop the two oldest), and the next save commits
        for s in committed[:2]:
            shutil.rmtree(os.path.join(root, f"step_{s:09d}"))
        fill(state, step)
        ck.save_async(step).result(timeout=60)
        ck.close()
    finally:
        ck.close()
    assert [c.step for c in list_checkpoints(root)] == committed[2:] + [step]
    report(f"disk_full_fill_{executor}", {"committed_before_full": len(committed), "failed_while_full": len(failed),
                              "recovered_step": step})  # fmt: skip


def test_enospc_at_each_file_of_a_save(tmpfs: str) -> None:
    """Leave exactly enough space for the save to fail inside the shard, at the .metadata,
    or at the manifest (tmpfs allocates whole pages)."""
    root = os.path.join(tmpfs, "ckpt")
    state = make_state(NUMEL)
    fill(state, 1)
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    step1 = os.path.join(root, "step_000000001")
    sizes = {n: os.path.getsize(os.path.join(step1, n)) for n in os.listdir(step1)}
    pages = {n: -(-s // PAGE) for n, s in sizes.items()}
    shard = pages["__0_0.distcp"]
    cases = {
        "__0_0.distcp (first byte)": 0,
        "__0_0.distcp (middle)": shard // 2,
        "__0_0.distcp (last page)": shard - 1,
        ".metadata": shard,
        "manifest.json": shard + pages[".metadata"],
    }
    digest = tree_digest(step1)
    filler = os.path.join(tmpfs, "filler")
    hit = {}
    for i, (where, free_pages) in enumerate(cases.items(), start=2):
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            # one more page for the checkpointer's owner record (ROOT/.owners/), written at
            # construction, before anything of the save
            os.posix_fallocate(fd, 0, _free(tmpfs) - (free_pages + 1) * PAGE)
        finally:
            os.close(fd)
        assert _free(tmpfs) == (free_pages + 1) * PAGE
        ck = AsyncCheckpointer(root, state)
        fill(state, 100 + i)
        with pytest.raises(WriteError) as ei:
            ck.save_async(100 + i).result(timeout=60)
        cause = _enospc(ei.value)
        assert cause is not None, f"{where}: no ENOSPC in {ei.value!r}"
        hit[where] = os.path.basename(cause.filename or "")
        assert hit[where] == where.split(" ")[0], f"expected ENOSPC at {where}, got {cause}"
        assert _tmp_entries(root) == [], where
        assert tree_digest(step1) == digest
        fresh = make_state(NUMEL)
        assert resume(root, fresh) == 1 and state_mismatch(fresh, 1) is None
        os.remove(filler)  # space is back: training goes on
        ck.save_async(200 + i).result(timeout=60)
        ck.close()
        shutil.rmtree(os.path.join(root, f"step_{200 + i:09d}"))
    report("disk_full_positions", {"cases": len(cases), "enospc_at": hit})
