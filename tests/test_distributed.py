"""Several ranks with real torch.distributed (gloo, CPU) processes and a FileStore."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from asyncckpt import CorruptCheckpointError, list_checkpoints, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.cli import main as cli_main
from asyncckpt.storage import LocalStorage

from .dist_worker import full, replicated

pytestmark = pytest.mark.multiproc
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ranks(
    world: int, scenario: str, tmp_path, *args: str, timeout: float = 180
) -> list[subprocess.CompletedProcess]:
    store = str(tmp_path / f"store-{scenario}-{world}-{os.urandom(4).hex()}")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.dist_worker", scenario, str(r), str(world), store, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )  # fmt: skip
        for r in range(world)
    ]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: a rank hung (no timeout bounded its wait)") from None
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("save_world, load_world", [(4, 2), (2, 4), (2, 2)])
def test_sharded_save_and_resume_on_another_world_size(tmp_path, save_world: int, load_world: int) -> None:
    root = str(tmp_path / "ckpt")
    ok(run_ranks(save_world, "save_sharded", tmp_path, root, "3"))
    m = read_manifest(LocalStorage(), os.path.join(root, "step_000000003"))
    assert m.world_size == save_world
    assert len(m.tensors["w.a"].chunks) == save_world  # every rank wrote its own shard
    assert len(m.tensors["rep"].chunks) == 1  # the replicated tensor was written once
    ok(run_ranks(load_world, "load_sharded", tmp_path, root, "3"))
    # and on one process without torch.distributed, into plain full tensors
    state = {
        "w": {"a": torch.zeros(16, 4), "b": torch.zeros(8, 6)},
        "rep": torch.zeros(100),
        "extra": {"step": 0},
    }
    assert resume(root, state) == 3
    assert torch.equal(state["w"]["a"], full("a", 3)) and torch.equal(state["w"]["b"], full("b", 3))
    assert torch.equal(state["rep"], replicated(3))


def test_single_process_checkpoint_resumes_sharded(tmp_path) -> None:
    from asyncckpt import AsyncCheckpointer

    root = str(tmp_path / "ckpt")
    state = {"w": {"a": full("a", 5), "b": full("b", 5)}, "rep": replicated(5), "extra": {"step": 5}}
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(5).result()
    ok(run_ranks(2, "load_sharded", tmp_path, root, "5"))


def test_replicated_tensors_are_written_once_and_spread_over_ranks(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    ok(run_ranks(2, "save_replicated", tmp_path, root, "1"))
    step_dir = os.path.join(root, "step_000000001")
    m = read_manifest(LocalStorage(), step_dir)
    assert all(len(t.chunks) == 1 for t in m.tensors.values())
    writers = {c.file.split("_")[2] for t in m.tensors.values() for c in t.chunks}
    assert writers == {"0", "1"}, writers  # both ranks share the work
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    assert resume(root, {"model": fresh}) == 1
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_writer_processes_on_several_ranks(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    ok(run_ranks(2, "save_sharded", tmp_path, root, "2", "process"))
    ok(run_ranks(2, "load_sharded", tmp_path, root, "2"))


def test_a_rank_dying_mid_save_leaves_no_manifest_and_a_clear_error(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    results = run_ranks(2, "kill_rank1_midsave", tmp_path, root)
    assert results[1].returncode == 17
    assert results[0].returncode == 0, results[0].stderr[-3000:]
    assert "CLEAR ERROR" in results[0].stdout and "ranks [1]" in results[0].stdout
    assert [c.step for c in list_checkpoints(root)] == [1]
    ok(run_ranks(2, "load_sharded", tmp_path, root, "1"))


def test_coordinator_dying_before_the_manifest_commits_nothing(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    results = run_ranks(2, "kill_coordinator_before_manifest", tmp_path, root)
    assert results[0].returncode == 19
    assert results[1].returncode == 0, results[1].stderr[-3000:]
    assert "rank 0 did not commit" in results[1].stdout
    assert [c.step for c in list_checkpoints(root)] == [1]
    ok(run_ranks(2, "load_sharded", tmp_path, root, "1"))
    assert json.loads(json.dumps([c.step for c in list_checkpoints(root)])) == [1]


def test_fsdp_example_crashes_on_two_ranks_and_resumes_on_one(tmp_path) -> None:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed next to this Python")
    root = str(tmp_path / "fsdp")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")

    def launch(n: int, *extra: str) -> subprocess.CompletedProcess:
        port = str(29600 + int.from_bytes(os.urandom(2), "little") % 2000)
        cmd = [torchrun, f"--nproc-per-node={n}", "--master-addr=127.0.0.1", f"--master-port={port}",
               os.path.join(REPO, "examples", "fsdp_train.py"), "--root", root, *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    crashed = launch(2, "--crash-at", "17")
    assert crashed.returncode != 0  # SIGKILLed on purpose
    committed = [(c.step, c.world_size) for c in list_checkpoints(root)]
    # saves are asynchronous: the kill lands after some prefix of them has committed
    assert committed and committed == [(s, 2) for s in (5, 10, 15)][: len(committed)], committed
    resumed = launch(1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"world size 1: starting at step {committed[-1][0]}" in resumed.stdout
    assert [(c.step, c.world_size) for c in list_checkpoints(root)] == [(20, 1), (25, 1), (30, 1)]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_local_tier_with_several_ranks_joins_the_parts_on_the_remote(tmp_path, executor: str) -> None:
    """Each rank commits its own shards to its local disk, uploads them, and rank 0 commits the
    joined step on the remote root; retention prunes both tiers; resume reads the remote."""
    remote, local = str(tmp_path / "remote"), str(tmp_path / "nvme")
    # a crashed earlier run left rank 1's shard and done record of step 2 behind, never committed
    stale = tmp_path / "remote" / "step_000000002"
    stale.mkdir(parents=True)
    (stale / "__1_0.distcp").write_bytes(b"stale bytes")
    (stale / "__1.done.json").write_text(
        json.dumps({"rank": 1, "files": {"__1_0.distcp": {"size": 11}}, "tensors": {}})
    )
    ok(run_ranks(2, "save_local_tier", tmp_path, remote, local, executor))
    two = {
        "w": {"a": torch.zeros(16, 4), "b": torch.zeros(8, 6)},
        "rep": torch.zeros(100),
        "extra": {"step": 0},
    }
    assert resume(remote, two, step=2) == 2  # this run's parts, not the stale record
    assert torch.equal(two["w"]["a"], full("a", 2)) and torch.equal(two["w"]["b"], full("b", 2))
    m = read_manifest(LocalStorage(), os.path.join(remote, "step_000000003"))
    assert m.world_size == 2 and m.piece is None and m.remote is None
    assert len(m.tensors["w.a"].chunks) == 2 and len(m.tensors["rep"].chunks) == 1
    state = {
        "w": {"a": torch.zeros(16, 4), "b": torch.zeros(8, 6)},
        "rep": torch.zeros(100),
        "extra": {"step": 0},
    }
    assert resume(remote, state) == 3  # on one process, resharded
    assert torch.equal(state["w"]["a"], full("a", 3)) and torch.equal(state["rep"], replicated(3))
    piece = read_manifest(LocalStorage(), os.path.join(local, "rank00001", "step_000000003"))
    assert piece.piece == 1 and piece.world_size == 2
    with pytest.raises(CorruptCheckpointError, match="holds only rank 0's shards"):
        resume(os.path.join(local, "rank00000"), state)
    out = str(tmp_path / "export")  # nor exported: it would be partial tensors
    assert cli_main(["export", os.path.join(local, "rank00001"), out]) != 0 and not os.path.exists(out)


def test_local_tier_rank_dying_before_its_upload_commits_nothing_remotely(tmp_path) -> None:
    remote, local = str(tmp_path / "remote"), str(tmp_path / "nvme")
    res = run_ranks(2, "local_tier_rank_dies", tmp_path, remote, local)
    assert res[1].returncode == 23 and res[0].returncode == 0, res[0].stderr[-3000:]
    assert "CLEAR ERROR" in res[0].stdout and "ranks [1] did not finish" in res[0].stdout
    assert [c.step for c in list_checkpoints(remote)] == [1]
    assert not os.path.exists(os.path.join(remote, "step_000000002", "manifest.json"))


def test_differential_saves_on_two_ranks_resume_on_one(tmp_path) -> None:
    """Each rank stores its own parts and deduplicates against its own last step; rank 0's
    retention deletes only parts it saw referenced, and the result loads on one process."""
    from asyncckpt.chunkstore import parse_object, referenced

    root = str(tmp_path / "ckpt")
    ok(run_ranks(2, "save_incremental", tmp_path, root, "4"))
    steps = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    assert steps == ["step_000000003", "step_000000004"]
    refs = {s: referenced(read_manifest(LocalStorage(), os.path.join(root, s))) for s in steps}
    store = set(os.listdir(os.path.join(root, ".chunks")))
    assert store == refs[steps[0]] | refs[steps[1]]  # nothing unreferenced, nothing missing
    # the replicated "big" (two parts) was written once, at step 1, and referenced since
    m4 = read_manifest(LocalStorage(), os.path.join(root, steps[1]))
    (big,) = m4.tensors["big"].chunks
    assert [parse_object(p.name)[1] for p in big.parts or ()] == [1, 1]  # type: ignore[index]
    assert all(parse_object(p.name)[1] == 4 for c in m4.tensors["w.a"].chunks for p in c.parts or ())  # type: ignore[index]
    state = {
        "w": {"a": torch.zeros(16, 4), "b": torch.zeros(8, 6)},
        "rep": torch.zeros(100),
        "extra": {"step": 0},
        "big": torch.zeros(1 << 21),
    }
    assert resume(root, state) == 4
    assert torch.equal(state["w"]["a"], full("a", 4)) and torch.equal(state["w"]["b"], full("b", 1))
    assert torch.equal(state["big"], torch.arange(float(1 << 21)))
