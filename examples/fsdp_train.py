"""FSDP2 training with asyncckpt on CPU: save, crash, resume on a different world size.

Run it twice; the second run resumes from the first run's newest committed checkpoint:

    torchrun --nproc-per-node 2 examples/fsdp_train.py --crash-at 17   # 2 ranks; killed mid-save
    torchrun --nproc-per-node 1 examples/fsdp_train.py                 # 1 rank; resumes, finishes

Each rank stages and writes only its own FSDP2 shards, rank 0 commits the manifest once every
rank's shards are durable, and ``resume`` reshards through DCP onto the new world size.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from asyncckpt import AsyncCheckpointer, WriterOptions


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)  # the data depends only on the step
    x = torch.randn(32, 16, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="./checkpoints/fsdp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument(
        "--crash-at", type=int, default=None, help="SIGKILL every rank right after this step's save"
    )
    a = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optim": opt, "extra": {"step": 0}}

    ckpt = AsyncCheckpointer(a.root, state, schedule=a.every, keep=3, writer=WriterOptions(commit_timeout=120))
    start = ckpt.resume() or 0
    if rank == 0:
        print(f"world size {world}: starting at step {start}", flush=True)
    for step in range(start + 1, a.steps + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["extra"]["step"] = step
        h = ckpt.save_async(step, metrics={"loss": loss.item()})
        if rank == 0 and h is not None:
            print(f"step {step:3d}  loss {loss.item():.4f}  save queued", flush=True)
        if step == a.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash while the save is in flight
    ckpt.close()
    if rank == 0:
        print(f"finished at step {a.steps}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
