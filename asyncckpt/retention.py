"""Carry out retention after each commit: the only place that deletes checkpoints.

The decisions come from the pure policies in ``policy.py``; this module owns the history,
the user-protected set (persisted under the root) and the deletion itself.  A deletion first
*decommits* the step (an atomic rename into ``.tmp/``, which is swept at start), then removes
the files, so a crash mid-delete never leaves a half-deleted checkpoint that looks committed.
A failed delete is logged and retried after the next commit; it never fails training.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence

from . import layout
from .handle import CheckpointInfo
from .policy import PERMANENT, SNAPSHOT, CheckpointRecord, RetentionPolicy, plan_deletions
from .storage import Storage

__all__ = ["Retention"]

log = logging.getLogger("asyncckpt")

PROTECTED_FILE = ".protected.json"


class Retention:
    """History of committed checkpoints of one root, and the deletions policies ask for."""

    def __init__(
        self,
        storage: Storage,
        root: str,
        policies: Sequence[RetentionPolicy],
        snapshot_slots: int,
        existing: Sequence[CheckpointInfo] = (),
    ) -> None:
        self.storage = storage
        self.root = root
        self.policies = list(policies)
        self.snapshot_slots = snapshot_slots
        self._lock = threading.Lock()
        self._records: dict[tuple[str, int], CheckpointRecord] = {}
        self._failed: set[tuple[str, int]] = set()
        for info in existing:
            self.add(info)
        self.protected: set[int] = self._load_protected()

    def _protected_path(self) -> str:
        return layout.join(self.root, PROTECTED_FILE)

    def _load_protected(self) -> set[int]:
        path = self._protected_path()
        if not self.storage.exists(path):
            return set()
        if not self.storage.is_regular_file(path):  # a FIFO would block the read forever
            log.warning("asyncckpt: ignoring %s: not a regular file", path)
            return set()
        try:
            steps = json.loads(self.storage.read_bytes(path))
            return {int(s) for s in steps if isinstance(s, int) and not isinstance(s, bool)}
        except (ValueError, TypeError, OSError) as e:
            log.warning("asyncckpt: ignoring unreadable %s (%s)", path, e)
            return set()

    def protect(self, step: int) -> None:
        """Never delete ``step``; persisted under the root so later runs honour it too."""
        with self._lock:
            self.protected.add(step)
            data = json.dumps(sorted(self.protected)).encode()
        if self.storage.atomic_rename:
            tmp = self._protected_path() + f".{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._protected_path())
        else:  # an object PUT replaces atomically
            self.storage.rmtree(self._protected_path())
            out = self.storage.open_write(self._protected_path())
            out.write(data)
            self.storage.finish_write(out, self._protected_path(), len(data))

    def add(self, info: CheckpointInfo) -> None:
        with self._lock:
            self._records[(info.tier, info.step)] = CheckpointRecord(
                step=info.step, time=info.time, metrics=dict(info.metrics), tier=info.tier
            )

    def steps(self, tier: str = PERMANENT) -> set[int]:
        with self._lock:
            return {s for t, s in self._records if t == tier}

    def apply(self, in_flight: Collection[int] = ()) -> list[tuple[str, int]]:
        """Delete what the policies drop (plus snapshots beyond the slots); never raises."""
        with self._lock:
            history = list(self._records.values())
            protected = set(self.protected)
        victims = [(PERMANENT, s) for s in plan_deletions(
            history, self.policies, time.time(), protected=protected, in_flight=in_flight
        )] if self.policies else []  # fmt: skip
        snaps = sorted(r.step for r in history if r.tier == SNAPSHOT)
        victims += [(SNAPSHOT, s) for s in snaps[: max(0, len(snaps) - self.snapshot_slots)]]
        with self._lock:
            victims += [v for v in self._failed if v not in victims and v in self._records]
        deleted = []
        for tier, step in victims:
            if self._delete(tier, step):
                deleted.append((tier, step))
        return deleted

    def _delete(self, tier: str, step: int) -> bool:
        base = self.root if tier == PERMANENT else layout.join(self.root, layout.SNAPSHOT_DIR)
        path = layout.join(base, layout.step_dirname(step))
        trash_dir = layout.join(base, layout.TMP_DIR)
        if not self.storage.exists(path):  # already gone (e.g. `asyncckpt gc`): nothing to retry
            with self._lock:
                self._records.pop((tier, step), None)
                self._failed.discard((tier, step))
            return True
        try:
            if self.storage.atomic_rename:
                self.storage.makedirs(trash_dir)
                trash = layout.join(trash_dir, layout.tmp_dirname(step))
                self.storage.rename_dir(path, trash)  # decommit atomically first
            else:  # object store: removing the manifest decommits the step
                self.storage.rmtree(layout.join(path, layout.MANIFEST))
                trash = path
            with self._lock:
                self._records.pop((tier, step), None)
                self._failed.discard((tier, step))
            self.storage.rmtree(trash)
        except Exception as e:  # retention must never fail training
            log.warning("asyncckpt: could not delete %s (%s); will retry after the next commit", path, e)
            with self._lock:
                self._failed.add((tier, step))
            return False
        log.info("asyncckpt: retention deleted %s", path)
        return True
