"""The checkpointing methods a trainer could use, behind one small interface.

Each adapter saves a flat ``{name: tensor}`` state the way that library's users do:

- ``save(step)`` is the call in the training loop: it returns when training may go on, and
  returns False when the library skipped the save.  What it does while an earlier write is
  still running is the library's ``behaviour``: ``block`` (wait for it), ``queue`` (take
  another copy and line it up) or ``skip``;
- ``durable()`` is the newest step whose write has finished;
- ``wait()`` waits for every write, ``close()`` releases threads and processes.

``dcp.async_save`` and torchsnapshot return a future and leave the policy to the caller: the
adapters wait for the previous save before starting the next, as torchtitan does.  Lightning's
``AsyncCheckpointIO`` clones every tensor on the caller's thread and queues the write on a
one-thread pool with no bound.  ``torch.save`` does not fsync: its ``wait()`` does, so the time
until durable is charged for it while the stall is what its users see.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from asyncckpt import AsyncCheckpointer


class Saver:
    behaviour = "block"

    def __init__(self, state: dict[str, torch.Tensor], root: str) -> None:
        self.state = state
        self.root = root
        self.pending: list[tuple[int, Any]] = []  # (step, future with done() and result())
        self.newest: int | None = None

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"s{step}")

    def save(self, step: int) -> bool:
        raise NotImplementedError

    def durable(self) -> int | None:
        while self.pending and self.pending[0][1].done():
            step, fut = self.pending.pop(0)
            fut.result()  # raise a failed write
            self.newest = step
        return self.newest

    def wait(self) -> None:
        for _, fut in self.pending:
            fut.result()
        self.durable()

    def discard(self, step: int) -> None:
        """Remove a finished checkpoint (untimed, keeps the disk from filling up)."""
        p = self.path(step)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)

    def close(self) -> None:
        self.wait()


class _Done:
    """A future for a synchronous save."""

    def done(self) -> bool:
        return True

    def result(self) -> None:
        return None


class TorchSave(Saver):
    def __init__(self, state: dict[str, torch.Tensor], root: str) -> None:
        super().__init__(state, root)
        self._unsynced: list[str] = []

    def save(self, step: int) -> bool:
        torch.save(self.state, self.path(step))
        self._unsynced.append(self.path(step))
        self.pending.append((step, _Done()))
        return True

    def wait(self) -> None:
        for p in self._unsynced:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced.clear()
        super().wait()


class DcpSave(Saver):
    def save(self, step: int) -> bool:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state, checkpoint_id=self.path(step), no_dist=True)
        self.pending.append((step, _Done()))
        return True


class DcpAsync(Saver):
    """``dcp.async_save``: thread or process mode, optionally with one reused stager."""

    def __init__(
        self, state: dict[str, torch.Tensor], root: str, *, process: bool = False, reuse_stager: bool = False
    ) -> None:
        super().__init__(state, root)
        self.process = process
        self.stager = None
        if process:
            import torch.distributed as dist

            # process mode needs a default group; a one-rank gloo group on a file store
            if not dist.is_initialized():
                store = os.path.join(root, ".pg_store")
                dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        if reuse_stager:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = any(t.is_cuda for t in state.values())
            self.stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=process,
                    use_async_staging=False,
                    use_non_blocking_copy=cuda,
                )
            )

    def save(self, step: int) -> bool:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        if self.pending:  # the caller's job: one save in flight at a time
            self.pending[-1][1].result()
        kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        resp = dcp.async_save(
            self.state,
            checkpoint_id=self.path(step),
            no_dist=not self.process,
            async_checkpointer_type=kind,
            async_stager=self.stager,
        )
        self.pending.append((step, getattr(resp, "upload_completion", None) or resp))
        return True

    def close(self) -> None:
        super().close()
        if self.stager is not None:
            self.stager.close()


class LightningAsync(Saver):
    behaviour = "queue"

    def __init__(self, state: dict[str, torch.Tensor], root: str) -> None:
        super().__init__(state, root)
        from pytorch_lightning.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        done: list[int] = []

        class Tracking(TorchCheckpointIO):
            def save_checkpoint(
                self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
            ) -> None:
                super().save_checkpoint(checkpoint, path, storage_options)
                done.append(checkpoint["step"])

        self._done = done
        self.io = AsyncCheckpointIO(Tracking())

    def save(self, step: int) -> bool:
        self.io.save_checkpoint({"step": step, "state_dict": self.state}, self.path(step))
        return True

    def durable(self) -> int | None:
        if self._done:
            self.newest = self._done[-1]
        return self.newest

    def wait(self) -> None:
        self.io.teardown()  # joins the pool; the next save starts a new one
        self.durable()


class TorchSnapshot(Saver):
    def __init__(self, state: dict[str, torch.Tensor], root: str) -> None:
        super().__init__(state, root)
        from torchsnapshot import StateDict

        self.app = {"model": StateDict(**state)}

    def save(self, step: int) -> bool:
        from torchsnapshot import Snapshot

        if self.pending:
            self.pending[-1][1].wait()
        pending = Snapshot.async_take(self.path(step), self.app)
        pending.result = pending.wait  # type: ignore[attr-defined]
        self.pending.append((step, pending))
        return True


class Asyncckpt(Saver):
    def __init__(self, state: dict[str, torch.Tensor], root: str, **options: Any) -> None:
        super().__init__(state, root)
        # no retention: deleting the old step would be timed here and untimed for the others
        self.ck = AsyncCheckpointer(root, state={"model": state}, **options)
        self.behaviour = "skip" if options.get("on_busy") == "skip" else "block"
        if options.get("max_inflight", 1) > 1:
            self.behaviour = f"queue ({options['max_inflight']} buffers), then block"

    def save(self, step: int) -> bool:
        h = self.ck.save_async(step)
        if h is None:
            return False
        self.pending.append((step, h))
        return True

    def wait(self) -> None:
        self.ck.wait_staged()
        super().wait()

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:09d}")

    def close(self) -> None:
        self.ck.close()


class Floor(Saver):
    """No library: ``copy_`` of every tensor into host buffers that are already allocated and
    touched (pinned on CUDA).  A snapshot cannot be taken faster."""

    def __init__(self, state: dict[str, torch.Tensor], root: str) -> None:
        super().__init__(state, root)
        pin = any(t.is_cuda for t in state.values())
        self.dst = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).zero_() for k, t in state.items()}

    def save(self, step: int) -> bool:
        with torch.no_grad():
            for k, t in self.state.items():
                self.dst[k].copy_(t, non_blocking=True)
        if any(t.is_cuda for t in self.state.values()):
            torch.cuda.synchronize()
        self.pending.append((step, _Done()))
        return True


Factory = Callable[[dict[str, torch.Tensor], str], Saver]

# name -> factory.  The alternatives first, asyncckpt's configurations last.
ALTERNATIVES: dict[str, Factory] = {
    "torch.save": TorchSave,
    "dcp.save": DcpSave,
    "dcp.async_save (thread)": DcpAsync,
    "dcp.async_save (process)": lambda s, r: DcpAsync(s, r, process=True),
    "dcp.async_save + reused stager": lambda s, r: DcpAsync(s, r, reuse_stager=True),
    "Lightning AsyncCheckpointIO": LightningAsync,
    "torchsnapshot": TorchSnapshot,
}
ASYNCCKPT: dict[str, Factory] = {
    "asyncckpt": Asyncckpt,
    "asyncckpt (process)": lambda s, r: Asyncckpt(s, r, executor="process"),
    "asyncckpt (overlap)": lambda s, r: Asyncckpt(s, r, overlap=True),
}
# what a trainer can ask for when the write is slower than the save interval
ASYNCCKPT_BUSY: dict[str, Factory] = {
    "asyncckpt (skip)": lambda s, r: Asyncckpt(s, r, on_busy="skip"),
    "asyncckpt (queue 2)": lambda s, r: Asyncckpt(s, r, max_inflight=2),
}
FLOOR = "floor (copy_ into touched buffers)"
LIBRARIES: dict[str, Factory] = {**ALTERNATIVES, **ASYNCCKPT, **ASYNCCKPT_BUSY, FLOOR: Floor}


def available(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    try:
        if name == "Lightning AsyncCheckpointIO":
            import pytorch_lightning  # noqa: F401
        elif name == "torchsnapshot":
            import torchsnapshot  # noqa: F401
    except ImportError as e:
        return f"not installed ({e.name}); pip install -e '.[bench]'"
    return None
