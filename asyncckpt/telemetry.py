"""Per-save stats: a bounded history and the user's ``on_stats`` sink.

Records are written by the trainer thread (stall, staging) and the finalize thread (write,
commit, upload times); every access holds one lock, and callers get copies.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Telemetry"]

log = logging.getLogger("asyncckpt")

_GIB = float(1 << 30)


class Telemetry:
    """Stats of the last ``limit`` saves, forwarded to ``on_stats`` as they complete."""

    def __init__(self, on_stats: Callable[[dict[str, Any]], None] | None = None, limit: int = 10_000) -> None:
        self._on_stats = on_stats
        self._lock = threading.Lock()
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
        self._by_step: dict[int, dict[str, Any]] = {}

    def start(self, step: int, **fields: Any) -> dict[str, Any]:
        """A new record for a save of ``step`` (or a skipped one); returns it for updates."""
        rec = {"step": step, **fields}
        with self._lock:
            if len(self._records) == self._records.maxlen and self._records:
                self._by_step.pop(self._records[0]["step"], None)
            self._records.append(rec)
            self._by_step[step] = rec
        return rec

    def update(self, rec: dict[str, Any], **fields: Any) -> None:
        with self._lock:
            rec.update(fields)

    def committed(self, rec: dict[str, Any], bytes_written: int, write_s: float, commit_s: float) -> None:
        """The save of ``rec`` is durable: record its times and tell ``on_stats``."""
        self.update(
            rec,
            write_s=write_s,
            commit_s=commit_s,
            bytes_written=bytes_written,
            throughput_Bps=bytes_written / max(write_s, 1e-9),
        )
        log.info(
            "step=%d stall=%.3fs write=%.2fs %.2fGiB/s",
            rec["step"],
            rec.get("stall_s", 0.0),
            write_s,
            rec["throughput_Bps"] / _GIB,
        )
        self._emit(rec)

    def uploaded(self, step: int, seconds: float) -> None:
        """The remote copy of ``step`` is committed: ``upload_s`` is added and re-emitted."""
        with self._lock:
            rec = self._by_step.get(step)
            if rec is None or "upload_s" in rec:
                return
            rec["upload_s"] = seconds
        self._emit(rec)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._records]

    def _emit(self, rec: dict[str, Any]) -> None:
        if self._on_stats is None:
            return
        with self._lock:
            copy = dict(rec)
        try:
            self._on_stats(copy)
        except Exception as e:  # a metrics sink must never break checkpointing
            log.warning("asyncckpt: the on_stats callback raised %s: %s", type(e).__name__, e)
