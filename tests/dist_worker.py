"""Worker processes for tests/test_distributed.py: ``python -m tests.dist_worker NAME RANK WORLD STORE ...``.

Each scenario initialises a gloo group through a FileStore (no TCP port), runs, and exits 0
on success; assertion failures exit nonzero with the traceback on stderr.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from asyncckpt import AsyncCheckpointer, WriteError, list_checkpoints


def full(name: str, step: int) -> torch.Tensor:
    """The global value of tensor ``name`` at ``step``: deterministic, so every rank knows it."""
    base = {"a": torch.arange(64.0).reshape(16, 4), "b": torch.arange(48.0).reshape(8, 6) * -1}[name]
    return base + step * 1000


def replicated(step: int) -> torch.Tensor:
    return torch.linspace(0, 1, 100) + step


def sharded_state(world: int, step: int, zero: bool = False) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = {}
    for name in ("a", "b"):
        t = torch.zeros_like(full(name, step)) if zero else full(name, step)
        w[name] = distribute_tensor(t, mesh, [Shard(0)])
    rep = torch.zeros(100) if zero else replicated(step)
    return {"w": w, "rep": rep, "extra": {"step": 0 if zero else step}}


def check_sharded(state: dict, step: int) -> None:
    for name, d in state["w"].items():
        assert torch.equal(d.full_tensor(), full(name, step)), name
    assert torch.equal(state["rep"], replicated(step))
    assert state["extra"]["step"] == step


def main() -> None:
    name, rank, world, store = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    args = sys.argv[5:]
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    root = args[0]

    if name == "save_sharded":  # root, step[, executor]
        step = int(args[1])
        executor = args[2] if len(args) > 2 else "thread"
        state = sharded_state(world, step)
        with AsyncCheckpointer(root, state, executor=executor, commit_timeout=60) as ck:
            info = ck.save_async(step).result()
        assert info.world_size == world, info

    elif name == "save_incremental":  # root, steps: differential saves where only w.a changes
        from asyncckpt import WriterOptions
        from asyncckpt.policy import KeepLast

        state = sharded_state(world, 1)
        state["big"] = torch.arange(float(1 << 21))  # replicated, 8 MiB: two parts, never changing
        with AsyncCheckpointer(
            root, state, keep=KeepLast(2), writer=WriterOptions(incremental=True, commit_timeout=60)
        ) as ck:
            for step in range(1, int(args[1]) + 1):
                local = full("a", step).chunk(world)[rank]
                state["w"]["a"].to_local().copy_(local)
                ck.save_async(step, force=True).result()

    elif name == "load_sharded":  # root, expected step
        state = sharded_state(world, 0, zero=True)
        with AsyncCheckpointer(root, state) as ck:
            assert ck.resume() == int(args[1])
        check_sharded(state, int(args[1]))

    elif name == "save_replicated":  # DDP-like: identical plain tensors on every rank
        step = int(args[1])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)
        state = {"model": model}
        with AsyncCheckpointer(root, state, commit_timeout=60) as ck:
            ck.save_async(step).result()

    elif name == "kill_rank1_midsave":  # root: step 1 commits, then rank 1 dies during step 2
        state = sharded_state(world, 1)
        ck = AsyncCheckpointer(root, state, commit_timeout=4)
        ck.save_async(1).result()
        h = ck.save_async(2)
        if rank == 1:
            os._exit(17)  # dies before its done record can exist
        try:
            h.result(timeout=60)
        except WriteError as e:
            assert "ranks [1] did not finish" in str(e) or "rank 0 did not commit" in str(e), e
            print("CLEAR ERROR:", e, flush=True)
        else:
            raise AssertionError("step 2 committed without rank 1")
        assert [c.step for c in list_checkpoints(root)] == [1]
        os._exit(0)  # the group has a dead member: skip collective teardown

    elif name == "kill_coordinator_before_manifest":  # root
        from asyncckpt.storage import LocalStorage

        class Dying(LocalStorage):
            def open_write(self, path: str):
                if rank == 0 and path.endswith("manifest.json") and "step_000000002" in path:
                    os._exit(19)  # every shard and done record is durable; no manifest yet
                return super().open_write(path)

        state = sharded_state(world, 1)
        ck = AsyncCheckpointer(root, state, commit_timeout=4, storage=Dying())
        ck.save_async(1).result()
        h = ck.save_async(2)
        try:
            h.result(timeout=60)
        except WriteError as e:
            assert "rank 0 did not commit" in str(e), e
            print("CLEAR ERROR:", e, flush=True)
        os._exit(0)
    elif name == "save_local_tier":  # remote root, local_dir, executor: steps 1..3, keep 2
        local_dir, executor = args[1], args[2]
        for step in (1, 2, 3):
            state = sharded_state(world, step)
            if step == 1:
                ck = AsyncCheckpointer(
                    root, state, local_dir=local_dir, keep=2, executor=executor, commit_timeout=60
                )
            else:
                ck.state = state
            h = ck.save_async(step)
            local = h.result(timeout=60)  # this rank's part is on its local disk
            assert local.path.startswith(os.path.join(local_dir, f"rank{rank:05d}")), local.path
            remote = h.uploaded.result(timeout=60)  # every rank's part is on the remote: committed
            assert remote.world_size == world and remote.path.startswith(root), remote
        ck.close()
        assert [c.step for c in list_checkpoints(root)] == [2, 3]
        mine = list_checkpoints(os.path.join(local_dir, f"rank{rank:05d}"))
        assert [(c.step, c.upload) for c in mine] == [(2, "uploaded"), (3, "uploaded")], mine
        state = sharded_state(world, 0, zero=True)
        with AsyncCheckpointer(root, state, local_dir=local_dir) as ck2:
            assert ck2.resume() == 3  # from the remote root: a local piece alone is not loadable
        check_sharded(state, 3)

    elif name == "local_tier_rank_dies":  # remote root, local_dir: rank 1 dies before its record
        from asyncckpt.storage import LocalStorage

        class Dying(LocalStorage):
            def open_write(self, path: str):
                if rank == 1 and "step_000000002" in path and path.endswith(".done.json.part"):
                    os._exit(23)  # its shards are uploaded; its done record never appears
                return super().open_write(path)

        state = sharded_state(world, 1)
        ck = AsyncCheckpointer(root, state, local_dir=args[1], commit_timeout=4, storage=Dying())
        ck.save_async(1).uploaded.result(timeout=60)
        h = ck.save_async(2)
        h.result(timeout=60)  # committed locally on every rank
        try:
            h.uploaded.result(timeout=60)
        except Exception as e:
            assert "ranks [1] did not finish" in str(e), e
            print("CLEAR ERROR:", e, flush=True)
        else:
            raise AssertionError("step 2 committed on the remote without rank 1")
        assert [c.step for c in list_checkpoints(root)] == [1]
        os._exit(0)
    else:
        raise SystemExit(f"unknown scenario {name}")
    print("SCENARIO OK", flush=True)
    if world > 1:
        # Every check above passed.  Leave without interpreter teardown: under load, gloo's
        # teardown at exit rarely aborted a rank ("terminate called without an active
        # exception", SIGABRT) after a passing scenario, which is not what these tests test.
        dist.barrier()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
