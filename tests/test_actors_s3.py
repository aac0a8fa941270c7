"""Several actors on one S3 root, and a store that throttles, drops connections or goes away.

The faults come from ``tests/faultproxy.py``, a reverse proxy on 127.0.0.1 in front of the
moto server: a test switches it between passing, ``503 SlowDown``, dropped connections and an
outage while the library works.  What must hold: a transient failure never looks like
"missing" (nothing is deleted, skipped or loaded from an older step because of it), a failed
upload leaves no open multipart upload, and ``gc`` run next to a live trainer never removes
the trainer's work.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from asyncckpt import (
    AsyncCheckpointer,
    CorruptCheckpointError,
    StorageError,
    StorageOptions,
    WriteError,
    list_checkpoints,
    maintenance,
    resume,
)
from asyncckpt.catalog import read_manifest
from asyncckpt.policy import KeepLast
from asyncckpt.storage import FsspecStorage, exists

from .faultproxy import matching
from .helpers import assert_same

pytestmark = pytest.mark.s3

PART = 5 * 2**20  # the smallest S3 part size
BIG = (13 << 20) // 4  # float32 elements: a 13 MiB shard, three parts of at most 5 MiB
SMALL = 2000


def _values(step: int, n: int = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, generator=g)


def _save_steps(root: str, opts: dict, steps: list[int], n: int = SMALL) -> dict[int, torch.Tensor]:
    state = {"w": torch.zeros(n)}
    saved = {}
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        for s in steps:
            state["w"].copy_(_values(s, n))
            saved[s] = state["w"].clone()
            ck.save_async(s).result()
    return saved


def _assert_loads(root: str, opts: dict, saved: dict[int, torch.Tensor]) -> None:
    for s, want in saved.items():
        fresh = {"w": torch.zeros_like(want)}
        assert resume(root, fresh, step=s, storage_options=opts) == s
        assert_same({"w": fresh["w"]}, {"w": want})


def _steps(root: str, opts: dict) -> list[int]:
    return [c.step for c in list_checkpoints(root, storage_options=opts)]


def _no_fallback_warnings(caught: list[warnings.WarningMessage]) -> None:
    skipped = [str(w.message) for w in caught if "skipping step" in str(w.message)]
    assert not skipped, skipped


# --------------------------------------------------------------------------- the proxy itself


def test_fault_proxy_modes(proxied) -> None:
    root, opts, _, px = proxied
    storage = FsspecStorage(root, opts)
    storage.retries = 1
    assert storage.stat(f"{root}/nothing-here") is None  # passes: a definite "not found"
    px.set("throttle", matching("HEAD"), count=1)  # only the next HEAD: the library's retry passes
    assert storage.stat(f"{root}/nothing-here") is None
    assert px.faulted["HEAD"] == 1
    assert [a for m, _, a in px.requests("HEAD")][-2:] == ["throttle", "pass"]
    px.set("throttle", matching("HEAD"))
    with pytest.raises(StorageError):
        storage.stat(f"{root}/nothing-here")
    assert px.faulted["HEAD"] >= 2
    for mode in ("drop", "outage"):
        px.set(mode)
        with pytest.raises(StorageError):
            storage.listdir(root)
    px.set("pass")
    assert storage.listdir(root) == []
    assert px.counts["HEAD"] >= 3 and px.counts["GET"] >= 3


# --------------------------------------------------------------------------- #2 throttling


_PREDICATES = {
    "all": None,
    "manifests": matching(path=r"manifest\.json"),
    "newest-step": matching(path=r"step_000000003"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "mode,which",
    [
        ("throttle", "all"),
        ("throttle", "manifests"),
        ("throttle", "newest-step"),
        ("outage", "all"),
        ("drop", "all"),
    ],
)
def test_a_failing_store_makes_nothing_look_missing(proxied, mode: str, which: str) -> None:
    root, opts, fs, px = proxied
    saved = _save_steps(root, opts, [1, 2, 3])
    manifest = f"{root}/step_000000003/manifest.json"

    px.set(mode, _PREDICATES[which])
    storage = FsspecStorage(root, opts)
    with pytest.raises(StorageError) as ei:
        storage.stat(manifest)
    assert ei.value.errno != 2  # not ENOENT
    with pytest.raises(StorageError):
        exists(storage, manifest)
    assert sum(px.faulted.values()) >= storage.retries + 1  # retried before giving up

    try:
        report = maintenance.gc(root, [KeepLast(1)], min_age=0, storage_options=opts)
    except StorageError:
        pass
    else:  # finished despite the faults: then it must not have deleted anything
        assert not report.deleted and not report.removed, (report.deleted, report.removed)

    fresh = {"w": torch.zeros(SMALL)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StorageError) as ei:
            resume(root, fresh, storage_options=opts)
    assert not isinstance(ei.value, CorruptCheckpointError)
    _no_fallback_warnings(caught)
    assert torch.count_nonzero(fresh["w"]) == 0  # no older step was loaded instead

    px.set("pass")
    assert _steps(root, opts) == [1, 2, 3]
    assert all(fs.exists(f"{root[5:]}/step_00000000{s}/manifest.json") for s in (1, 2, 3))
    _assert_loads(root, opts, saved)


# --------------------------------------------------------------------------- #8 outage in resume


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "mode,method", [("outage", "GET"), ("drop", "GET"), ("throttle", "GET"), ("outage", "HEAD")]
)
def test_outage_while_resuming_is_a_storage_error_not_damage(proxied, mode: str, method: str) -> None:
    """The listing and the manifests are read; then the shard files cannot be."""
    root, opts, _, px = proxied
    saved = _save_steps(root, opts, [1, 2])
    px.set(mode, matching(method, r"\.distcp"))
    fresh = {"w": torch.zeros(SMALL)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StorageError) as ei:
            resume(root, fresh, storage_options=opts)
    assert px.faulted[method] >= 1
    assert not isinstance(ei.value, CorruptCheckpointError)
    _no_fallback_warnings(caught)
    msg = str(ei.value).lower()
    assert "move" not in msg and "damaged" not in msg and "start fresh" not in msg, msg
    assert torch.count_nonzero(fresh["w"]) == 0  # step 1 was not loaded instead

    px.set("pass")
    assert resume(root, fresh, storage_options=opts) == 2
    assert_same({"w": fresh["w"]}, {"w": saved[2]})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("reader", ["checkpointer", "standalone"])
def test_a_get_cut_midway_is_retried_and_a_lasting_fault_loads_nothing(proxied, reader: str) -> None:
    """A shard GET whose body stops halfway (connection closed before its Content-Length):
    the checkpointer's resume streams whole files into its staging buffers (``read_into``),
    a standalone resume reads ranges; both retry the GET and load bit-exactly.  When every
    GET breaks, the load fails as a storage error and the live state is untouched."""
    root, opts, _, px = proxied
    state = {"w": torch.zeros(BIG)}
    want = _values(1, BIG)
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        state["w"].copy_(want)
        ck.save_async(1).result()

        def load() -> int | None:
            state["w"].zero_()
            if reader == "checkpointer":
                return ck.resume(step=1)
            return resume(root, state, step=1, storage_options=opts)

        px.set("cut", matching("GET", r"\.distcp"), count=2)
        assert load() == 1
        assert px.faulted["GET"] == 2
        assert_same(state, {"w": want})

        px.set("cut", matching("GET", r"\.distcp"))
        with pytest.raises(StorageError) as ei:
            load()
        assert not isinstance(ei.value, CorruptCheckpointError)
        assert torch.count_nonzero(state["w"]) == 0  # zeroed before the load; nothing applied
        px.set("pass")


# --------------------------------------------------------------------------- #11 failed uploads


_UPLOAD_FAULTS = {
    "complete-throttle": ("throttle", matching("POST", r"uploadId=")),
    "complete-outage": ("outage", matching("POST", r"uploadId=")),
    "part-outage": ("outage", matching("PUT", r"partNumber=")),
    "part-drop": ("drop", matching("PUT", r"partNumber=")),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(_UPLOAD_FAULTS))
def test_failed_upload_leaves_no_open_multipart_upload(proxied, fault: str) -> None:
    root, opts, fs, px = proxied
    opts = {**opts, "default_block_size": PART}
    state = {"w": _values(1, BIG)}
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        ck.save_async(1).result()
        first = state["w"].clone()
        state["w"].add_(1)
        px.set(*_UPLOAD_FAULTS[fault])
        with pytest.raises(WriteError):
            ck.save_async(2).result()
        px.set("pass")
    assert sum(px.faulted.values()) >= 1
    assert FsspecStorage(root, opts).pending_uploads(root) == []
    assert not fs.exists(f"{root[5:]}/step_000000002/manifest.json")
    assert _steps(root, opts) == [1]
    _assert_loads(root, opts, {1: first})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["complete-throttle", "complete-outage", "part-outage"])
def test_failed_upload_of_the_local_first_tier_leaves_no_open_multipart_upload(
    proxied, tmp_path, fault: str
) -> None:
    root, opts, fs, px = proxied
    opts = {**opts, "default_block_size": PART}
    state = {"w": _values(1, BIG)}
    local = str(tmp_path / "local")
    with AsyncCheckpointer(root, state, storage=StorageOptions(fsspec=opts, local_dir=local)) as ck:
        h = ck.save_async(1)
        h.result()
        h.uploaded.result(timeout=60)
        first = state["w"].clone()
        state["w"].add_(1)
        px.set(*_UPLOAD_FAULTS[fault])
        h = ck.save_async(2)
        h.result()  # committed locally
        assert h.uploaded.exception(timeout=60) is not None  # the upload failed
        px.set("pass")
        with pytest.raises(WriteError):  # raised at the next call, as documented
            ck.wait_uploaded(timeout=30)
    assert sum(px.faulted.values()) >= 1
    assert FsspecStorage(root, opts).pending_uploads(root) == []
    assert not fs.exists(f"{root[5:]}/step_000000002/manifest.json")
    assert _steps(root, opts) == [1]
    _assert_loads(root, opts, {1: first})


# --------------------------------------------------------------------------- #1 gc next to a trainer


def _check_committed_files(root: str, opts: dict) -> None:
    """Every committed step's manifest names files that all exist with their sizes."""
    storage = FsspecStorage(root, opts)
    for info in list_checkpoints(root, storage_options=opts):
        m = read_manifest(storage, info.path)
        for name, meta in m.files.items():
            st = storage.stat(f"{info.path}/{name}")
            assert st is not None, f"step {info.step}: {name} is gone"
            assert st.size == meta["size"], f"step {info.step}: {name} has {st.size} bytes"


