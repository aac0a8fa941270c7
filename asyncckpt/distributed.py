"""Many ranks: planning on the trainer thread, coordination through storage.

The background writers run no collectives.  (NCCL collectives issued from a background
thread hang, pytorch#115861, and a writer process has no process group at all.)  The only
collectives asyncckpt issues run on the trainer thread, inside calls every rank makes
together:

- at construction: agree on a run id (names the shared temp directory of each step);
- when the state's structure changes (the first save, or an optimizer growing state):
  exchange the chunk list once, so each stored chunk is written by exactly one rank;
- in ``resume``: agree on the newest step that every rank can load.

A save then commits through storage alone: every rank writes its shards and then a small
done record, and rank 0's writer waits for all done records (with a timeout naming the
missing ranks) and writes the manifest.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "current", "is_dtensor", "agree_run_id", "broadcast", "local_chunk", "assign_writers", "all_gather"
]  # fmt: skip


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the default process group."""

    rank: int
    world_size: int

    @property
    def coordinator(self) -> bool:
        return self.rank == 0


def current() -> DistInfo | None:
    """The default group's rank and size, or None when not distributed (or world size 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return DistInfo(dist.get_rank(), world) if world > 1 else None


def all_gather(obj: Any) -> list[Any]:
    """``all_gather_object`` on the default group (trainer thread only)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree_run_id() -> str:
    """Rank 0's random id, known to every rank."""
    return str(broadcast(uuid.uuid4().hex[:16]))


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (trainer thread only)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local_chunk(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, offsets of it in the global tensor, global shape) of a tensor or DTensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        DTensor = ()  # type: ignore[assignment,misc]
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(int(o) for o in offsets), tuple(t.shape)
    return t, (0,) * t.dim(), tuple(t.shape)


def assign_writers(chunks: dict[str, tuple[tuple[int, ...], int]], info: DistInfo) -> set[str]:
    """Which of this rank's chunks it writes: every stored chunk exactly once, balanced.

    ``chunks`` maps fqn -> (chunk offsets, bytes) for this rank.  Replicated tensors (DDP,
    or plain tensors present on every rank) appear on several ranks with the same offsets;
    each goes to the holder with the fewest bytes assigned so far, deterministically, so
    every rank computes the same assignment from the same gathered lists.
    """
    everyone = all_gather(sorted((fqn, off, n) for fqn, (off, n) in chunks.items()))
    holders: dict[tuple[str, tuple[int, ...]], tuple[int, list[int]]] = {}
    for rank, items in enumerate(everyone):
        for fqn, off, n in items:
            key = (fqn, tuple(off))
            size, ranks = holders.setdefault(key, (n, []))
            ranks.append(rank)
    load = [0] * info.world_size
    mine: set[str] = set()
    for (fqn, _), (n, ranks) in sorted(holders.items(), key=lambda kv: (-kv[1][0], kv[0])):
        rank = min(ranks, key=lambda r: (load[r], r))
        load[rank] += n
        if rank == info.rank:
            mine.add(fqn)
    return mine
