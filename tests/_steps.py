"""Real committed steps for the stage tests, made with the commit stage itself."""

from __future__ import annotations

import torch

from asyncckpt import layout
from asyncckpt.commit import write_and_commit
from asyncckpt.handle import CheckpointInfo
from asyncckpt.layout import Kind
from asyncckpt.request import SaveRequest
from asyncckpt.staging import StagingPlan, StagingPool, copy_into
from asyncckpt.state import flatten_state
from asyncckpt.storage import LocalStorage, Storage


def commit_info(
    root: str,
    step: int,
    kind: Kind = Kind.PERMANENT,
    metrics: dict | None = None,
    storage: Storage | None = None,
) -> CheckpointInfo:
    """Commit a small real step (one tensor and a plain value) under ``root``."""
    flat = flatten_state({"w": torch.full((3,), float(step)), "n": step})
    plan = StagingPlan.from_tensors(flat.tensors, flat.signature())
    pool = StagingPool(plan, 1)
    try:
        copy_into(pool.views(0), flat.tensors)
        req = SaveRequest(
            root=layout.kind_root(root, kind),
            step=step,
            kind=kind,
            tree=flat.tree,
            paths=flat.paths,
            metrics=metrics or {},
        )
        out = write_and_commit(storage or LocalStorage(), req, plan.entries, plan.files, pool.buffer(0), None)
    finally:
        pool.close()
    return out.info


def commit_step(root: str, step: int, kind: Kind = Kind.PERMANENT, metrics: dict | None = None) -> str:
    """``commit_info`` on local storage; returns the step's directory."""
    return commit_info(root, step, kind, metrics).path
