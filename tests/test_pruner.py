"""pruner.py: retention, snapshot rotation, temp sweeps; decommit before delete."""

from __future__ import annotations

import errno
import os
import uuid

import pytest

from asyncckpt import layout
from asyncckpt.catalog import Catalog, list_in, protect
from asyncckpt.layout import Kind
from asyncckpt.policy import KeepLast
from asyncckpt.pruner import Pruner, decommit_and_remove, sweep_tmp
from asyncckpt.storage import FsspecStorage, LocalStorage

from ._steps import commit_info, commit_step


def _committed(storage, root: str, kind: Kind = Kind.PERMANENT) -> list[int]:
    return [c.step for c in list_in(storage, root) if c.tier == kind.value]


def _tmp_names(root: str, kind: Kind = Kind.PERMANENT) -> list[str]:
    tmp = layout.tmp_dir(layout.kind_root(root, kind))
    return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


@pytest.fixture
def five(tmp_path):
    """A root with permanent steps 10..50 and its catalog."""
    root = str(tmp_path / "ckpt")
    for s in (10, 20, 30, 40, 50):
        commit_step(root, s)
    return root, Catalog(list_in(LocalStorage(), root))


def test_keep_last_two_deletes_the_three_oldest(five):
    root, cat = five
    storage = LocalStorage()
    pruner = Pruner(storage, root, cat, [KeepLast(2)], snapshot_slots=None)
    assert pruner.plan() == [(Kind.PERMANENT, 10), (Kind.PERMANENT, 20), (Kind.PERMANENT, 30)]
    assert pruner.apply() == [(Kind.PERMANENT, 10), (Kind.PERMANENT, 20), (Kind.PERMANENT, 30)]
    assert _committed(storage, root) == [40, 50]
    assert cat.steps() == {40, 50}
    for s in (10, 20, 30):
        assert not os.path.exists(layout.step_dir(root, Kind.PERMANENT, s))
    assert _tmp_names(root) == []  # the decommitted copies are gone too
    assert pruner.apply() == []  # nothing more to do


def test_no_policies_keeps_everything(five):
    root, cat = five
    pruner = Pruner(LocalStorage(), root, cat, [], snapshot_slots=None)
    assert pruner.apply() == []
    assert _committed(LocalStorage(), root) == [10, 20, 30, 40, 50]


def test_never_deletes_newest_in_flight_or_protected(five):
    root, cat = five
    storage = LocalStorage()
    protect(storage, root, [30])
    pruner = Pruner(storage, root, cat, [KeepLast(1)], snapshot_slots=None)
    deleted = pruner.apply(in_flight={20})
    assert deleted == [(Kind.PERMANENT, 10), (Kind.PERMANENT, 40)]
    assert _committed(storage, root) == [20, 30, 50]
    # once no longer in flight, 20 goes; protected 30 and newest 50 stay
    assert pruner.apply() == [(Kind.PERMANENT, 20)]
    assert _committed(storage, root) == [30, 50]


def test_protect_is_reread_at_each_prune(five):
    root, cat = five
    storage = LocalStorage()
    pruner = Pruner(storage, root, cat, [KeepLast(1)], snapshot_slots=None)
    protect(storage, root, [10])  # after the pruner was built
    pruner.apply()
    assert _committed(storage, root) == [10, 50]


def test_an_unreadable_protected_set_deletes_nothing(five, tmp_path):
    root, cat = five

    class StatFails(LocalStorage):
        def stat(self, path):
            if path.endswith(layout.PROTECTED_FILE):
                raise OSError(errno.EIO, "injected stat failure")
            return super().stat(path)

    pruner = Pruner(StatFails(), root, cat, [KeepLast(1)], snapshot_slots=None)
    assert pruner.apply() == []
    assert _committed(LocalStorage(), root) == [10, 20, 30, 40, 50]


class TrashRemoveFails(LocalStorage):
    """Local storage whose ``remove`` fails while ``broken`` is set."""

    broken = True

    def remove(self, path: str) -> None:
        if self.broken:
            raise OSError(errno.EIO, "injected remove failure")
        super().remove(path)