def _train_and_gc(root: str, opts: dict, steps: int, n: int, trainer_opts: dict) -> dict:
    saved: dict[int, torch.Tensor] = {}
    confirmed: list[int] = []
    trainer_errors: list[BaseException] = []
    started, done = threading.Event(), threading.Event()

    def trainer() -> None:
        state = {"w": torch.zeros(n)}
        try:
            with AsyncCheckpointer(root, state, storage_options=trainer_opts, keep=3) as ck:
                started.set()  # the root exists now (the trainer's owner record)
                for s in range(1, steps + 1):
                    state["w"].copy_(_values(s, n))
                    saved[s] = state["w"].clone()
                    ck.save_async(s).result()
                    confirmed.append(s)
        except BaseException as e:
            trainer_errors.append(e)
        finally:
            started.set()
            done.set()

    t = threading.Thread(target=trainer, name="test-trainer")
    t.start()
    reports, gc_errors = [], []
    started.wait(30)
    deadline = time.monotonic() + 60
    try:
        while not done.is_set() and time.monotonic() < deadline:
            try:
                reports.append(maintenance.gc(root, [], min_age=0, storage_options=opts))
            except Exception as e:  # recorded: gc racing retention should not fail either
                gc_errors.append(e)
    finally:
        t.join(60)
    return dict(
        saved=saved,
        confirmed=confirmed,
        trainer_errors=trainer_errors,
        reports=reports,
        gc_errors=gc_errors,
    )


