"""Injected storage faults (tests/helpers.FaultyStorage) at every stage of a save.

For each fault: the original error reaches the trainer thread as a WriteError whose cause
chain holds the injected exception object, no manifest of the failed step exists anywhere,
the previous checkpoint's files are byte-identical (tree_digest), the temp directory is
cleaned up, and the next save succeeds.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import shutil

import pytest

from asyncckpt import AsyncCheckpointer, WriteError, list_checkpoints, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.storage import LocalStorage

from ..helpers import FaultyStorage, tree_digest
from ._support import cause_chain, fill, make_state, report, seed, state_mismatch

NUMEL = 1 << 14  # four tensors, ~37 KiB per step
STEP1 = "step_000000001"


class _Counting(LocalStorage):
    """Records every write (file, size) and every storage call of one save."""

    # every byte through open_write and write, so that each call can be failed in turn
    write_file = None  # type: ignore[assignment]  # (the whole-file path: tests/helpers.FaultyStorage)

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, int]] = []
        self.calls: list[str] = []

    def open_write(self, path: str):
        self.calls.append("open_write")
        f = super().open_write(path)
        real, writes, name = f.write, self.writes, os.path.basename(path)

        def write(b, _real=real, _name=name):
            writes.append((_name, memoryview(b).nbytes))
            return _real(b)

        f.write = write  # type: ignore[method-assign]
        return f

    def finish_write(self, f, path: str = "", size: int | None = None) -> None:
        self.calls.append("finish_write")
        super().finish_write(f, path, size)

    def rename_dir(self, src: str, dst: str) -> None:
        self.calls.append("rename_dir")
        super().rename_dir(src, dst)

    def sync_dir(self, path: str) -> None:
        self.calls.append("sync_dir")
        super().sync_dir(path)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """A root holding step 1 (the checkpoint every fault must leave untouched)."""
    root = str(tmp_path_factory.mktemp("faults") / "template")
    state = make_state(NUMEL)
    fill(state, 1)
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    return root


def _fresh_root(template: str, tmp_path, name: str) -> str:
    root = str(tmp_path / name)
    shutil.copytree(template, root, symlinks=True)
    return root


def _profile(template: str, tmp_path, write_threads: int) -> _Counting:
    root = _fresh_root(template, tmp_path, f"profile{write_threads}")
    storage = _Counting()
    state = make_state(NUMEL)
    with AsyncCheckpointer(root, state, storage=storage, write_threads=write_threads) as ck:
        fill(state, 2)
        ck.save_async(2).result()
    return storage


_ERRORS = [
    lambda: OSError(errno.EIO, "injected I/O error"),
    lambda: OSError(errno.ENOSPC, "injected: no space left"),
    lambda: PermissionError(errno.EACCES, "injected: permission denied"),
    lambda: OSError(errno.EDQUOT, "injected: quota exceeded"),
]


def _run_fault(root: str, storage: FaultyStorage, route: str, write_threads: int) -> list[str]:
    """Save step 2 through ``storage``; return every broken promise (empty when all hold)."""
    problems = []
    step1 = os.path.join(root, STEP1)
    digest = tree_digest(step1)
    injected = storage.err
    state = make_state(NUMEL)
    ck = AsyncCheckpointer(root, state, storage=storage, write_threads=write_threads)
    try:
        fill(state, 2)
        h = ck.save_async(2)
        err: BaseException | None = None
        try:
            if route == "result":
                h.result(timeout=60)  # the trainer waits on the handle
            elif route == "wait":
                ck.wait(timeout=60)  # ...or drains
            else:
                concurrent.futures.wait([h.committed], timeout=60)  # (without looking at it)
                fill(state, 3)
                ck.save_async(3)  # ...or learns at its next save, which is then not taken
        except WriteError as e:
            err = e
        if err is None:
            return [f"{route}: no WriteError reached the trainer"]
        if not any(e is injected for e in cause_chain(err)):
            problems.append(f"the injected error is not in the cause chain of {err!r}")
        if "step 2" not in str(err):
            problems.append(f"the error does not name step 2: {err}")
        # nothing of step 2 is committed or half-committed
        if os.path.exists(os.path.join(root, "step_000000002")):
            problems.append("step_000000002 exists")
        for dirpath, _, files in os.walk(root):
            if "manifest.json" in files and os.path.basename(dirpath) != STEP1:
                problems.append(f"a manifest exists in {dirpath}")
        if tree_digest(step1) != digest:
            problems.append("the previous checkpoint changed")
        tmp = os.path.join(root, ".tmp")
        if os.path.isdir(tmp) and os.listdir(tmp):
            problems.append(f"temp files left behind: {os.listdir(tmp)}")
        if [c.step for c in list_checkpoints(root)] != [1]:
            problems.append(f"listed: {[c.step for c in list_checkpoints(root)]}")
        # the error was raised once; training goes on and the next save commits
        storage.budget[0] = None
        storage.fail_op = None
        fill(state, 4)
        ck.save_async(4).result(timeout=60)
        ck.close()
    finally:
        try:
            ck.close()
        except WriteError as e:
            problems.append(f"close() raised a second time: {e}")
    fresh = make_state(NUMEL)
    if resume(root, fresh) != 4 or state_mismatch(fresh, 4) is not None:
        problems.append("step 4 does not load back")
    return problems


def test_write_fails_at_every_offset_of_a_save(template: str, tmp_path) -> None:
    """``fail_after_bytes`` at ~60 offsets covering every blob of the shard, .metadata and
    the manifest: each write of the save fails once."""
    prof = _profile(template, tmp_path, write_threads=1)
    total = sum(n for _, n in prof.writes)
    starts, pos = [], 0
    for name, n in prof.writes:
        starts.append((pos, name))
        pos += n
    # the manifest is one write whose length varies by a few bytes (created_at): aim inside
    # its first half, everything before it has a fixed layout
    m_start, m_len = starts[-1][0], prof.writes[-1][1]
    assert prof.writes[-1][0] == "manifest.json"
    end = m_start + m_len // 2
    rng = random.Random(seed() + 4)
    offsets = {0, 1, end}
    for start, _ in starts:  # the first byte of every write call, and the byte before it
        offsets.update({start, max(0, start - 1)})
    offsets.update(rng.randrange(end) for _ in range(20))
    by_file: dict[str, int] = {}
    failures = []
    for i, off in enumerate(sorted(offsets)):
        target = next(name for start, name in reversed(starts) if start <= off)
        by_file[target] = by_file.get(target, 0) + 1
        root = _fresh_root(template, tmp_path, f"bytes{i}")
        storage = FaultyStorage(fail_after_bytes=off, err=_ERRORS[i % len(_ERRORS)]())
        route = ("result", "next_call", "wait")[i % 3]
        failures += [f"offset {off} ({target}, {route}): {p}" for p in _run_fault(root, storage, route, 1)]
    report("fault_bytes", {"cases": len(offsets), "save_bytes": total, "writes_per_save": len(prof.writes),
                           "cases_by_file": by_file, "failures": len(failures)})  # fmt: skip
    assert failures == [], "\n".join(failures[:20])


def _op_cases(prof: _Counting) -> list[tuple[str, int, str]]:
    """(op, n-th call, what that call is) for every storage call of one save before the rename."""
    opens = prof.calls.count("open_write")
    cases = []
    for op in ("open_write", "finish_write"):
        for n in range(1, opens + 1):
            what = "manifest.json" if n == opens else (".metadata" if n == opens - 1 else f"shard {n}")
            cases.append((op, n, what))
    cases.append(("sync_dir", 1, "fsync of the temp dir"))
    cases.append(("rename_dir", 1, "the commit rename"))
    return cases


def test_each_storage_operation_fails(template: str, tmp_path) -> None:
    """Each open, fsync (finish_write), the directory fsync and the rename fail in turn, with
    two shard files written in parallel; the manifest is the last open_write of a save."""
    prof = _profile(template, tmp_path, write_threads=2)
    assert prof.calls.count("open_write") == 4, prof.calls  # 2 shards, .metadata, manifest
    cases = _op_cases(prof)
    failures = []
    for i, (op, n, what) in enumerate(cases):
        root = _fresh_root(template, tmp_path, f"op{i}")
        storage = FaultyStorage(fail_op=op, fail_on_call=n, err=_ERRORS[i % len(_ERRORS)]())
        route = ("result", "next_call", "wait")[i % 3]
        failures += [f"{op} #{n} ({what}, {route}): {p}" for p in _run_fault(root, storage, route, 2)]
    report(
        "fault_ops",
        {"cases": len(cases), "ops": [f"{op}#{n}" for op, n, _ in cases], "failures": len(failures)},
    )
    assert failures == [], "\n".join(failures[:20])


def test_failed_root_fsync_after_the_rename_is_a_committed_step_with_a_warning(
    template: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """After the rename the step is visible and its files are durable: report it committed
    (with a warning), never "failed" while it stays listed and loadable."""
    root = _fresh_root(template, tmp_path, "rootsync")
    storage = FaultyStorage(fail_op="sync_dir", fail_on_call=2)  # 1: temp dir, 2: root after rename
    steps_before = [c.step for c in list_checkpoints(root)]
    state = make_state(NUMEL)
    with AsyncCheckpointer(root, state, storage=storage) as ck:
        info = ck.save_async(max(steps_before) + 1).result()
    assert info.step in [c.step for c in list_checkpoints(root)]
    assert any("committed, but fsync" in r.getMessage() for r in caplog.records)


def test_manifest_write_failure_keeps_the_previous_manifest_readable(template: str, tmp_path) -> None:
    """The manifest write fails: no partial manifest.json is ever visible to readers."""
    prof = _profile(template, tmp_path, write_threads=1)
    manifest_bytes = sum(n for name, n in prof.writes if name == "manifest.json")
    before = sum(n for name, n in prof.writes if name != "manifest.json")
    root = _fresh_root(template, tmp_path, "torn")
    storage = FaultyStorage(fail_after_bytes=before + manifest_bytes // 2)
    assert _run_fault(root, storage, "result", 1) == []
    assert read_manifest(LocalStorage(), os.path.join(root, STEP1)).step == 1