def test_a_failed_remove_leaves_no_half_deleted_committed_step(five):
    root, cat = five
    storage = TrashRemoveFails()
    pruner = Pruner(storage, root, cat, [KeepLast(4)], snapshot_slots=None)
    # removing the files failed, and apply did not raise; the step was decommitted first, so
    # it is deleted as a checkpoint: not listed as committed, not under its name
    assert pruner.apply() == [(Kind.PERMANENT, 10)]
    assert cat.steps() == {20, 30, 40, 50}
    assert _committed(LocalStorage(), root) == [20, 30, 40, 50]
    assert not os.path.exists(layout.step_dir(root, Kind.PERMANENT, 10))
    (trash,) = _tmp_names(root)
    assert layout.is_tmp_name(trash)  # where a later prune (or the next start's sweep) finds it
    # a later prune retries the removal of the files
    storage.broken = False
    assert pruner.apply() == []
    assert _tmp_names(root) == []


def test_the_retry_of_a_failed_delete_frees_the_space(five):
    root, cat = five
    storage = TrashRemoveFails()
    pruner = Pruner(storage, root, cat, [KeepLast(4)], snapshot_slots=None)
    pruner.apply()
    storage.broken = False
    pruner.apply()
    assert _tmp_names(root) == []


def test_a_failed_rename_keeps_the_step_committed_and_retries(five):
    root, cat = five

    class RenameFails(LocalStorage):
        broken = True

        def rename_dir(self, src, dst):
            if self.broken:
                raise OSError(errno.EIO, "injected rename failure")
            super().rename_dir(src, dst)

    storage = RenameFails()
    pruner = Pruner(storage, root, cat, [KeepLast(4)], snapshot_slots=None)
    assert pruner.apply() == []
    assert _committed(LocalStorage(), root) == [10, 20, 30, 40, 50]  # intact, still loadable
    storage.broken = False
    assert pruner.apply() == [(Kind.PERMANENT, 10)]
    assert _committed(LocalStorage(), root) == [20, 30, 40, 50]
    assert _tmp_names(root) == []


def test_a_step_already_gone_is_forgotten(five):
    root, cat = five
    import shutil

    shutil.rmtree(layout.step_dir(root, Kind.PERMANENT, 10))  # e.g. `asyncckpt gc`
    pruner = Pruner(LocalStorage(), root, cat, [KeepLast(4)], snapshot_slots=None)
    assert pruner.apply() == [(Kind.PERMANENT, 10)]
    assert cat.steps() == {20, 30, 40, 50}


def test_snapshot_slots_rotate(tmp_path):
    root = str(tmp_path / "ckpt")
    storage = LocalStorage()
    cat = Catalog()
    pruner = Pruner(storage, root, cat, [KeepLast(1)], snapshot_slots=2)
    cat.add(commit_info(root, 5))  # a permanent step at a snapshot's number is never touched
    for s in (5, 10, 15, 20):
        cat.add(commit_info(root, s, Kind.SNAPSHOT))
        pruner.apply()
    assert _committed(storage, root, Kind.SNAPSHOT) == [15, 20]
    assert cat.steps(Kind.SNAPSHOT) == {15, 20}
    assert _committed(storage, root) == [5]
    assert _tmp_names(root, Kind.SNAPSHOT) == []
    # None keeps every snapshot
    keep_all = Pruner(storage, root, cat, [], snapshot_slots=None)
    cat.add(commit_info(root, 25, Kind.SNAPSHOT))
    assert keep_all.apply() == []
    assert _committed(storage, root, Kind.SNAPSHOT) == [15, 20, 25]


def test_sweep_tmp_removes_only_our_temp_names(tmp_path):
    root = str(tmp_path / "ckpt")
    ours = [
        os.path.join(root, ".tmp", "step_000000001.0123456789abcdef"),
        os.path.join(root, ".tmp", "step_000000002.abcdef01"),
        os.path.join(root, "snapshots", ".tmp", "step_000000003.ffffffffffffffffffffffffffffffff"),
    ]
    theirs = [
        os.path.join(root, ".tmp", "notes"),
        os.path.join(root, ".tmp", "step_000000001.ABCDEF01"),  # not lowercase hex
        os.path.join(root, ".tmp", "step_000000001.abc"),  # too short a token
        os.path.join(root, ".tmp", "step_1.abcdef01"),  # not a padded step
        os.path.join(root, "step_000000004.abcdef01"),  # not in a temp area
    ]
    for p in ours + theirs:
        os.makedirs(p)
        open(os.path.join(p, "f"), "w").close()
    committed = commit_step(root, 9)
    assert sorted(sweep_tmp(LocalStorage(), root)) == sorted(ours)
    for p in ours:
        assert not os.path.exists(p)
    for p in [*theirs, committed]:
        assert os.path.isdir(p), p
    assert sweep_tmp(LocalStorage(), root) == []