@pytest.mark.timeout(90)
def test_gc_with_min_age_zero_never_removes_a_live_trainers_work(s3) -> None:
    root, opts, fs = s3
    steps = 10
    r = _train_and_gc(root, opts, steps, SMALL, opts)
    assert not r["trainer_errors"], r["trainer_errors"]
    assert r["confirmed"] == list(range(1, steps + 1))
    assert len(r["reports"]) >= 3, "gc never overlapped the trainer"
    assert not r["gc_errors"], r["gc_errors"]
    assert _steps(root, opts) == [steps - 2, steps - 1, steps]
    _check_committed_files(root, opts)
    _assert_loads(root, opts, {s: r["saved"][s] for s in (steps - 2, steps - 1, steps)})
    in_use = sum(len(rep.in_use) for rep in r["reports"])
    removed_committed = [
        p for rep in r["reports"] for p, _ in rep.removed if any(f"step_{s:09d}" in p for s in (8, 9, 10))
    ]
    assert not removed_committed, removed_committed
    assert in_use >= 0  # informative: how often gc met the trainer's in-flight prefix


@pytest.mark.timeout(60)
def test_gc_with_min_age_zero_leaves_a_live_trainers_multipart_upload_alone(s3) -> None:
    """A live trainer is uploading step 2's shard in parts (its ``.writer`` marker holds its
    token, as the writer puts it there first); gc with ``min_age=0`` must not abort it.
    (Run concurrently with 13 MiB steps in 5 MiB parts, the same race makes the trainer's
    save fail with WriteError; this is the deterministic form.)"""
    root, opts, fs = s3
    storage = FsspecStorage(root, opts)
    with AsyncCheckpointer(root, {"w": _values(1)}, storage_options=opts) as ck:
        ck.save_async(1).result()
        bucket, _, prefix = root[5:].partition("/")
        key = f"{prefix}/step_000000002/__0_0.distcp"
        fs.pipe(f"{bucket}/{prefix}/step_000000002/.writer", ck._pipeline.run_id.encode())
        mpu = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        fs.call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1, Body=b"x" * PART
        )
        report = maintenance.gc(root, [], min_age=0, storage_options=opts)
        assert [p for p, _ in report.in_use] == [f"{root}/step_000000002"]  # the prefix is spared ...
        pending = storage.pending_uploads(root)
        for url, upload_id, _ in pending:  # clean up as the trainer would have
            storage.abort_upload(url, upload_id)
        fs.rm(f"{bucket}/{prefix}/step_000000002", recursive=True)
        assert not report.aborted and len(pending) == 1, report.aborted  # ... and so is its upload


