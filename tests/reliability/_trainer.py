"""The programs the reliability tests run in child processes.

A child is configured by one JSON object (``cfg``) and reports progress as event lines
``EV <pid> <text>`` on the file descriptor it inherited as stdout; its own stdout and stderr
can be redirected to files (``cfg["stdout"]``).  Events are written with one ``os.write``
each, so a SIGKILL never leaves half a line.

Modes:
- ``train``: resume, then save a step-determined state continuously (``_support.fill``),
  printing ``COMMITTED <step>`` from each handle's done-callback; optionally stop after
  ``steps`` saves and close.
- ``exit``: one of the interpreter-exit scenarios of ``test_exit.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import sys
import time
from typing import Any

from asyncckpt import AsyncCheckpointer, WriterOptions
from asyncckpt.storage import LocalStorage

from ._support import fill, make_state, s3_options_from_env, state_mismatch

EVENT_FD = 1


def event(text: str) -> None:
    os.write(EVENT_FD, f"EV {os.getpid()} {text}\n".encode())


def _redirect(cfg: dict[str, Any]) -> None:
    global EVENT_FD
    EVENT_FD = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if cfg.get("stdout"):
        fd = os.open(cfg["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def run(cfg: dict[str, Any]) -> int:
    """Entry point of a child (forked from the zygote or a fresh interpreter)."""
    _redirect(cfg)
    if cfg.get("debug_log"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    return {"train": train, "exit": exit_scenario}[cfg["mode"]](cfg)


def spawn_main() -> None:
    """``python -c 'from tests.reliability._trainer import spawn_main; spawn_main()' CFG``."""
    sys.exit(run(json.loads(sys.argv[1])))


# ----------------------------------------------------------------------------- train


def _on_done(step: int, fut: Any) -> None:
    exc = fut.exception()
    event(f"COMMITTED {step}" if exc is None else f"FAILED {step} {type(exc).__name__}")


def _writer_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The 0.1 flat keywords, as before; ``incremental``/``compression`` need the writer
    group (a group and a flat keyword of the same group are refused together)."""
    executor, threads = cfg.get("executor", "thread"), cfg.get("write_threads", 1)
    if not (cfg.get("incremental") or cfg.get("compression")):
        return {"write_threads": threads, "executor": executor}
    return {
        "writer": WriterOptions(
            executor=executor,
            threads=threads,
            incremental=bool(cfg.get("incremental", False)),
            compression=cfg.get("compression"),
        )
    }


def train(cfg: dict[str, Any]) -> int:
    opts = s3_options_from_env() if cfg.get("s3") else None
    state = make_state(cfg["numel"], cfg.get("frozen_parts", 0))
    event("START")
    ck = AsyncCheckpointer(
        cfg["root"],
        state,
        keep=cfg.get("keep"),
        max_inflight=cfg.get("max_inflight", 1),
        storage_options=opts,
        **_writer_kwargs(cfg),
    )
    if cfg.get("executor") == "process":
        event(f"WRITER {ck._pipeline.executor.process.pid}")  # type: ignore[union-attr]
    resumed = ck.resume()
    bad = None if resumed is None else state_mismatch(state, resumed)
    event(f"RESUMED {resumed} {'OK' if bad is None else 'BAD'}")
    if bad is not None:
        event(f"MISMATCH {bad}")
    step = 0 if resumed is None else resumed + 1
    rng = random.Random(cfg.get("seed", 0))
    end = None if cfg.get("steps") is None else step + cfg["steps"]
    train_ms = cfg.get("train_ms", 0)
    while end is None or step < end:
        fill(state, step)
        h = ck.save_async(step)
        assert h is not None
        h.committed.add_done_callback(functools.partial(_on_done, step))
        if train_ms:
            time.sleep(rng.random() * train_ms / 1000)
        step += 1
    ck.close()
    event("CLOSED")
    return 0


# ----------------------------------------------------------------------------- exit scenarios


class _BrokenRename(LocalStorage):
    armed = False

    def rename_dir(self, src: str, dst: str) -> None:
        if self.armed:
            raise OSError(5, "injected rename failure")
        super().rename_dir(src, dst)


def exit_scenario(cfg: dict[str, Any]) -> int:
    """Leave the interpreter in one of several ways with saves in flight.

    ``drain``: no close(); the atexit hook must commit every save.  ``crash``: an unhandled
    exception with saves in flight (exit 1; saves still drained).  ``with_error``: an
    exception inside ``with AsyncCheckpointer``.  ``fail_final``: the final save fails and
    ``close()`` raises (exit 1).  ``fail_atexit``: the final save fails, no close().
    ``sys_exit``: ``sys.exit(3)`` with saves in flight.
    """
    scenario = cfg["scenario"]
    root = cfg["root"]
    state = make_state(cfg["numel"])
    executor = cfg.get("executor", "thread")
    fail = scenario in ("fail_final", "fail_atexit")
    storage = _BrokenRename() if fail and executor == "thread" else None
    kwargs: dict[str, Any] = {
        "max_inflight": cfg.get("max_inflight", 3),
        "executor": executor,
        "storage": storage,
    }
    n = cfg.get("saves", 3)
    if scenario == "with_error":
        with AsyncCheckpointer(root, state, **kwargs) as ck:
            if executor == "process":
                event(f"WRITER {ck._pipeline.executor.process.pid}")  # type: ignore[union-attr]
            for s in range(1, n + 1):
                fill(state, s)
                ck.save_async(s)
            event("EXITING")
            raise RuntimeError("training blew up")
    ck = AsyncCheckpointer(root, state, **kwargs)
    if executor == "process":
        event(f"WRITER {ck._pipeline.executor.process.pid}")  # type: ignore[union-attr]
    for s in range(1, n + 1):
        if fail and s == n:  # only the final save fails (an earlier failure would surface
            ck.wait()  # at the next save_async instead)
            if storage is not None:
                storage.armed = True
            else:  # the writer process cannot take a custom storage: break its mkdir instead
                tmp = os.path.join(root, ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                with open(tmp, "w") as f:
                    f.write("not a directory")
        fill(state, s)
        ck.save_async(s)
    event("EXITING")
    if scenario == "fail_final":
        ck.close()  # raises WriteError: the process exits nonzero
        return 0
    if scenario == "crash":
        raise RuntimeError("training crashed with saves in flight")
    if scenario == "sys_exit":
        sys.exit(3)
    return 0  # "drain", "fail_atexit": no close(); the atexit hook drains
