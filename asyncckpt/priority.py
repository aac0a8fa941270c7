"""The writer gives way to training: CPU niceness, I/O priority and a bandwidth cap.

Both priorities apply to the calling thread (on Linux each thread has its own nice value
and I/O priority, and threads it starts inherit them), so a writer thread in the trainer's
process can be lowered without touching the trainer.  Every thread that writes or uploads
for a checkpoint is lowered: the writer, its pools, a writer process's threads (fsspec's
event loop among them) and the local-first tier's uploader.  They are best effort: an
unprivileged process can lower but not raise them, the I/O class is honoured only by the
BFQ scheduler (``mq-deadline`` and ``none`` ignore it), and other platforms keep their
defaults.  A bandwidth cap (:class:`Pacer`) works everywhere.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading
import time
from collections.abc import Callable

__all__ = ["IO_PRIORITIES", "writer_priority", "Pacer"]

log = logging.getLogger("asyncckpt")

IO_PRIORITIES = ("normal", "low", "idle")
_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS = {"low": (2, 7), "idle": (3, 0)}  # best effort at its lowest level; idle


def _set_io_priority(level: str) -> None:
    nr = _IOPRIO_SYSCALL.get(platform.machine())
    if nr is None or platform.system() != "Linux":
        return
    cls, data = _IOPRIO_CLASS[level]
    libc = ctypes.CDLL(None, use_errno=True)
    tid = threading.get_native_id()
    if libc.syscall(nr, _IOPRIO_WHO_PROCESS, tid, (cls << _IOPRIO_CLASS_SHIFT) | data) != 0:
        log.debug("asyncckpt: ioprio_set failed: %s", os.strerror(ctypes.get_errno()))


def writer_priority(nice: int, io: str) -> Callable[[], None]:
    """A function that gives the thread calling it the writer's priorities: a CPU nice value
    ``nice`` above that of the thread calling *this* (the trainer), and I/O priority ``io``.
    It sets a level, never adds to one: a helper thread that inherited the level, or applies
    it again (a pool's ``initializer``), ends at the same place."""
    target = None
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            target = min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + nice)
        except OSError as e:
            log.debug("asyncckpt: getpriority failed: %s", e)
    return functools.partial(_apply, target, io)


def _apply(target: int | None, io: str) -> None:
    if target is not None:
        tid = threading.get_native_id()  # Linux: a thread id is a PRIO_PROCESS target
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < target:  # lower only: raising needs privileges
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError as e:
            log.debug("asyncckpt: setpriority failed: %s", e)
    if io != "normal":
        _set_io_priority(io)


class Pacer:
    """A shared bandwidth cap: ``pace(n)`` after sending ``n`` bytes sleeps as needed to
    keep the average at ``rate`` bytes per second (bursts of one write call at most)."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self._next = 0.0  # monotonic time by which everything sent so far is "paid for"
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            # after a pause the budget restarts: the piece just sent counts from now - n/rate
            self._next = max(self._next, now - n / self.rate) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)