# --------------------------------------------------------------------------- gc, a throttled store and a live writer


_PROOF_OF_LIFE = {
    "writer-marker": (matching(path=r"step_000000002/\.writer"), None),
    "writer-marker-get": (matching("GET", r"step_000000002/\.writer"), None),
    "owner-record": (matching(path=r"\.owners/"), None),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "what",
    [k for k in _PROOF_OF_LIFE],
)
def test_gc_under_throttling_never_takes_a_live_writers_prefix_for_abandoned(proxied, what: str) -> None:
    """A live writer has step 2 in flight (its ``.writer`` marker holds its token).  When
    the marker or the writer's owner record cannot be read (503), gc with ``min_age=0`` must
    keep the prefix or fail; an unreadable proof of life is not proof of death."""
    root, opts, fs, px = proxied
    state = {"w": _values(1)}
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        ck.save_async(1).result()
        prefix = f"{root[5:]}/step_000000002"
        fs.pipe(f"{prefix}/.writer", ck._pipeline.run_id.encode())
        fs.pipe(f"{prefix}/__0_0.distcp", b"x" * 1000)  # the writer's shard, mid-save
        px.set("throttle", _PROOF_OF_LIFE[what][0])
        try:
            report = maintenance.gc(root, [], min_age=0, storage_options=opts)
        except StorageError:
            report = None
        px.set("pass")
        assert px.faulted, "the fault never hit"
        assert fs.exists(f"{prefix}/__0_0.distcp"), (
            f"gc removed a live writer's in-flight step: {report and report.removed}"
        )
        fs.rm(prefix, recursive=True)
    assert _steps(root, opts) == [1]


# --------------------------------------------------------------------------- how errors are classified


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["listdir", "read_bytes"])
def test_a_brief_slowdown_is_retried_by_the_library(proxied, op: str) -> None:
    root, opts, fs, px = proxied
    fs.pipe(f"{root[5:]}/some/file", b"payload")
    storage = FsspecStorage(root, opts)
    storage.retries = 3
    px.set("throttle", matching("GET"), count=2)  # two 503 SlowDown, then the store answers
    if op == "listdir":
        assert storage.listdir(f"{root}/some") == ["file"]
    else:
        assert storage.read_bytes(f"{root}/some/file") == b"payload"
    assert px.faulted["GET"] == 2


