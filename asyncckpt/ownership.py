"""Who owns the work in flight under a root, and whether that owner is still alive.

A root has one writer (a training run, possibly many ranks), any number of readers and
maintenance (``gc``).  The writer proves it is alive with an *owner record*,
``ROOT/.owners/<token>.json``, rewritten every ``ttl / 4`` seconds by a heartbeat thread
and removed when it closes.  Everything it has in flight carries its token: temp directories
are named ``step_N.<token><random>``, and an object-store step prefix being written holds
``.writer`` with the token.  A sweep or ``gc`` removes in-flight work only when its owner is
provably gone: on this host, its process no longer exists (the pid's start time guards
against reuse); elsewhere, its record was not renewed for ``ttl`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from . import layout
from .storage import AtomicRename, Storage, wrap_os_error

__all__ = ["DEFAULT_TTL", "OwnerRecord", "Heartbeat", "new_token", "owners", "owner_of", "is_alive"]

log = logging.getLogger("asyncckpt")

DEFAULT_TTL = 60.0
_SUFFIX = ".json"
TOKEN_LEN = 16


def new_token() -> str:
    """A fresh owner token (16 hex digits)."""
    return uuid.uuid4().hex[:TOKEN_LEN]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class OwnerRecord:
    """What a writer says about itself."""

    token: str
    host: str
    boot_id: str
    pid: int
    pid_start: int | None
    renewed: float
    ttl: float

    @classmethod
    def mine(cls, token: str, ttl: float) -> OwnerRecord:
        pid = os.getpid()
        return cls(token, socket.gethostname(), _boot_id(), pid, _start_time(pid), time.time(), ttl)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def record_path(root: str, token: str) -> str:
    return layout.join(root, layout.OWNERS_DIR, f"{token}{_SUFFIX}")


def _put(storage: Storage, path: str, data: bytes) -> None:
    f = storage.open_write(path)
    try:
        f.write(data)
    except BaseException:
        storage.abort_write(f)
        raise
    storage.finish_write(f, path, len(data))


def _write(storage: Storage, root: str, rec: OwnerRecord) -> None:
    """Replace the record atomically: a reader never finds it missing or half written."""
    path = record_path(root, rec.token)
    data = json.dumps(asdict(rec)).encode()
    storage.makedirs(layout.join(root, layout.OWNERS_DIR))
    if isinstance(storage, AtomicRename):  # a local path: write aside, then rename over
        part = f"{path}.{os.getpid()}.part"
        try:
            with open(part, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(part)
            raise wrap_os_error("write owner record", path, e) from e
    else:  # an object PUT replaces atomically
        _put(storage, path, data)


def owners(storage: Storage, root: str) -> dict[str, tuple[OwnerRecord, float | None]]:
    """Owner records under ``root`` by token, with their storage modification time.

    Raises StorageError when the store does not answer: a sweep must then delete nothing.
    """
    out = {}
    directory = layout.join(root, layout.OWNERS_DIR)
    for name in storage.listdir(directory):
        if not name.endswith(_SUFFIX):
            continue
        path = layout.join(directory, name)
        st = storage.stat(path)  # a storage error propagates: unanswered is not "dead"
        if st is None or st.kind != "file" or st.size > 4096:
            continue
        data = storage.read_bytes(path)
        try:
            doc = json.loads(data)
            rec = OwnerRecord(**{k: doc[k] for k in OwnerRecord.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            continue  # garbage (records are replaced atomically): no proof of life
        out[rec.token] = (rec, st.mtime)
    return out


def is_alive(rec: OwnerRecord, mtime: float | None, now: float | None = None) -> bool:
    """Whether the owner of ``rec`` may still be writing."""
    if rec.host == socket.gethostname() and rec.boot_id == _boot_id() and rec.boot_id:
        start = _start_time(rec.pid)  # this host: ask the kernel, not the clock
        return start is not None and (rec.pid_start is None or start == rec.pid_start)
    renewed = max(rec.renewed, mtime or 0.0)
    return (time.time() if now is None else now) - renewed < rec.ttl


def owner_of(name: str) -> str | None:
    """The owner token in a temp directory name ``step_N.<token><random>``, or None."""
    suffix = name.rpartition(".")[2]
    return suffix[:TOKEN_LEN] if len(suffix) >= TOKEN_LEN else None


class Heartbeat:
    """Keeps this writer's owner record fresh until :meth:`stop` removes it."""

    def __init__(
        self, storage: Storage, root: str, token: str, ttl: float = DEFAULT_TTL, required: bool = True
    ) -> None:
        """``required=False``: a first write that fails is logged and retried by the thread
        (a remote tier that is down now must not stop training; its uploads will say so)."""
        self.storage, self.root, self.token, self.ttl = storage, root, token, ttl
        try:
            _write(storage, root, OwnerRecord.mine(token, ttl))
        except Exception as e:
            if required:
                raise
            log.warning("asyncckpt: could not write the owner record under %s: %s", root, e)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="asyncckpt-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                _write(self.storage, self.root, OwnerRecord.mine(self.token, self.ttl))
            except Exception as e:  # a missed beat is retried; the ttl allows three
                log.warning("asyncckpt: could not renew the owner record under %s: %s", self.root, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.storage.remove(record_path(self.root, self.token))
        except Exception as e:
            log.warning("asyncckpt: could not remove the owner record under %s: %s", self.root, e)
