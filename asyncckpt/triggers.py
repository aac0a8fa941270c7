"""Out-of-band save requests: POSIX signals (preemption) and a trigger file.

A signal handler only sets a flag; the save itself happens at the next ``save_async`` call,
on the trainer thread, with a consistent state.  Doing I/O or touching tensors inside a
signal handler (which runs between two bytecodes of the training step) would be unsafe, so
the "emergency save" is deliberately deferred to the next step boundary.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

__all__ = ["SaveTriggers"]

log = logging.getLogger("asyncckpt")


class SaveTriggers:
    """Watches for save requests from signals and from a trigger file."""

    def __init__(self, signals: Sequence[int] = (), trigger_file: str | None = None) -> None:
        self.trigger_file = trigger_file
        self.signal_received: int | None = None  # the last signal seen; loops may poll it to stop
        self._pending = False
        self._warned = False
        self._previous: dict[int, Any] = {}
        if signals and threading.current_thread() is not threading.main_thread():
            raise ConfigError(
                "save_on_signal installs signal handlers, which Python allows only on the main "
                "thread; create the checkpointer there or drop save_on_signal"
            )
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError) as e:
                self.close()
                raise ConfigError(f"save_on_signal: cannot handle signal {sig!r}: {e}") from e

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_received = signum
        self._pending = True

    def fired(self) -> str | None:
        """Why a save was requested since the last call (consumes the request), or None."""
        if self._pending:
            self._pending = False
            return f"signal {signal.Signals(self.signal_received or 0).name}"
        if self.trigger_file is None or not os.path.lexists(self.trigger_file):
            return None
        if not os.path.isfile(self.trigger_file):  # a directory, a FIFO: never a request
            if not self._warned:
                log.warning("asyncckpt: ignoring trigger_file %s: not a regular file", self.trigger_file)
                self._warned = True
            return None
        try:
            os.remove(self.trigger_file)
        except FileNotFoundError:
            return None  # another process consumed it
        except OSError as e:  # cannot consume it: save now, but warn, and never fail training
            if self._warned:
                return None  # it stays; one save per stuck file is enough
            log.warning(
                "asyncckpt: could not remove trigger_file %s (%s); it triggers once", self.trigger_file, e
            )
            self._warned = True
        return f"trigger file {self.trigger_file}"

    def close(self) -> None:
        """Restore the signal handlers that were there before."""
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev)
            except (ValueError, OSError):
                log.warning("asyncckpt: could not restore the handler of signal %s", sig)
        self._previous.clear()
