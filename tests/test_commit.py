"""commit.py: a step becomes visible all at once, manifest last; done records of several ranks."""

from __future__ import annotations

import errno
import json
import os
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp

from asyncckpt import layout
from asyncckpt.commit import (
    WriteAborted,
    await_manifest,
    gather_done_records,
    write_and_commit,
    write_done_record,
)
from asyncckpt.errors import CheckpointTimeoutError, StepExistsError, StorageError
from asyncckpt.layout import Kind
from asyncckpt.manifest import Chunk, Manifest, TensorEntry
from asyncckpt.request import SaveOutcome, SaveRequest
from asyncckpt.staging import StagingPlan, StagingPool, copy_into
from asyncckpt.state import flatten_state
from asyncckpt.storage import FsspecStorage, LocalStorage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return {
        "model": model,
        "extra": {"bf16": torch.randn(3, 3).to(torch.bfloat16), "ids": torch.arange(6), "epoch": 3},
    }


def _zeros_like_state(state: dict) -> dict:
    """What plain dcp.load fills: the state's tensors as a nested dict of zeros."""
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].state_dict().items()},
        "extra": {"bf16": torch.zeros(3, 3, dtype=torch.bfloat16), "ids": torch.zeros(6, dtype=torch.int64)},
    }


class Slot:
    """One staged snapshot of a state: a 1-slot pool, its templates and the request."""

    def __init__(
        self, state: dict, root: str, step: int, kind: Kind = Kind.PERMANENT, n_files: int = 1, **req
    ) -> None:
        flat = flatten_state(state)
        self.flat = flat
        self.plan = StagingPlan.from_tensors(flat.tensors, flat.signature(), files=n_files)
        self.pool = StagingPool(self.plan, 1)
        copy_into(self.pool.views(0), flat.tensors)
        self.req = SaveRequest(
            root=root, step=step, kind=kind, tree=flat.tree, paths=flat.paths, metrics={"loss": 0.5}, **req
        )

    def commit(self, storage, **kw) -> SaveOutcome:
        return write_and_commit(
            storage, self.req, self.plan.entries, self.plan.files, self.pool.buffer(0), None, **kw
        )


def _tmp_entries(root: str) -> list[str]:
    tmp = layout.tmp_dir(root)
    return os.listdir(tmp) if os.path.isdir(tmp) else []


@pytest.mark.parametrize("n_files", [1, 3])
def test_commit_on_posix_is_readable_by_stock_dcp(tmp_path, n_files):
    root = str(tmp_path / "ckpt")
    state = _state()
    slot = Slot(state, root, 7, n_files=n_files)
    out = slot.commit(LocalStorage())
    final = os.path.join(root, "step_000000007")
    assert out.info.step == 7 and out.info.path == final and out.info.tier == "permanent"
    assert out.info.metrics == {"loss": 0.5}
    names = sorted(os.listdir(final))
    shards = [n for n in names if n.endswith(".distcp")]
    assert layout.MANIFEST in names and layout.DCP_METADATA in names
    assert len(shards) == min(n_files, len(slot.flat.tensors))
    assert out.bytes_written == sum(
        os.path.getsize(os.path.join(final, n)) for n in names if n != layout.MANIFEST
    )
    # nothing is left in progress
    assert _tmp_entries(root) == []
    assert sorted(os.listdir(root)) == [layout.TMP_DIR, "step_000000007"]

    m = Manifest.from_json(open(os.path.join(final, layout.MANIFEST), "rb").read(), "m")
    assert m.step == 7 and set(m.tensors) == set(slot.flat.tensors)
    assert set(m.files) == set(names) - {layout.MANIFEST}

    loaded = _zeros_like_state(state)
    dcp.load(loaded, checkpoint_id=final, no_dist=True)
    for k, v in state["model"].state_dict().items():
        assert torch.equal(loaded["model"][k], v), k
    assert torch.equal(loaded["extra"]["bf16"], state["extra"]["bf16"])
    assert torch.equal(loaded["extra"]["ids"], state["extra"]["ids"])
    slot.pool.close()


def test_snapshot_kind_commits_under_its_kind_root(tmp_path):
    root = str(tmp_path / "ckpt")
    snaps = layout.kind_root(root, Kind.SNAPSHOT)
    slot = Slot(_state(), snaps, 4, kind=Kind.SNAPSHOT)
    out = slot.commit(LocalStorage())
    assert out.info.tier == "snapshot"
    assert os.path.isfile(os.path.join(root, "snapshots", "step_000000004", layout.MANIFEST))
    assert not os.path.exists(os.path.join(root, "step_000000004"))
    slot.pool.close()


def test_a_committed_step_is_never_replaced_on_posix(tmp_path):
    root = str(tmp_path / "ckpt")
    slot = Slot(_state(0), root, 3)
    slot.commit(LocalStorage())
    before = open(os.path.join(root, "step_000000003", layout.MANIFEST), "rb").read()
    other = Slot(_state(1), root, 3)
    with pytest.raises(StorageError) as ei:
        other.commit(LocalStorage())
    assert ei.value.errno == errno.EEXIST
    assert open(os.path.join(root, "step_000000003", layout.MANIFEST), "rb").read() == before
    assert _tmp_entries(root) == []  # the losing attempt's temp directory is removed
    slot.pool.close()
    other.pool.close()


