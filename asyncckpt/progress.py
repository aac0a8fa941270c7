"""One progress bar for every long operation (load in ``resume``, ``verify``, ``export``).

It draws on stderr only when that stream is a terminal, so logs and CI stay clean.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["Progress", "human_bytes"]


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Byte progress on one line.  ``update(n)`` is thread-safe (reader threads call it) and
    redraws at most ~10 times a second; ``close()`` erases the bar, so the lines printed after
    it start clean.  ``force=True`` draws even when the stream is not a terminal."""

    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, force: bool = False
    ) -> None:
        self.total, self.label, self.done = max(0, total), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = force or bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * 30)
        rate = self.done / max(1e-9, now - self._start)
        text = (
            f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {frac * 100:5.1f}% "
            f"{human_bytes(self.done)}/{human_bytes(self.total)} {human_bytes(rate)}/s"
        )
        self._width = max(self._width, len(text))
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.enabled and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
