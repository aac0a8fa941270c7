"""Child processes for the reliability tests: a fork server ("zygote") and plain spawns.

Importing torch costs about 3 s of CPU on the CI machine, which would dominate a kill-fuzz
of 50 rounds.  The zygote is a ``python -c`` script (PYTHONPATH = the repository) that
imports torch and asyncckpt once, runs no torch op (so no OpenMP pool exists when it forks),
and forks one child per request.  A forked child is a separate process with its own memory:
SIGKILL hits it exactly as it would hit a fresh interpreter, and when it returns it leaves
through normal interpreter finalization (atexit hooks included).  ``Spawner`` runs each
child as a fresh ``python -c`` interpreter instead; the slow variants and part of the exit
runs use it, so both paths stay covered.

Both hand out ``Child`` objects: event lines (``EV <pid> <text>``) arrive on a queue, the
exit code is recorded (negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from ._support import REPO

_ZYGOTE = r"""
import json, os, select, sys
import torch, asyncckpt, asyncckpt.checkpointer, asyncckpt.cli  # preload; run no torch op here
from tests.reliability import _trainer

def emit(text):
    os.write(1, (text + "\n").encode())

emit("ZYGOTE READY")
kids = set()
buf = b""
child_cfg = None
while child_cfg is None:
    ready, _, _ = select.select([0], [], [], 0.02)
    if ready:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and child_cfg is None:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child_cfg = req["cfg"]
                break
            kids.add(pid)
            emit(f"SPAWNED {req['token']} {pid}")
    if child_cfg is not None:
        break
    for pid in list(kids):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            kids.discard(pid)
            emit(f"EXIT {pid} {os.waitstatus_to_exitcode(status)}")
if child_cfg is not None:
    sys.exit(_trainer.run(child_cfg))  # a normal interpreter exit: atexit hooks run
for pid in kids:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
"""

_SPAWN = "from tests.reliability._trainer import spawn_main; spawn_main()"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


class Child:
    """One child process: its events, its exit code, and a way to SIGKILL it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.events: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.exit_code: int | None = None
        self._exited = threading.Event()

    # -- fed by a reader thread
    def _event(self, text: str) -> None:
        self.events.put(text)

    def _exit(self, code: int) -> None:
        self.exit_code = code
        self._exited.set()
        self.events.put(None)

    # -- used by tests
    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def next_event(self, timeout: float) -> str | None:
        """The next event line, or None once the child has exited (or on timeout)."""
        try:
            text = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if text is None:
            self.events.put(None)  # keep signalling the end to later calls
            return None
        self.seen.append(text)
        return text

    def wait_event(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.pid}: no {prefix!r} within {timeout}s; saw {self.seen[-5:]}")
            text = self.next_event(left)
            if text is None:
                if self.exited:
                    raise RuntimeError(
                        f"child {self.pid} exited ({self.exit_code}) before {prefix!r}; saw {self.seen[-5:]}"
                    )
                continue
            if text.startswith(prefix):
                return text

    def drain(self) -> list[str]:
        """Every event still queued (call after ``wait``)."""
        out = []
        while True:
            try:
                text = self.events.get_nowait()
            except queue.Empty:
                return out
            if text is None:
                self.events.put(None)
                return out
            self.seen.append(text)
            out.append(text)

    def kill(self) -> None:
        if not self.exited:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the child is still running after ``timeout``."""
        self._exited.wait(timeout)
        return self.exit_code


def _parse_event(line: str) -> tuple[int, str] | None:
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) >= 2 and parts[0] == "EV" and parts[1].isdigit():
        return int(parts[1]), parts[2] if len(parts) == 3 else ""
    return None


class Zygote:
    """A fork server: one ``python -c`` process that forks pre-imported children on request."""

    def __init__(self, env_extra: dict[str, str] | None = None, log_path: str | None = None) -> None:
        self._log = open(log_path or os.devnull, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=child_env(env_extra),
            cwd=REPO,
        )
        self._lock = threading.Lock()
        self._children: dict[int, Child] = {}
        self._early: dict[int, list[str]] = {}
        self._spawned: dict[str, queue.Queue[Child]] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(180):
            self.close()
            raise RuntimeError("the zygote did not start within 180 s")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line == "ZYGOTE READY":
                self._ready.set()
            elif line.startswith("SPAWNED "):
                _, token, pid_s = line.split()
                child = Child(int(pid_s))
                with self._lock:
                    self._children[child.pid] = child
                    for text in self._early.pop(child.pid, []):
                        child._event(text)
                    self._spawned[token].put(child)
            elif line.startswith("EXIT "):
                _, pid_s, code = line.split()
                with self._lock:
                    child_or_none = self._children.pop(int(pid_s), None)
                if child_or_none is not None:
                    child_or_none._exit(int(code))
            elif (ev := _parse_event(line)) is not None:
                with self._lock:
                    target = self._children.get(ev[0])
                    if target is None:  # the event beat the zygote's SPAWNED line
                        self._early.setdefault(ev[0], []).append(ev[1])
                if target is not None:
                    target._event(ev[1])
        with self._lock:
            for child in self._children.values():
                child._exit(-999)

    def start(self, cfg: dict[str, Any]) -> Child:
        token = uuid.uuid4().hex
        q: queue.Queue[Child] = queue.Queue()
        with self._lock:
            self._spawned[token] = q
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"token": token, "cfg": cfg}) + "\n").encode())
        self.proc.stdin.flush()
        try:
            return q.get(timeout=60)
        finally:
            with self._lock:
                self._spawned.pop(token, None)

    def close(self) -> None:
        with self._lock:
            children = list(self._children.values())
        for c in children:
            c.kill()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(30)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        self._log.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Spawner:
    """Each child is a fresh ``python -c`` interpreter (no fork)."""

    def __init__(self, env_extra: dict[str, str] | None = None) -> None:
        self.env = child_env(env_extra)
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, cfg: dict[str, Any]) -> Child:
        # until the child redirects its own output, its stderr (an import error, say) goes to
        # its log file, so a child that dies early still says why
        err = open(cfg["stdout"], "wb") if cfg.get("stdout") else None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _SPAWN, json.dumps(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err if err is not None else subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        finally:
            if err is not None:
                err.close()
        self._procs.append(proc)
        child = Child(proc.pid)

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                ev = _parse_event(raw.decode(errors="replace"))
                if ev is not None:
                    child._event(ev[1])
            child._exit(proc.wait())

        threading.Thread(target=read, name=f"spawn-reader-{proc.pid}", daemon=True).start()
        return child

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
