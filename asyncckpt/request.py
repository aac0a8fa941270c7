"""What crosses from the trainer to a writer and back: small, typed and picklable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .handle import CheckpointInfo
from .layout import Kind

__all__ = ["SaveRequest", "SaveOutcome"]


@dataclass(frozen=True)
class SaveRequest:
    """One step to write and commit; the bytes stay in the staging slot (the lease).

    Attributes:
        root: the kind root the step commits under (``ROOT`` or ``ROOT/snapshots``).
        step: the step.
        kind: permanent or snapshot.
        tree: the state's structure with plain values (JSON), recorded in the manifest.
        paths: DCP planner paths of the tensors, for the stock ``.metadata``.
        metrics: JSON metrics recorded in the manifest.
        rank, world_size: this process's place; a step of several ranks commits once every
            rank's done record is there.
        chunk_offsets, global_shapes: several ranks: where each staged tensor sits in its
            global tensor.
        run_id: agreed by the ranks at construction; a crashed run's records never join ours.
        commit_timeout: how long ranks wait for each other.
        remote: with a local-first tier, the remote step this local step uploads to.
        library_version: recorded in the manifest.
        selection: what a selective save covers, recorded in the manifest.
        epoch: differential saves: bumped by every resume; a writer drops its parent (the
            step it deduplicates against) when it changes.
    """

    root: str
    step: int
    kind: Kind
    tree: dict[str, Any]
    paths: dict[str, tuple[str | int, ...]]
    metrics: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    chunk_offsets: dict[str, tuple[int, ...]] = field(default_factory=dict)
    global_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    run_id: str = ""
    commit_timeout: float = 600.0
    remote: str | None = None
    library_version: str = ""
    selection: dict[str, Any] | None = None  # recorded in the manifest (load_plan.py)
    epoch: int = 0


@dataclass(frozen=True)
class SaveOutcome:
    """What a committed step produced."""

    info: CheckpointInfo
    bytes_written: int
    write_seconds: float
    commit_seconds: float
    queue_wait_s: float = 0.0  # from submit until the writer started on it
    objects: frozenset[str] = frozenset()  # a differential step: the chunk-store objects it references
