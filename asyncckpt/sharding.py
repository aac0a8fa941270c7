"""Which chunks this rank writes: its own shards of DTensors, and each replica exactly once.

The first time a state structure is seen, the ranks exchange their chunk lists (a
collective, on the trainer thread, in a call every rank makes) so each stored chunk has one
writer; the assignment is reused until the structure changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import distributed
from .distributed import DistInfo
from .state import FlatState

__all__ = ["Sharder", "Shard"]


@dataclass(frozen=True)
class Shard:
    """What this rank stages and writes, and where its chunks sit in the global tensors."""

    flat: FlatState
    chunk_offsets: dict[str, tuple[int, ...]] = field(default_factory=dict)
    global_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class Sharder:
    """Cuts the flat state down to this rank's part."""

    def __init__(self, dist: DistInfo | None) -> None:
        self.dist = dist
        self._assignment: tuple[object, set[str]] | None = None

    def local(self, flat: FlatState) -> Shard:
        """This rank's shard of ``flat``; a collective when the structure is new."""
        if self.dist is None and not any(distributed.is_dtensor(t) for t in flat.tensors.values()):
            return Shard(flat)
        local, offsets, shapes, sizes = {}, {}, {}, {}
        for fqn, t in flat.tensors.items():
            lt, off, gshape = distributed.local_chunk(t)
            local[fqn], offsets[fqn], shapes[fqn] = lt, off, gshape
            sizes[fqn] = (off, lt.numel() * lt.element_size())
        sig = flat.signature()
        if self.dist is None:  # one process (perhaps DTensors on a 1-rank mesh): it writes all
            self._assignment = (sig, set(flat.tensors))
        elif self._assignment is None or self._assignment[0] != sig:
            self._assignment = (sig, distributed.assign_writers(sizes, self.dist))
        mine = self._assignment[1]
        staged = FlatState(
            tensors={k: v for k, v in local.items() if k in mine},
            tree=flat.tree,
            paths={k: v for k, v in flat.paths.items() if k in mine},
        )
        return Shard(staged, {k: offsets[k] for k in mine}, {k: shapes[k] for k in mine})
