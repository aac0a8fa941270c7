"""The writer gives way to training: CPU niceness, I/O priority and a bandwidth cap.

Both priorities apply to the calling thread (on Linux each thread has its own nice value
and I/O priority, and threads it starts inherit them), so a writer thread in the trainer's
process can be lowered without touching the trainer.  They are best effort: an
unprivileged process can lower but not raise them, the I/O class is honoured only by the
BFQ scheduler (``mq-deadline`` and ``none`` ignore it), and other platforms keep their
defaults.  A bandwidth cap (:class:`Pacer`) works everywhere.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
import time

__all__ = ["IO_PRIORITIES", "lower_priority", "Pacer"]

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


def lower_priority(nice: int, io: str) -> None:
    """Lower the calling thread's CPU priority by ``nice`` and set its I/O priority."""
    if nice > 0 and hasattr(os, "setpriority"):
        tid = threading.get_native_id()  # Linux: a thread id is a PRIO_PROCESS target
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
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
