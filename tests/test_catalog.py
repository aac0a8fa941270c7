"""catalog.py: what exists under a root, leftovers, protected steps, one writer's view."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import pytest

from asyncckpt import layout
from asyncckpt.catalog import (
    Catalog,
    leftover_reason,
    list_checkpoints,
    list_in,
    list_leftovers,
    normalize_root,
    protect,
    read_protected,
    step_dirs,
)
from asyncckpt.handle import CheckpointInfo
from asyncckpt.layout import Kind
from asyncckpt.storage import LocalStorage

from ._steps import commit_step


@pytest.fixture
def messy_root(tmp_path):
    """A root with every kind of thing a step listing must tell apart."""
    root = str(tmp_path / "ckpt")
    p = {}
    p[1] = commit_step(root, 1, metrics={"loss": 2.0})
    p[2] = commit_step(root, 2)
    p["snap3"] = commit_step(root, 3, Kind.SNAPSHOT)
    p["snap2"] = commit_step(root, 2, Kind.SNAPSHOT)  # same step in both tiers
    # an abandoned save, in each tier's temp area
    p["tmp"] = os.path.join(root, ".tmp", "step_000000004.0123456789abcdef")
    os.makedirs(p["tmp"])
    p["snaptmp"] = os.path.join(root, "snapshots", ".tmp", "step_000000005.abcdef01")
    os.makedirs(p["snaptmp"])
    # a step directory that never got its manifest
    p["nomanifest"] = os.path.join(root, "step_000000005")
    os.makedirs(p["nomanifest"])
    open(os.path.join(p["nomanifest"], "__0_0.distcp"), "wb").close()
    # a copy of step 1 under the name of step 6: its manifest names step 1
    p["wrongstep"] = os.path.join(root, "step_000000006")
    shutil.copytree(p[1], p["wrongstep"])
    # a garbage manifest
    p["garbage"] = os.path.join(root, "step_000000008")
    os.makedirs(p["garbage"])
    with open(os.path.join(p["garbage"], layout.MANIFEST), "w") as f:
        f.write("{not json")
    # a valid step committed elsewhere, linked into the root: never listed
    elsewhere = commit_step(str(tmp_path / "other"), 7)
    p["link"] = os.path.join(root, "step_000000007")
    os.symlink(elsewhere, p["link"])
    p["snaplink"] = os.path.join(root, "snapshots", "step_000000009")
    os.symlink(elsewhere, p["snaplink"])
    # names that are no steps at all
    os.makedirs(os.path.join(root, "step_12"))
    os.makedirs(os.path.join(root, "notes"))
    open(os.path.join(root, "step_000000010.json"), "w").close()
    return root, p


def test_step_dirs_lists_step_names_never_links(messy_root):
    root, p = messy_root
    got = step_dirs(LocalStorage(), root)
    # at the same step the snapshot sorts first: the permanent copy counts as the newer one, as
    # resume prefers it (the docstring's "permanent before snapshot" reads the other way)
    assert got == [
        (1, Kind.PERMANENT, p[1]),
        (2, Kind.SNAPSHOT, p["snap2"]),
        (2, Kind.PERMANENT, p[2]),
        (3, Kind.SNAPSHOT, p["snap3"]),
        (5, Kind.PERMANENT, p["nomanifest"]),
        (6, Kind.PERMANENT, p["wrongstep"]),
        (8, Kind.PERMANENT, p["garbage"]),
    ]


def test_list_in_only_committed_steps(messy_root):
    root, p = messy_root
    got = list_in(LocalStorage(), root)
    assert [(c.step, c.tier, c.path) for c in got] == [
        (1, "permanent", p[1]),
        (2, "snapshot", p["snap2"]),
        (2, "permanent", p[2]),
        (3, "snapshot", p["snap3"]),
    ]
    one = got[0]
    assert one.metrics == {"loss": 2.0}
    assert one.world_size == 1 and one.upload is None
    assert one.bytes == sum(
        os.path.getsize(os.path.join(p[1], n)) for n in os.listdir(p[1]) if n != layout.MANIFEST
    )
    assert abs(one.time - time.time()) < 600
    # the public wrapper: a relative path, a file:// URL
    assert [c.path for c in list_checkpoints(root)] == [c.path for c in got]
    assert [c.path for c in list_checkpoints("file://" + root)] == [c.path for c in got]


def test_list_in_of_a_missing_root_is_empty(tmp_path):
    assert list_in(LocalStorage(), str(tmp_path / "nothing")) == []
    assert list_leftovers(tmp_path / "nothing") == []


def test_list_leftovers_and_their_reasons(messy_root):
    root, p = messy_root
    storage = LocalStorage()
    got = list_leftovers(root)
    assert sorted(got) == sorted([p["tmp"], p["snaptmp"], p["nomanifest"], p["wrongstep"], p["garbage"]])
    reasons = {path: leftover_reason(storage, path) for path in got}
    assert reasons == {
        p["tmp"]: "in-progress or abandoned save",
        p["snaptmp"]: "in-progress or abandoned save",
        p["nomanifest"]: "no manifest: never committed",
        p["wrongstep"]: "manifest names step 1",
        p["garbage"]: "invalid manifest",
    }
    # listing never deletes nor writes
    assert os.path.isdir(p["tmp"]) and os.path.isdir(p["nomanifest"])


def test_a_manifest_that_is_a_symlink_or_fifo_is_not_a_commit(tmp_path):
    root = str(tmp_path / "ckpt")
    real = commit_step(root, 1)
    fake = os.path.join(root, "step_000000002")
    os.makedirs(fake)
    os.symlink(os.path.join(real, layout.MANIFEST), os.path.join(fake, layout.MANIFEST))
    fifo = os.path.join(root, "step_000000003")
    os.makedirs(fifo)
    os.mkfifo(os.path.join(fifo, layout.MANIFEST))
    assert [c.step for c in list_in(LocalStorage(), root)] == [1]  # and the FIFO never blocked
    assert leftover_reason(LocalStorage(), fake) == "no manifest: never committed"


def test_normalize_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_root("ckpt") == str(tmp_path / "ckpt")
    assert normalize_root(tmp_path / "a") == str(tmp_path / "a")
    assert normalize_root(f"file://{tmp_path}/b") == str(tmp_path / "b")
    assert normalize_root("s3://bucket/run7/") == "s3://bucket/run7"


# --------------------------------------------------------------------------- protected steps


def test_protect_adds_and_rereads(tmp_path):
    root = str(tmp_path)
    storage = LocalStorage()
    assert read_protected(storage, root) == set()
    protect(storage, root, [3])
    assert read_protected(storage, root) == {3}
    # a 0.1 list file written behind our back: read together with the per-step markers
    path = os.path.join(root, layout.PROTECTED_FILE)
    with open(path, "w") as f:
        json.dump([3, 40], f)
    protect(storage, root, [5, 3])
    assert read_protected(storage, root) == {3, 5, 40}
    assert json.load(open(path)) == [3, 40]  # markers are added; the list file is left alone
    assert sorted(os.listdir(os.path.join(root, layout.PROTECTED_DIR))) == [
        layout.step_dirname(3),
        layout.step_dirname(5),
    ]
    assert [n for n in os.listdir(root) if n.endswith(".tmp")] == []


def test_protect_from_two_threads_loses_no_entry(tmp_path):
    root = str(tmp_path)
    storage = LocalStorage()
    barrier = threading.Barrier(2)

    def add(steps: range) -> None:
        barrier.wait()
        for s in steps:
            protect(storage, root, [s])

    threads = [threading.Thread(target=add, args=(range(i, 60, 2),)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_protected(storage, root) == set(range(60))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"{not json", set()),
        (b"", set()),
        (b'{"a": 1}', set()),
        (b"7", set()),
        (b'[1, "2", true, 3.5, null, 4]', {1, 4}),
        (b"\xff\xfe", set()),
    ],
)
def test_read_protected_ignores_garbage(tmp_path, content, expected):
    path = tmp_path / layout.PROTECTED_FILE
    path.write_bytes(content)
    assert read_protected(LocalStorage(), str(tmp_path)) == expected
    # protect still works beside garbage (a marker of its own)
    protect(LocalStorage(), str(tmp_path), [9])
    assert read_protected(LocalStorage(), str(tmp_path)) == expected | {9}


def test_read_protected_ignores_a_fifo_without_blocking(tmp_path, caplog):
    os.mkfifo(tmp_path / layout.PROTECTED_FILE)
    got: list = []
    t = threading.Thread(
        target=lambda: got.append(read_protected(LocalStorage(), str(tmp_path))), daemon=True
    )
    t.start()
    t.join(10)
    assert got == [set()], "read_protected blocked on a FIFO"
    assert any("not a regular file" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_read_protected_ignores_a_directory(tmp_path):
    os.makedirs(tmp_path / layout.PROTECTED_FILE)
    assert read_protected(LocalStorage(), str(tmp_path)) == set()


# --------------------------------------------------------------------------- Catalog


def _info(step: int, tier: str = "permanent", **metrics) -> CheckpointInfo:
    return CheckpointInfo(
        step=step, path=f"/x/{step}", time=1000.0 + step, bytes=10, metrics=metrics, tier=tier
    )


def test_catalog_add_has_steps_discard_history():
    cat = Catalog([_info(1, loss=1.5), _info(2), _info(2, "snapshot")])
    assert cat.has(Kind.PERMANENT, 1) and cat.has(Kind.PERMANENT, 2) and cat.has(Kind.SNAPSHOT, 2)
    assert not cat.has(Kind.SNAPSHOT, 1)
    assert cat.steps() == {1, 2} and cat.steps(Kind.PERMANENT) == {1, 2}
    assert cat.steps(Kind.SNAPSHOT) == {2}
    cat.add(_info(5))
    cat.add(_info(5))  # idempotent
    assert cat.steps() == {1, 2, 5}
    hist = sorted(cat.history(), key=lambda r: (r.step, r.tier))
    assert [(r.step, r.tier) for r in hist] == [
        (1, "permanent"),
        (2, "permanent"),
        (2, "snapshot"),
        (5, "permanent"),
    ]
    assert hist[0].metrics == {"loss": 1.5} and hist[0].time == 1001.0
    cat.discard(Kind.PERMANENT, 2)
    cat.discard(Kind.PERMANENT, 99)  # absent: fine
    assert cat.steps() == {1, 5} and cat.steps(Kind.SNAPSHOT) == {2}


def test_catalog_records_do_not_share_the_infos_metrics():
    metrics = {"loss": 1.0}
    info = CheckpointInfo(step=1, path="/x", time=0.0, bytes=0, metrics=metrics)
    cat = Catalog([info])
    metrics["loss"] = 9.0
    assert cat.history()[0].metrics == {"loss": 1.0}


def test_catalog_from_a_listing(messy_root):
    root, _ = messy_root
    cat = Catalog(list_in(LocalStorage(), root))
    assert cat.steps(Kind.PERMANENT) == {1, 2}
    assert cat.steps(Kind.SNAPSHOT) == {2, 3}


def test_catalog_rejects_an_unknown_tier():
    with pytest.raises(ValueError):
        Catalog([_info(1, "archive")])


def test_catalog_is_thread_safe():
    cat = Catalog()

    def work(base: int) -> None:
        for i in range(300):
            cat.add(_info(base + i))
            cat.history()
            if i % 3 == 0:
                cat.discard(Kind.PERMANENT, base + i)

    threads = [threading.Thread(target=work, args=(b,)) for b in (0, 1000, 2000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cat.steps()) == 3 * 200