@pytest.fixture
def memroot():
    storage = FsspecStorage("memory://")
    root = f"memory://asyncckpt-pruner-{uuid.uuid4().hex[:8]}/run"
    yield storage, root
    storage.fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_sweep_tmp_leaves_object_stores_alone(memroot):
    storage, root = memroot
    storage.fs.pipe(layout.join(root, ".tmp", "step_000000001.abcdef01", "f"), b"x")
    assert sweep_tmp(storage, root) == []
    assert storage.listdir(layout.join(root, ".tmp")) == ["step_000000001.abcdef01"]


class PrefixRemoveFails(FsspecStorage):
    """An object store that records removes, and fails to remove a whole step prefix."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.removed: list[str] = []

    def remove(self, path: str) -> None:
        self.removed.append(path)
        if layout.parse_step(layout.parent(path)[1]) is not None:
            raise OSError(errno.EIO, "injected remove failure")
        super().remove(path)


def test_decommit_on_an_object_store_removes_the_manifest_first(memroot):
    _, root = memroot
    storage = PrefixRemoveFails("memory://")
    path = commit_info(root, 3, storage=storage).path
    commit_info(root, 4, storage=storage)
    storage.removed.clear()  # the commits removed their .writer markers
    with pytest.raises(OSError, match="injected"):
        decommit_and_remove(storage, path, 3)
    assert storage.removed == [layout.join(path, layout.MANIFEST), path]
    # the shards are still there, but the step is no longer committed
    names = storage.listdir(path)
    assert layout.MANIFEST not in names and any(n.endswith(".distcp") for n in names)
    assert [c.step for c in list_in(storage, root)] == [4]


def test_decommit_and_remove_on_an_object_store(memroot):
    storage, root = memroot
    path = commit_info(root, 3, storage=storage).path
    decommit_and_remove(storage, path, 3)
    assert storage.listdir(path) == []
    assert list_in(storage, root) == []


def test_pruner_on_an_object_store(memroot):
    storage, root = memroot
    cat = Catalog()
    for s in (1, 2, 3):
        cat.add(commit_info(root, s, storage=storage))
    Pruner(storage, root, cat, [KeepLast(1)], snapshot_slots=None).apply()
    assert [c.step for c in list_in(storage, root)] == [3]
    assert storage.listdir(layout.step_dir(root, Kind.PERMANENT, 1)) == []


def test_a_root_without_parts_is_pruned_without_reading_a_manifest(five):
    """Retention on a plain root lists no part references: reading (and checking) every new
    step's manifest after each commit cost the trainer's GIL ~13 ms for 64 tensors."""
    root, cat = five
    storage = LocalStorage()
    read: list[str] = []
    real = storage.read_bytes
    storage.read_bytes = lambda path, *a, **k: (read.append(path), real(path, *a, **k))[1]  # type: ignore[method-assign]
    pruner = Pruner(storage, root, cat, [KeepLast(2)], snapshot_slots=None)
    assert pruner.apply() == [(Kind.PERMANENT, 10), (Kind.PERMANENT, 20), (Kind.PERMANENT, 30)]
    assert [p for p in read if p.endswith(layout.MANIFEST)] == []


def test_a_plain_writer_still_sweeps_the_parts_of_differential_steps_it_deletes(tmp_path):
    import torch

    from asyncckpt import AsyncCheckpointer, WriterOptions

    root = str(tmp_path / "ckpt")
    state = {"w": torch.zeros(3 << 20)}  # 12 MiB: 3 parts
    store = layout.chunk_store(root)
    with AsyncCheckpointer(root, state={"m": state}, writer=WriterOptions(incremental=True)) as ck:
        for s in (1, 2):
            state["w"].normal_()  # parts differ within and across steps
            ck.save_async(s).result()
    assert len(os.listdir(store)) == 6
    with AsyncCheckpointer(root, state={"m": state}, keep=1) as ck:
        ck.save_async(3).result()
    assert _committed(LocalStorage(), root) == [3]
    assert os.listdir(store) == []