@pytest.mark.timeout(60)
def test_a_local_first_upload_failure_is_a_library_error(proxied, tmp_path) -> None:
    root, opts, _, px = proxied
    opts = {**opts, "default_block_size": PART}
    state = {"w": _values(1, BIG)}
    with AsyncCheckpointer(
        root, state, storage=StorageOptions(fsspec=opts, local_dir=str(tmp_path / "local"))
    ) as ck:
        px.set(*_UPLOAD_FAULTS["part-outage"])
        h = ck.save_async(1)
        h.result()
        err = h.uploaded.exception(timeout=60)
        assert err is not None
        px.set("pass")
        with pytest.raises(WriteError):
            ck.wait_uploaded(timeout=30)
    assert isinstance(err, (StorageError, WriteError)), repr(err)


# --------------------------------------------------------------------------- request budget


def test_a_save_and_its_retention_send_only_the_requests_they_need(proxied) -> None:
    """Each request to a real store is a round trip of tens of milliseconds, and the small
    ones around a save add up: a steady-state save of one small shard, with retention
    deleting the step it drops, sends 14 requests (it sent 26 when every small PUT was
    confirmed by a HEAD, every existence check of a file also listed its prefix, every
    deletion HEADed its key first and every listing of an empty prefix listed the parent).
    """
    root, opts, _, px = proxied
    state = {"w": torch.zeros(SMALL)}
    with AsyncCheckpointer(root, state, keep=KeepLast(2), storage_options=opts) as ck:
        for s in (1, 2, 3):
            ck.save_async(s).result()
        first = len(px.log)
        state["w"].copy_(_values(4))
        ck.save_async(4).result()
        sent = [(m, p) for m, p, _ in px.log[first:]]
        assert [s.step for s in list_checkpoints(root, storage_options=opts)] == [3, 4]
    heads = [p for m, p in sent if m == "HEAD"]
    # one HEAD asks whether step 4 is already committed, one reads the 0.1 protected list;
    # nothing that was just PUT is HEADed again
    assert len(heads) == 2, sent
    assert any("step_000000004/manifest.json" in p for p in heads)
    # a file's existence is one HEAD, not also a one-key listing of its name as a prefix
    assert not [p for m, p in sent if m == "GET" and "max-keys=1" in p], sent
    assert len(sent) <= 14, sent
    restored = {"w": torch.zeros(SMALL)}
    assert resume(root, restored, storage_options=opts) == 4
    assert_same(restored, {"w": _values(4)})


@pytest.mark.parametrize("max_get_mib", [None, 2])
def test_whole_file_gets_grow_with_the_load(proxied, monkeypatch, max_get_mib) -> None:
    """A GET costs a round trip and a request fee whatever its size: the checkpointer's resume
    reads a shard in pieces that grow with the load (about two rounds of the GETs in flight,
    up to ``MAX_GET``), not in pieces of a fixed 32 MiB.  Scaled down here: 1 MiB pieces at
    least, 2 GETs in flight, a 13 MiB shard."""
    from asyncckpt.reader import ManifestReader, pieces

    root, opts, _, px = proxied
    state = {"w": _values(1, BIG)}
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        info = ck.save_async(1).result()
    size = read_manifest(FsspecStorage(root, opts), info.path).files["__0_0.distcp"]["size"]
    monkeypatch.setattr(ManifestReader, "COALESCE_BYTES", 1 << 20)
    monkeypatch.setattr(ManifestReader, "READ_CONCURRENCY", 2)
    if max_get_mib is not None:
        monkeypatch.setattr(ManifestReader, "MAX_GET", max_get_mib << 20)
    live = {"w": torch.zeros(BIG)}
    with AsyncCheckpointer(root, live, storage_options=opts) as ck:
        first = len(px.log)
        assert ck.resume() == 1
        gets = [p for m, p, _ in px.log[first:] if m == "GET" and p.endswith("__0_0.distcp")]
    piece = min(size // 4 >> 20 << 20, (max_get_mib or 1 << 10) << 20)  # a quarter: 2 rounds of 2
    padded = -(-size // 4096) * 4096
    assert len(gets) == len(pieces(padded, piece)) < len(pieces(padded, 1 << 20))
    assert_same(live, {"w": _values(1, BIG)})
