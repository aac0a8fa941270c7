"""Differential checkpoints (``WriterOptions(incremental=True)``): bit-exact round trips,
only changed parts written, reference-counted deletion in every order, gc, damage caught,
export to stock DCP, and the cases that must refuse or start whole."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from asyncckpt import AsyncCheckpointer, ConfigError, StorageOptions, WriterOptions, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.chunkstore import PART_SIZE, parse_object, referenced
from asyncckpt.cli import main
from asyncckpt.maintenance import gc
from asyncckpt.policy import KeepLast
from asyncckpt.pruner import decommit_and_remove
from asyncckpt.step_files import verify_files
from asyncckpt.storage import LocalStorage

from .helpers import assert_same, rewrite_manifest, snapshot

INC = WriterOptions(incremental=True)


def _step(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:09d}")


def _store(root: str) -> set[str]:
    d = os.path.join(root, ".chunks")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def _problems(root: str, step: int) -> list[str]:
    return verify_files(LocalStorage(), _step(root, step), read_manifest(LocalStorage(), _step(root, step)))


def _refs(root: str, step: int) -> set[str]:
    return referenced(read_manifest(LocalStorage(), _step(root, step)))


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(3 * PART_SIZE // 4 + 100, generator=g),  # 3 parts and a bit
        "emb": torch.randn(4096, 512, generator=g).to(torch.bfloat16),  # 4 MiB: exactly 1 part
        "head": torch.randn(1000, generator=g),
        "count": torch.tensor(0, dtype=torch.int64),
        "lr": 0.1,
    }


def _blank(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def _load(root: str, step: int | None, like: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = _blank(like)
    got = resume(root, out, step=step)
    assert got is not None
    return snapshot({k: v for k, v in out.items() if isinstance(v, torch.Tensor)})


def _train(state: dict[str, Any], step: int) -> None:
    state["head"].add_(1.0)
    state["count"].fill_(step)


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_round_trip_every_dtype_both_executors(tmp_path, executor: str, compression: str | None) -> None:
    if compression is not None:
        pytest.importorskip("blosc2")
    from .test_compression import _every_dtype

    tensors = _every_dtype()
    tensors["big"] = torch.randn(PART_SIZE // 2 + 3)  # two parts, the second short
    state = {"t": tensors, "extra": {"epoch": 3}}
    root = str(tmp_path / "ckpt")
    opts = WriterOptions(incremental=True, executor=executor, compression=compression)
    with AsyncCheckpointer(root, state, writer=opts) as ck:
        ck.save_async(1, force=True)
        ck.wait()
        tensors["i_torch.int32"].add_(1)
        ck.save_async(2, force=True)
    for step in (1, 2):
        assert not os.path.exists(os.path.join(_step(root, step), ".metadata"))  # not stock DCP
    assert len(_refs(root, 2) - _refs(root, 1)) == 1  # only the changed tensor's part is new
    want = snapshot(state)
    got = {
        "t": {k: torch.full_like(v, 7) if v.numel() else v.clone() for k, v in tensors.items()},
        "extra": {},
    }
    assert resume(root, got) == 2
    assert_same(snapshot(got), want)  # bit-exact: NaN payloads, -0.0 and all


def test_only_changed_parts_are_written(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    state = _state()
    stats: list[dict[str, Any]] = []
    with AsyncCheckpointer(root, state, writer=INC, on_stats=stats.append) as ck:
        ck.save_async(1, force=True).committed.result()
        first = _store(root)
        _train(state, 2)
        ck.save_async(2, force=True).committed.result()
        second = _store(root) - first
        state["emb"][100].add_(1)  # one row of the table: its part only
        ck.save_async(3, force=True).committed.result()
        third = _store(root) - first - second
        ck.save_async(4, force=True).committed.result()  # nothing changed
        fourth = _store(root) - first - second - third
    # step 1 is whole: 4 frozen parts, the table, the head, the counter
    assert len(first) == 7
    # step 2: the head and the counter; step 3: the table's part only; step 4: nothing
    assert len(second) == 2 and len(third) == 1 and fourth == set()
    assert {parse_object(n)[1] for n in third} == {3}  # type: ignore[index]
    written = {s["step"]: s["bytes_written"] for s in stats}
    assert written[4] == 0  # an unchanged step writes its manifest only
    assert written[3] == PART_SIZE  # one row changed: its table's part
    for step in (1, 2, 3, 4):
        assert _problems(root, step) == []
    want = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    assert_same(_load(root, 4, state), want)


def test_parts_are_written_directly_from_the_page_aligned_slot(tmp_path, caplog) -> None:
    """Raw parts leave no page cache behind where O_DIRECT works (the slot is page-aligned)."""
    root = str(tmp_path / "ckpt")
    state = {"w": torch.randn(PART_SIZE // 4 * 2)}
    with AsyncCheckpointer(root, state, writer=WriterOptions(incremental=True, direct_io=True)) as ck:
        try:
            ck.save_async(1, force=True).committed.result()
        except Exception as e:  # noqa: BLE001 - a filesystem without O_DIRECT (tmpfs) refuses
            pytest.skip(f"O_DIRECT unavailable here: {e}")
    assert len(_store(root)) == 2


def test_delete_steps_in_every_order_then_gc_leaves_exactly_the_referenced_parts(tmp_path) -> None:
    base = str(tmp_path / "base")
    state = _state()
    saved: dict[int, dict[str, torch.Tensor]] = {}
    with AsyncCheckpointer(base, state, writer=INC) as ck:
        for step in range(1, 5):
            _train(state, step)
            if step == 3:
                state["emb"][7].mul_(2)
            ck.save_async(step, force=True).committed.result()
            saved[step] = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    storage = LocalStorage()
    for order in itertools.permutations(range(1, 5)):
        root = str(tmp_path / "r")
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        left = set(range(1, 5))
        for step in order[:-1]:  # the last one stays
            decommit_and_remove(storage, _step(root, step), step)
            left.discard(step)
            report = gc(root, min_age=0)
            assert report.errors == []
            live = set().union(*(_refs(root, s) for s in left))
            assert _store(root) == live, (order, step)
            for s in left:
                assert_same(_load(root, s, state), saved[s])


def test_retention_keeps_what_newer_steps_still_reference(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, keep=KeepLast(2), writer=INC) as ck:
        for step in range(1, 7):
            _train(state, step)
            ck.save_async(step, force=True).committed.result()
    assert sorted(os.listdir(root)) == [
        ".chunks",
        ".owners",
        ".tmp",
        "step_000000005",
        "step_000000006",
    ] or sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_000000005", "step_000000006"]
    # the frozen parts step 1 wrote are still there, nothing unreferenced is
    assert _store(root) == _refs(root, 5) | _refs(root, 6)
    assert any(parse_object(n)[1] == 1 for n in _store(root))  # type: ignore[index]
    want = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    assert_same(_load(root, None, state), want)


def test_a_parent_deleted_by_someone_else_stays_usable(tmp_path) -> None:
    """Another process deletes the step the next save deduplicates against: the writer's
    held parts survive its own sweep, and the new step loads."""
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        ck.save_async(1, force=True).committed.result()
        decommit_and_remove(LocalStorage(), _step(root, 1), 1)  # e.g. `rm -r` from an eval job
        _train(state, 2)
        ck.save_async(2, force=True).committed.result()
        _train(state, 3)
        ck.save_async(3, force=True).committed.result()
        assert gc(root, min_age=0).chunks == []  # a live writer's parts are never gc's to take
    want = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    assert_same(_load(root, 3, state), want)
    two = _load(root, 2, state)
    assert torch.equal(two[".frozen"], want[".frozen"]) and int(two[".count"]) == 2


def test_the_first_save_after_a_resume_is_whole(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        for step in (1, 2, 3):
            _train(state, step)
            ck.save_async(step, force=True).committed.result()
        assert ck.resume(step=2) == 2  # a rollback: 3 is abandoned
        ck.save_async(10, force=True).committed.result()
    own = {n for n in _refs(root, 10) if parse_object(n)[1] == 10}  # type: ignore[index]
    assert own == _refs(root, 10)  # nothing borrowed from the abandoned line (or any other)
    gc(root, min_age=0)
    for step in (1, 2, 10):
        assert _problems(root, step) == []


def test_a_corrupt_part_is_caught_by_verify_and_resume_falls_back(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        ck.save_async(1, force=True).committed.result()
        older = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        _train(state, 2)
        ck.save_async(2, force=True).committed.result()
    own = sorted(n for n in _refs(root, 2) if parse_object(n)[1] == 2)  # type: ignore[index]
    path = os.path.join(root, ".chunks", own[0])
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    problems = _problems(root, 2)
    assert problems and all("checksum" in p for p in problems)
    assert _problems(root, 1) == []
    with pytest.warns(RuntimeWarning, match="skipping step 2"):
        assert_same(_load(root, None, state), older)
    os.remove(path)
    assert any("missing" in p for p in _problems(root, 2))


def test_hostile_part_names_are_rejected(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        ck.save_async(1, force=True).committed.result()
    mpath = os.path.join(_step(root, 1), "manifest.json")
    with open(mpath) as f:
        doc = json.load(f)
    doc["tensors"]["head"]["chunks"][0]["parts"][0][0] = "../../../etc/passwd"
    rewrite_manifest(mpath, doc)
    with (
        pytest.warns(RuntimeWarning, match="unsafe file name"),
        pytest.raises(Exception, match="no loadable"),
    ):
        resume(root, _blank(state))


def test_export_dcp_is_read_by_stock_dcp_load(tmp_path, capsys) -> None:
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "plain")
    model = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Linear(300, 4))
    with AsyncCheckpointer(root, {"model": model}, writer=INC) as ck:
        ck.save_async(1, force=True).committed.result()
    assert main(["export", root, out, "--format", "dcp"]) == 0
    assert "stock dcp.load" in capsys.readouterr().out
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Linear(300, 4))
    sd = fresh.state_dict()
    dcp.load({"model": sd}, checkpoint_id=out)
    fresh.load_state_dict(sd)
    assert_same(snapshot(fresh.state_dict()), snapshot(model.state_dict()))


def test_ls_and_inspect_show_shared_and_own_bytes(tmp_path, capsys) -> None:
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        for step in (1, 2):
            _train(state, step)
            ck.save_async(step, force=True).committed.result()
    assert main(["ls", root, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    store = sum(os.path.getsize(os.path.join(root, ".chunks", n)) for n in _store(root))
    assert doc["store"]["bytes"] == store
    steps = {c["step"]: c for c in doc["checkpoints"]}
    assert steps[2]["own_bytes"] < steps[2]["part_bytes"] == steps[1]["part_bytes"]
    assert steps[1]["own_bytes"] == steps[1]["part_bytes"]
    assert doc["disk_bytes"] < steps[1]["bytes"] + steps[2]["bytes"]
    assert main(["inspect", root]) == 0
    assert "shared with earlier steps" in capsys.readouterr().out


def test_local_first_tier_uploads_only_the_new_parts(tmp_path) -> None:
    """Differential steps committed locally, uploaded with only the parts the remote lacks;
    the remote's retention and sweep keep exactly what its steps reference; a fresh reader
    of the remote alone loads the newest step."""
    remote, local = str(tmp_path / "remote"), str(tmp_path / "local")
    state = _state()
    with AsyncCheckpointer(
        remote, state, keep=KeepLast(2), writer=INC, storage=StorageOptions(local_dir=local)
    ) as ck:
        for step in range(1, 5):
            _train(state, step)
            ck.save_async(step, force=True).result()
            ck.wait_uploaded()
            if step == 1:
                base = _store(remote)
            elif step == 2:
                assert len(_store(remote) - base) == 2  # the head and the counter: nothing else went up
    want = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    steps = sorted(n for n in os.listdir(remote) if n.startswith("step_"))
    assert steps == ["step_000000003", "step_000000004"]
    assert _store(remote) == _refs(remote, 3) | _refs(remote, 4)  # nothing dangling, nothing leaked
    assert any(parse_object(n)[1] == 1 for n in _store(remote))  # type: ignore[index]  # the base, once
    shutil.rmtree(local)
    assert_same(_load(remote, None, state), want)
    for step in (3, 4):
        assert _problems(remote, step) == []


def test_bad_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="incremental must be True or False"):
        WriterOptions(incremental=1)  # type: ignore[arg-type]


@pytest.mark.s3
def test_s3_round_trip_with_compression(s3) -> None:
    pytest.importorskip("blosc2")
    root, opts, _ = s3
    state = _state()
    writer = WriterOptions(incremental=True, compression="lz4")
    with AsyncCheckpointer(
        root, state, keep=KeepLast(1), writer=writer, storage=StorageOptions(fsspec=opts)
    ) as ck:
        for step in (1, 2, 3):
            _train(state, step)
            ck.save_async(step, force=True).committed.result()
    want = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    got = _blank(state)
    assert resume(root, got, storage_options=opts) == 3
    assert_same(snapshot({k: v for k, v in got.items() if isinstance(v, torch.Tensor)}), want)
    report = gc(root, min_age=0, storage_options=opts)
    assert report.errors == [] and report.chunks == []  # retention already took step 1 and 2's own parts


def test_a_reader_keeps_reading_parts_that_retention_deletes_meanwhile(tmp_path) -> None:
    """resume pins the step's parts: a step pruned (and its parts swept) after the reader
    opened them still loads, as a plain step's shard files do."""
    from asyncckpt.resume import _pin

    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        _train(state, 1)
        ck.save_async(1, force=True).committed.result()
    path = _step(root, 1)
    m = read_manifest(LocalStorage(), path)
    fds = _pin(LocalStorage(), path, m)
    try:
        assert set(fds) == referenced(m)  # every part pinned (no shard files in this step)
        shutil.rmtree(os.path.join(root, ".chunks"))  # deleted after the reader opened them
        from asyncckpt.resume import load_checkpoint

        got = _blank(state)
        paths = {name: f"/proc/self/fd/{fd}" for name, fd in fds.items()}
        load_checkpoint(LocalStorage(), path, m, got, paths=paths)
    finally:
        for fd in fds.values():
            os.close(fd)
    want = snapshot({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    assert_same(snapshot({k: v for k, v in got.items() if isinstance(v, torch.Tensor)}), want)


def test_a_save_that_fails_writing_parts_takes_them_back(tmp_path) -> None:
    """ENOSPC at the third part: the parts already written are removed at once (a full disk
    is not left full of a failed save), the error is reported, the next save commits."""
    import errno

    from .helpers import FaultyStorage

    root = str(tmp_path / "ckpt")
    state = _state()
    full = OSError(errno.ENOSPC, "No space left on device")
    storage = FaultyStorage(fail_op="open_write", fail_on_call=3, err=full)
    with AsyncCheckpointer(root, state, writer=INC, storage=StorageOptions(backend=storage)) as ck:
        h = ck.save_async(1, force=True)
        with pytest.raises(Exception, match="No space left"):
            h.result()
        assert _store(root) == set()
        ck.save_async(2, force=True).committed.result()
    assert _store(root) == _refs(root, 2)


def test_who_may_delete_which_part() -> None:
    """The deletion rules of ``chunkstore.unreferenced``, case by case."""
    from asyncckpt.chunkstore import object_name, unreferenced

    me, dead, live = "a" * 16, "b" * 16, "c" * 16
    h = "0" * 32

    def name(owner: str, step: int) -> str:
        return object_name(h, owner, step, "1234abcd")

    mine_done, mine_flying, mine_held, mine_live = (name(me, s) for s in (1, 2, 3, 4))
    theirs_dead, theirs_live = name(dead, 5), name(live, 6)
    names = [mine_done, mine_flying, mine_held, mine_live, theirs_dead, theirs_live, "not-a-part"]

    def alive(t: str) -> bool:
        return t in (me, live)

    got = unreferenced(names, {mine_live}, alive, me, held={mine_held}, in_flight={2})
    assert sorted(got) == sorted([mine_done, theirs_dead])
    # known mode (several ranks, a remote tier): only what a committed step once referenced
    got = unreferenced(names, {mine_live}, alive, me, held={mine_held}, in_flight={2}, known={mine_flying})
    assert got == [mine_flying]
    got = unreferenced(names, set(), alive, me, known={theirs_dead, theirs_live})
    assert got == [theirs_dead]  # never another live writer's
    assert unreferenced(names, set(), alive, None) == [theirs_dead]  # gc: dead owners only


def test_gc_spares_young_parts_of_a_dead_run(tmp_path) -> None:
    """A crashed run's unreferenced parts go with gc, but only once older than --min-age (an
    upload of them may be under way)."""
    from asyncckpt.chunkstore import object_name

    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state, writer=INC) as ck:
        ck.save_async(1, force=True).result()
    orphan = os.path.join(root, ".chunks", object_name("f" * 32, "d" * 16, 9, "00000000"))
    with open(orphan, "wb") as f:
        f.write(b"x" * 100)
    assert gc(root).chunks == []  # young: spared by the default --min-age
    os.utime(orphan, (1, 1))
    assert gc(root).chunks == [orphan]  # old, owner gone, referenced by no step
    assert _store(root) == _refs(root, 1)