@pytest.fixture
def memroot():
    storage = FsspecStorage("memory://")
    root = f"memory://asyncckpt-commit-{uuid.uuid4().hex[:8]}/run"
    yield storage, root
    storage.fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_object_store_commit_and_second_commit_raises_step_exists(memroot):
    storage, root = memroot
    slot = Slot(_state(0), root, 5)
    out = slot.commit(storage)
    final = layout.join(root, "step_000000005")
    assert out.info.path == final
    names = storage.listdir(final)
    assert layout.MANIFEST in names and layout.DCP_METADATA in names
    assert not storage.listdir(layout.tmp_dir(root))  # no temp area on an object store
    before = storage.read_bytes(layout.join(final, layout.MANIFEST))

    again = Slot(_state(1), root, 5)
    with pytest.raises(StepExistsError):
        again.commit(storage)
    # the committed step is untouched
    assert storage.read_bytes(layout.join(final, layout.MANIFEST)) == before
    assert storage.listdir(final) == names
    slot.pool.close()
    again.pool.close()


class RenameFails(LocalStorage):
    """Local storage whose step-directory rename fails (done records still rename)."""

    def rename_dir(self, src: str, dst: str) -> None:
        if layout.parse_step(layout.parent(dst)[1]) is not None:
            raise OSError(errno.EIO, "injected rename failure")
        super().rename_dir(src, dst)


def test_a_failed_rename_leaves_no_step_and_removes_the_temp_dir(tmp_path):
    root = str(tmp_path / "ckpt")
    slot = Slot(_state(), root, 9)
    with pytest.raises(OSError, match="injected"):
        slot.commit(RenameFails())
    assert not os.path.exists(os.path.join(root, "step_000000009"))
    assert _tmp_entries(root) == []
    # the slot still holds the data: a retry on healthy storage commits
    slot.commit(LocalStorage())
    assert os.path.isfile(os.path.join(root, "step_000000009", layout.MANIFEST))
    slot.pool.close()


def test_on_shards_written_runs_before_the_manifest(tmp_path):
    root = str(tmp_path / "ckpt")
    slot = Slot(_state(), root, 2)
    seen = []

    def shards_written() -> None:
        (name,) = _tmp_entries(root)
        files = os.listdir(os.path.join(layout.tmp_dir(root), name))
        seen.append(sorted(files))
        # the slot may be reused from here on: scribble over it
        slot.pool.buffer(0).fill_(0xAB)

    out = slot.commit(LocalStorage(), on_shards_written=shards_written)
    assert len(seen) == 1
    assert seen[0] and all(f.endswith(".distcp") for f in seen[0])
    assert layout.MANIFEST not in seen[0] and layout.DCP_METADATA not in seen[0]
    # the scribbling after the callback did not reach the committed step
    loaded = _zeros_like_state(slot_state := _state())
    dcp.load(loaded, checkpoint_id=out.info.path, no_dist=True)
    for k, v in slot_state["model"].state_dict().items():
        assert torch.equal(loaded["model"][k], v), k
    slot.pool.close()


@pytest.mark.parametrize("abort_on_call", [1, 2, 3])
def test_should_abort_stops_before_commit(tmp_path, abort_on_call):
    """Aborts at each phase (after the shards, after .metadata, before the rename)."""
    root = str(tmp_path / "ckpt")
    slot = Slot(_state(), root, 11)
    calls = []

    def should_abort() -> bool:
        calls.append(1)
        return len(calls) >= abort_on_call

    with pytest.raises(WriteAborted):
        slot.commit(LocalStorage(), should_abort=should_abort)
    assert len(calls) == abort_on_call
    assert not os.path.exists(os.path.join(root, "step_000000011"))
    assert _tmp_entries(root) == []
    slot.pool.close()


def test_should_abort_false_commits(tmp_path):
    root = str(tmp_path / "ckpt")
    slot = Slot(_state(), root, 12)
    slot.commit(LocalStorage(), should_abort=lambda: False)
    assert os.path.isfile(os.path.join(root, "step_000000012", layout.MANIFEST))
    slot.pool.close()


# --------------------------------------------------------------------------- done records


def _part(rank: int, fqn_rows: int = 2) -> tuple[dict[str, TensorEntry], dict[str, dict[str, int]]]:
    """Rank ``rank``'s rows [2r, 2r+2) of a (4, 3) tensor, plus a tensor only it has."""
    name = layout.shard_filename(rank, 0)
    chunk = Chunk([fqn_rows * rank, 0], [fqn_rows, 3], name, 0, 100, 40, 24, 1234 + rank)
    own = Chunk([], [], name, 100, 80, 140, 4, 99 + rank)
    tensors = {
        "w": TensorEntry("float32", [4, 3], [chunk]),
        f"only{rank}": TensorEntry("int32", [], [own]),
    }
    return tensors, {name: {"size": 180}}


