"""Read a committed checkpoint into a fresh Python tree, with no live state to load into.

Frameworks such as Lightning expect ``load_checkpoint(path) -> dict``: the objects to load
into are built later, from the dict.  This reads the manifest (validated, self-checksummed),
every tensor straight from its shard chunks (crc-checked, nothing unpickled) and rebuilds
the saved structure: dicts (with their int keys), lists, tuples, tensors, numpy arrays and
plain JSON values.  A Stateful object comes back as its state dict.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, BinaryIO

from .. import layout
from ..catalog import normalize_root, read_manifest, step_dirs
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..export import read_tensor
from ..layout import Kind
from ..step_files import file_problems, shard_files
from ..storage import Storage, storage_for

__all__ = ["locate", "read_tree", "read_plain"]


def locate(path: str | os.PathLike[str]) -> tuple[str, int | None]:
    """``(root, step)`` for a checkpoint root (step None: the newest) or one committed step dir."""
    p = normalize_root(path)
    root, name = layout.parent(p)
    step = layout.parse_step(name)
    if step is not None:
        storage = storage_for(p)
        st = storage.stat(layout.join(p, layout.MANIFEST))
        if st is not None and st.kind == "file":
            if os.path.basename(root) == layout.SNAPSHOT_DIR:
                root = layout.parent(root)[0]
            return root, step
    return p, None


def _step_dir(storage: Storage, root: str, step: int | None) -> tuple[int, str]:
    dirs = [(s, path) for s, kind, path in step_dirs(storage, root) if kind is Kind.PERMANENT]
    if step is None:
        for s, path in reversed(dirs):
            st = storage.stat(layout.join(path, layout.MANIFEST))
            if st is not None and st.kind == "file":
                return s, path
        raise CheckpointNotFoundError(f"{root} holds no committed checkpoint")
    for s, path in dirs:
        if s == step:
            return s, path
    have = ", ".join(str(s) for s, _ in dirs[-5:]) or "none"
    raise CheckpointNotFoundError(
        f"step {step} is not committed under {root} (the run may have stopped while it was being "
        f"written, or retention deleted it); newest steps there: {have}"
    )


def read_tree(root: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """The saved state of ``step`` (None: the newest) under ``root`` as a fresh dict.

    Raises:
        CheckpointNotFoundError: there is no such committed step.
        CorruptCheckpointError: a manifest, size or checksum check failed.
    """
    root = normalize_root(root)
    storage = storage_for(root)
    s, path = _step_dir(storage, root, step)
    m = read_manifest(storage, path)
    if m.step != s:
        raise CorruptCheckpointError(f"{path}: manifest says step {m.step}, directory says {s}")
    problems = file_problems(storage, path, m, shard_files(m))
    if problems:
        raise CorruptCheckpointError("; ".join(problems))
    with contextlib.ExitStack() as stack:
        handles: dict[str, BinaryIO] = {}

        def open_file(name: str) -> BinaryIO:
            if name not in handles:
                handles[name] = stack.enter_context(storage.open_read(layout.join(path, name)))
            return handles[name]

        tensors = {fqn: read_tensor(open_file, fqn, e, path) for fqn, e in m.tensors.items()}
    return s, {k: _decode(node, tensors) for k, node in m.state.items()}


def _decode(node: dict[str, Any], tensors: dict[str, Any]) -> Any:
    kind = node["t"]
    if kind == "tensor":
        return tensors[node["fqn"]]
    if kind == "ndarray":
        return tensors[node["fqn"]].numpy()
    if kind == "value":
        return node["v"]
    if kind == "object":
        return _decode(node["sd"], tensors)
    if kind == "dict":
        return {k: _decode(c, tensors) for k, c in node["items"]}
    if kind in ("list", "tuple"):
        items = [_decode(c, tensors) for c in node["items"]]
        return tuple(items) if kind == "tuple" else items
    raise CorruptCheckpointError(f"unknown node kind {kind!r} in the saved state tree")


def read_plain(root: str, step: int, key: str | None) -> Any:
    """The saved plain values under top-level ``key`` (tensors left out), from the manifest
    alone; with ``key`` None, the top-level keys the step holds."""
    storage = storage_for(normalize_root(root))
    _, path = _step_dir(storage, normalize_root(root), step)
    m = read_manifest(storage, path)
    if key is None:
        return list(m.state)
    if key not in m.state:
        raise CheckpointNotFoundError(f"{path} holds no {key!r} entry (it has {sorted(m.state)})")
    return _decode(m.state[key], _NoTensors())


class _NoTensors(dict):  # type: ignore[type-arg]
    def __missing__(self, fqn: str) -> None:
        raise CorruptCheckpointError(f"expected only plain values, found tensor {fqn}")
