"""What exists under a root: committed steps, leftovers, upload state and protected steps.

Every question "what is here?" goes through this module.  A step exists only if its
``manifest.json`` parses and names its own step: no manifest, no checkpoint.  Listing never
deletes and never writes, except :func:`protect`, which records a step retention must keep.

:class:`Catalog` is one process's view of the root it writes: the committed steps it knows of
(listed at start, then added as they commit), which the scheduler asks before a save and the
pruner plans deletions from.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from . import layout
from .errors import CorruptCheckpointError, StorageError
from .handle import CheckpointInfo
from .layout import KINDS, Kind
from .manifest import MAX_MANIFEST_BYTES, Manifest
from .retention_policy import CheckpointRecord
from .storage import AtomicRename, Storage, exists, is_file, probe_file, storage_for

__all__ = [
    "Catalog",
    "normalize_root",
    "read_manifest",
    "step_dirs",
    "list_in",
    "list_checkpoints",
    "list_leftovers",
    "leftover_reason",
    "read_protected",
    "protect",
    "read_abandoned",
    "abandon",
    "unabandon",
]

log = logging.getLogger("asyncckpt")


def normalize_root(root: str | os.PathLike[str]) -> str:
    """A URL as is; a local path (or ``file://`` URL) made absolute."""
    r = os.fspath(root)
    if r.startswith("file://"):
        r = r[len("file://") :]
    return os.path.abspath(r) if "://" not in r else r.rstrip("/")


def read_manifest(storage: Storage, step_dir: str) -> Manifest:
    """The validated manifest of ``step_dir``.

    Raises:
        CorruptCheckpointError: it is missing, too large or invalid.
        StorageError: the storage could not answer (after retries); says nothing of the data.
    """
    path = layout.join(step_dir, layout.MANIFEST)
    st = probe_file(storage, path)
    if st is None or st.kind != "file":
        raise CorruptCheckpointError(f"{path} is missing: {step_dir} was never committed")
    if st.size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    return Manifest.from_json(storage.read_bytes(path), path)


def step_dirs(storage: Storage, root: str) -> list[tuple[int, Kind, str]]:
    """(step, kind, path) of every step directory, oldest first; at the same step the
    snapshot sorts first (so the permanent copy is the newer candidate).

    A symlinked step directory would load data from outside the root: it is never listed.
    """
    out = []
    top = storage.listdir(root)
    for kind in KINDS:
        base = layout.kind_root(root, kind)
        if base != root and base.rstrip("/").rsplit("/", 1)[-1] not in top:
            continue  # no snapshots/ (on an object store, listing a missing prefix costs two requests)
        for name in top if base == root else storage.listdir(base):
            step = layout.parse_step(name)
            if step is None:
                continue
            path = layout.join(base, name)
            if isinstance(storage, AtomicRename):  # object stores have no links
                st = storage.stat(path)
                if st is not None and st.kind == "link":  # gone meanwhile: list_in sees it vanish
                    continue
            out.append((step, kind, path))
    return sorted(out, key=lambda t: (t[0], t[1] == Kind.PERMANENT))


def _upload_state(storage: Storage, path: str, m: Manifest) -> str | None:
    if m.remote is None:
        return None
    return "uploaded" if is_file(storage, layout.join(path, layout.UPLOADED_MARKER)) else "pending"


def list_in(storage: Storage, root: str) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root`` (through an existing backend), oldest first.

    A step deleted while it is being listed is left out, and the listing is taken again, so
    a step committed meanwhile (retention deletes after a commit) is seen.  A storage error is
    raised, never taken for "not committed".
    """
    for _ in range(LIST_ROUNDS):
        out, vanished = _list_once(storage, root)
        if not vanished:
            break
    return out


LIST_ROUNDS = 10  # a root that a fast trainer prunes at every commit can lose one listing


def _list_once(storage: Storage, root: str) -> tuple[list[CheckpointInfo], bool]:
    abandoned = read_abandoned(storage, root)
    out, vanished = [], False
    for step, kind, path in step_dirs(storage, root):
        try:
            m = read_manifest(storage, path)
        except CorruptCheckpointError:
            if storage.stat(path) is None:
                vanished = True
            continue
        except StorageError as e:
            if e.errno == errno.ENOENT:  # deleted while we looked
                vanished = True
                continue
            raise
        if m.step == step:
            info = CheckpointInfo.from_manifest(m, path, kind, _upload_state(storage, path, m))
            out.append(dataclasses.replace(info, abandoned=True) if step in abandoned else info)
    return out, vanished


def list_checkpoints(
    root: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root``, oldest first.

    A directory counts only if its manifest parses and names its own step; files are not
    checksummed here (``asyncckpt verify`` does that).
    """
    r = normalize_root(root)
    return list_in(storage_for(r, storage_options), r)


def list_leftovers(
    root: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Uncommitted leftovers: temp directories and step directories without a valid manifest."""
    r = normalize_root(root)
    storage = storage_for(r, storage_options)
    return leftovers_in(storage, r)


def leftovers_in(storage: Storage, root: str) -> list[str]:
    """``list_leftovers`` through an existing backend."""
    out = []
    for kind in KINDS:
        tmp = layout.tmp_dir(layout.kind_root(root, kind))
        out += [layout.join(tmp, n) for n in storage.listdir(tmp)]
    committed = {c.path for c in list_in(storage, root)}
    out += [p for _, _, p in step_dirs(storage, root) if p not in committed]
    return out


def leftover_reason(storage: Storage, path: str) -> str:
    """Why ``path`` (one of :func:`leftovers_in`) is not a committed checkpoint."""
    parent, _ = layout.parent(path)
    if layout.parent(parent)[1] == layout.TMP_DIR:
        return "in-progress or abandoned save"
    st = probe_file(storage, layout.join(path, layout.MANIFEST))
    if st is None or st.kind != "file":
        return "no manifest: never committed"
    try:
        m = read_manifest(storage, path)
    except (CorruptCheckpointError, StorageError):
        return "invalid manifest"
    return f"manifest names step {m.step}"


# --------------------------------------------------------------------------- protected steps


def read_protected(storage: Storage, root: str) -> set[int]:
    """Steps recorded by :func:`protect` under ``root`` (one marker per step), and those of
    the 0.1 list file ``.protected.json``; unreadable records are ignored."""
    marked = {
        s
        for n in storage.listdir(layout.join(root, layout.PROTECTED_DIR))
        if (s := layout.parse_step(n)) is not None
    }
    path = layout.join(root, layout.PROTECTED_FILE)
    st = probe_file(storage, path)
    if st is None:
        return marked
    if st.kind != "file":  # a FIFO would block the read forever
        log.warning("asyncckpt: ignoring %s: not a regular file", path)
        return marked
    try:
        steps = json.loads(storage.read_bytes(path))
        return marked | {int(s) for s in steps if isinstance(s, int) and not isinstance(s, bool)}
    except (ValueError, TypeError, OSError) as e:
        log.warning("asyncckpt: ignoring unreadable %s (%s)", path, e)
        return marked


def protect(storage: Storage, root: str, steps: Iterable[int]) -> None:
    """Record ``steps`` as protected: one marker file each, so writers in several processes
    never lose each other's entries, and every prune sees them."""
    _mark(storage, layout.join(root, layout.PROTECTED_DIR), steps)


def read_abandoned(storage: Storage, root: str) -> set[int]:
    """Steps marked abandoned by a rollback (:func:`abandon`)."""
    names = storage.listdir(layout.join(root, layout.ABANDONED_DIR))
    return {s for n in names if (s := layout.parse_step(n)) is not None}


def abandon(storage: Storage, root: str, steps: Iterable[int]) -> None:
    """Mark ``steps`` abandoned: a resume rolled back to an older step, and training goes on
    from there.  One marker file per step, under ``ROOT/.abandoned.d/``."""
    _mark(storage, layout.join(root, layout.ABANDONED_DIR), steps)


def unabandon(storage: Storage, root: str, step: int) -> None:
    """Drop the abandoned mark of a step that was deleted."""
    storage.remove(layout.join(root, layout.ABANDONED_DIR, layout.step_dirname(step)))


def _mark(storage: Storage, directory: str, steps: Iterable[int]) -> None:
    storage.makedirs(directory)
    for step in steps:
        path = layout.join(directory, layout.step_dirname(step))
        if exists(storage, path):
            continue
        try:
            f = storage.open_write(path)
        except OSError:
            if exists(storage, path):  # another process marked it at the same moment
                continue
            raise
        storage.finish_write(f, path, 0)


# --------------------------------------------------------------------------- one writer's view


class Catalog:
    """The committed steps of the root this process writes, by kind; thread-safe."""

    def __init__(self, existing: Iterable[CheckpointInfo] = ()) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[Kind, int], CheckpointRecord] = {}
        self._abandoned: set[tuple[Kind, int]] = set()  # committed, but of an abandoned line
        for info in existing:
            self.add(info)

    def add(self, info: CheckpointInfo) -> None:
        """Record a committed step (an abandoned one apart: retention never counts it)."""
        kind = Kind(info.tier)
        with self._lock:
            if info.abandoned:
                self._abandoned.add((kind, info.step))
                return
            self._records[(kind, info.step)] = CheckpointRecord(
                step=info.step, time=info.time, metrics=dict(info.metrics), tier=kind.value
            )

    def abandon_after(self, step: int) -> list[int]:
        """Move every step above ``step`` to the abandoned set; returns those steps."""
        with self._lock:
            moved = [key for key in self._records if key[1] > step]
            for key in moved:
                del self._records[key]
                self._abandoned.add(key)
            return sorted({s for _, s in moved})

    def abandoned(self) -> set[tuple[Kind, int]]:
        with self._lock:
            return set(self._abandoned)

    def discard(self, kind: Kind, step: int) -> None:
        """Forget a step (it was deleted)."""
        with self._lock:
            self._records.pop((kind, step), None)
            self._abandoned.discard((kind, step))

    def has(self, kind: Kind, step: int) -> bool:
        """Whether ``step`` of ``kind`` is committed and not abandoned."""
        with self._lock:
            return (kind, step) in self._records

    def steps(self, kind: Kind = Kind.PERMANENT) -> set[int]:
        with self._lock:
            return {s for k, s in self._records if k is kind}

    def history(self) -> list[CheckpointRecord]:
        """Every record, for retention planning."""
        with self._lock:
            return list(self._records.values())