def test_done_records_of_two_ranks_merge(tmp_path):
    storage = LocalStorage()
    d = str(tmp_path / "step")
    os.makedirs(d)
    for r in (1, 0):  # any order
        write_done_record(storage, d, r, *_part(r), run_id="run-a")
    assert sorted(os.listdir(d)) == ["__0.done.json", "__1.done.json"]  # no .part left behind
    tensors, files = gather_done_records(storage, d, 8, 2, timeout=5, run_id="run-a")
    assert set(files) == {"__0_0.distcp", "__1_0.distcp"}
    assert set(tensors) == {"w", "only0", "only1"}
    w = tensors["w"]
    assert (w.dtype, w.shape) == ("float32", [4, 3])
    assert [c.offsets for c in w.chunks] == [[0, 0], [2, 0]]  # sorted by position
    assert [c.file for c in w.chunks] == ["__0_0.distcp", "__1_0.distcp"]
    assert tensors["only1"].chunks[0].crc == 100


def test_a_done_record_of_another_run_is_ignored(tmp_path):
    storage = LocalStorage()
    d = str(tmp_path / "step")
    os.makedirs(d)
    write_done_record(storage, d, 0, *_part(0), run_id="run-new")
    write_done_record(storage, d, 1, *_part(1), run_id="run-crashed")
    with pytest.raises(CheckpointTimeoutError, match=r"ranks \[1\]"):
        gather_done_records(storage, d, 8, 2, timeout=0.2, run_id="run-new")
    # the crashed run's own view is incomplete too
    with pytest.raises(CheckpointTimeoutError, match=r"ranks \[0\]"):
        gather_done_records(storage, d, 8, 2, timeout=0.1, run_id="run-crashed")


def test_gather_waits_for_a_late_record_and_ignores_a_half_written_one(memroot):
    """On an object store a record is one PUT; an unparsable one is waited past."""
    storage, root = memroot
    d = layout.join(root, "step_000000008")
    write_done_record(storage, d, 0, *_part(0), run_id="r")
    # a record that is not (yet) valid JSON is taken for "not visible yet"
    storage.fs.pipe(layout.join(d, layout.done_record(1)), b'{"rank": 1, "run_')
    with pytest.raises(CheckpointTimeoutError):
        gather_done_records(storage, d, 8, 2, timeout=0.1, run_id="r")
    write_done_record(storage, d, 1, *_part(1), run_id="r")  # an object PUT replaces
    tensors, files = gather_done_records(storage, d, 8, 2, timeout=5, run_id="r")
    assert len(tensors["w"].chunks) == 2 and len(files) == 2


def test_gather_polls_should_abort(tmp_path):
    storage = LocalStorage()
    d = str(tmp_path / "step")
    os.makedirs(d)
    with pytest.raises(WriteAborted):
        gather_done_records(storage, d, 8, 2, timeout=30, should_abort=lambda: True, run_id="r")


def test_await_manifest_times_out_then_reads_it(tmp_path):
    root = str(tmp_path / "ckpt")
    final = os.path.join(root, "step_000000006")
    with pytest.raises(CheckpointTimeoutError, match="rank 0 did not commit"):
        await_manifest(LocalStorage(), final, 6, timeout=0.1)
    slot = Slot(_state(), root, 6)
    slot.commit(LocalStorage())
    m = await_manifest(LocalStorage(), final, 6, timeout=1)
    assert m.step == 6
    slot.pool.close()


def test_two_ranks_commit_one_step_on_posix(tmp_path):
    """Rank 1 writes its done record first; rank 0 joins it into the one manifest."""
    root = str(tmp_path / "ckpt")
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    slots = []
    for r in (0, 1):
        part = {"w": full[2 * r : 2 * r + 2].clone()}
        s = Slot(
            part,
            root,
            10,
            rank=r,
            world_size=2,
            run_id="agreed01",
            chunk_offsets={"w": (2 * r, 0)},
            global_shapes={"w": (4, 3)},
            commit_timeout=10,
        )
        slots.append(s)
    # rank 1 cannot finish before rank 0 commits: run it on a thread
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut1 = ex.submit(slots[1].commit, LocalStorage())
        out0 = slots[0].commit(LocalStorage())
        out1 = fut1.result(timeout=30)
    final = os.path.join(root, "step_000000010")
    assert out0.info.path == out1.info.path == final
    assert out0.info.world_size == 2
    m = json.loads(open(os.path.join(final, layout.MANIFEST), "rb").read())
    assert [c["offsets"] for c in m["tensors"]["w"]["chunks"]] == [[0, 0], [2, 0]]
    loaded = {"w": torch.zeros(4, 3)}
    dcp.load(loaded, checkpoint_id=final, no_dist=True)
    assert torch.equal(loaded["w"], full)
    assert _tmp_entries(root) == []
    for s in slots:
        s.pool.close()
