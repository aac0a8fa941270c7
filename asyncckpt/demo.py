"""``asyncckpt demo``: train, crash mid-save, resume bit-exactly, and show the stall saved.

The parent process runs a training child that saves asynchronously every K steps, SIGKILLs
it the moment a save is in flight, resumes from the newest committed checkpoint, checks the
resumed state byte for byte against a digest the child recorded when it saved that step,
finishes training, and prints how long the trainer stalled per save compared with a
synchronous ``torch.save`` of the same state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from .checkpointer import AsyncCheckpointer
from .options import WriterOptions
from .state import flatten_state


class TinyGPT(nn.Module):
    """A small decoder-only transformer; big enough that a save takes visible time."""

    def __init__(
        self, vocab: int = 4096, dim: int = 256, layers: int = 4, heads: int = 4, seq: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        block = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.mask: torch.Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


def _setup(seed: int = 0) -> tuple[TinyGPT, torch.optim.Optimizer, Any, dict[str, Any]]:
    torch.manual_seed(seed)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    state = {"model": model, "optim": opt, "sched": sched, "extra": {"step": 0, "rng": torch.get_rng_state()}}
    return model, opt, sched, state


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)  # data depends only on the step: resumable
    return torch.randint(0, 4096, (8, 65), generator=g)


def _train_step(model: TinyGPT, opt: torch.optim.Optimizer, sched: Any, step: int) -> float:
    data = _batch(step)
    logits = model(data[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach().item()


def state_digest(state: dict[str, Any]) -> str:
    """sha256 over every tensor's bytes (by name) and the plain values."""
    flat = flatten_state(state)
    h = hashlib.sha256()
    for name in sorted(flat.tensors):
        t = flat.tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(list(t.shape)).encode())
        if t.numel():
            h.update(
                t.view(-1).view(torch.uint8).numpy().tobytes()
                if _has_numpy()
                else bytes(t.view(-1).view(torch.uint8).tolist())
            )
    h.update(json.dumps(flat.tree, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401

        return True
    except ImportError:
        return False


def _child(root: str, digests: str, steps: int, every: int) -> None:
    """The training process that gets killed: saves every ``every`` steps, forever announcing."""
    model, opt, sched, state = _setup()
    # the writer is capped at 100 MB/s (WriterOptions.max_bandwidth) so that each save takes
    # long enough for the kill to land while it is in flight; uncapped it can finish first
    with AsyncCheckpointer(root, state, writer=WriterOptions(max_bandwidth=100e6)) as ckpt:
        for step in range(1, steps + 1):
            loss = _train_step(model, opt, sched, step)
            state["extra"]["step"] = step
            state["extra"]["rng"] = torch.get_rng_state()
            if step % every == 0:
                h = ckpt.save_async(step, metrics={"loss": loss})
                with open(digests, "a") as f:
                    f.write(json.dumps({"step": step, "digest": state_digest(state)}) + "\n")
                stall = ckpt.stats()[-1]["stall_s"]
                print(
                    f"SAVED {step} {loss!r} {stall * 1e3:.2f} {int(h is not None and h.done())}", flush=True
                )


def _run_child(
    root: str, digests: str, steps: int, every: int, kill_at: int
) -> tuple[int, bool, dict[int, float]]:
    """Run the child until its save of ``kill_at`` is in flight, then SIGKILL it."""
    cmd = [sys.executable, "-m", "asyncckpt", "demo", "--_child", root, digests, str(steps), str(every)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    killed_step, was_done = -1, False
    losses: dict[int, float] = {}
    assert child.stdout is not None
    for line in child.stdout:
        parts = line.split()
        if not parts or parts[0] != "SAVED":
            continue
        step, loss, stall, done = int(parts[1]), float(parts[2]), float(parts[3]), parts[4] == "1"
        if step >= kill_at:
            child.send_signal(signal.SIGKILL)
            killed_step, was_done = step, done
            losses[step] = loss
            print(
                f"  step {step:4d}  loss {loss:.3f}  save queued ({stall:.1f} ms stall)  <- SIGKILL while it is in flight"
            )
            break
        print(f"  step {step:4d}  loss {loss:.3f}  saved asynchronously, trainer stalled {stall:.1f} ms")
    child.wait()
    return killed_step, was_done, losses


def _sync_save_stall(state: dict[str, Any], directory: str, reps: int = 3) -> float:
    times = []
    for i in range(reps):
        path = os.path.join(directory, f"sync_{i}.pt")
        sd = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
        t = time.perf_counter()
        torch.save(sd, path)
        times.append(time.perf_counter() - t)
        os.remove(path)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asyncckpt demo", description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="./checkpoints", help="where checkpoints go (default ./checkpoints)")
    p.add_argument("--steps", type=int, default=60, help="total training steps")
    p.add_argument("--every", type=int, default=10, help="save every N steps")
    p.add_argument(
        "--kill-at", type=int, default=40, help="SIGKILL the trainer while this step's save is in flight"
    )
    p.add_argument("--keep", action="store_true", help="keep checkpoints from an earlier demo run")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        root, digests, steps, every = a._child
        _child(root, digests, int(steps), int(every))
        return 0
    if not (0 < a.every <= a.kill_at < a.steps):
        p.error("need 0 < --every <= --kill-at < --steps")
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    base = os.path.abspath(a.dir)
    root = os.path.join(base, "run")
    digests = os.path.join(base, "digests.jsonl")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base, exist_ok=True)
    nparams = sum(p.numel() for p in TinyGPT().parameters())
    print(
        f"asyncckpt demo: a {nparams / 1e6:.1f}M-parameter transformer, AdamW, saving every {a.every} steps to {root}"
    )

    print(
        f"\n[1/3] training in a child process; it will be killed while the step-{a.kill_at} save is in flight\n"
        "      (its writer is capped at 100 MB/s, so that a save is still in flight when the kill lands)"
    )
    killed, was_done, child_losses = _run_child(root, digests, a.steps, a.every, a.kill_at)
    if killed < 0:
        print("the child exited before the kill point; see its output above")
        return 1

    print("\n[2/3] a fresh process resumes from the newest committed checkpoint")
    model, opt, sched, state = _setup(seed=123)  # different init: resume must overwrite it all
    recorded = {}
    with open(digests) as f:
        for line in f:
            d = json.loads(line)
            recorded[d["step"]] = d["digest"]
    with AsyncCheckpointer(root, state) as ckpt:
        t = time.perf_counter()
        start = ckpt.resume()
        load_s = time.perf_counter() - t
        if start is None:
            print("no committed checkpoint found")
            return 1
        status = (
            "committed before the kill landed"
            if start == killed
            else "never committed: its temp files are ignored"
        )
        print(f"  the step-{killed} save {status}")
        ok = state_digest(state) == recorded[start]
        print(
            f"  resumed at step {start} in {load_s:.2f}s; state matches what the trainer saved at step {start}: {'bit-exact' if ok else 'MISMATCH'}"
        )
        if not ok:
            return 1
        torch.set_rng_state(state["extra"]["rng"])
        print(f"\n[3/3] finishing training from step {start + 1} to {a.steps}")
        for step in range(start + 1, a.steps + 1):
            loss = _train_step(model, opt, sched, step)
            state["extra"]["step"] = step
            state["extra"]["rng"] = torch.get_rng_state()
            if step == killed:
                same = "identical to" if loss == child_losses[killed] else "DIFFERENT from"
                print(
                    f"  step {step:4d}  loss {loss:.6f}, {same} the killed run's step {killed}: training continues exactly"
                )
                if loss != child_losses[killed]:
                    return 1
            if step % a.every == 0 or step == a.steps:
                ckpt.save_async(step, metrics={"loss": loss})
                print(
                    f"  step {step:4d}  loss {loss:.3f}  saved asynchronously, trainer stalled {ckpt.stats()[-1]['stall_s'] * 1e3:.1f} ms"
                )
        ckpt.wait()
        stats = [s for s in ckpt.stats() if "write_s" in s]

    sync = _sync_save_stall(state, base)
    stall = statistics.median(s["stall_s"] for s in stats)
    nbytes = statistics.median(s["bytes_written"] for s in stats)
    tput = statistics.median(s["throughput_Bps"] for s in stats)
    print("\nper save (medians, this machine)")
    print(f"  {'stall, asyncckpt save_async':38s} {stall * 1e3:9.1f} ms")
    print(f"  {'stall, synchronous torch.save':38s} {sync * 1e3:9.1f} ms   ({sync / stall:.0f}x longer)")
    print(f"  {'bytes per save':38s} {nbytes / 2**20:9.1f} MiB")
    print(f"  {'background write throughput':38s} {tput / 2**20:9.1f} MiB/s (fsynced)")
    print(f"\ncheckpoints are in {root}; from Python: asyncckpt.list_checkpoints({root!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
