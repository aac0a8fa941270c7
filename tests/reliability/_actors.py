"""Many actors on one live root: the child programs and the loop of ``test_actors_fuzz.py``.

One trainer process saves continuously with retention (``keep``) and a rolling snapshot tier,
waits for every save's ``result()`` and appends each confirmed step to a file.  Meanwhile a
few actor threads of the test process each fork, at seeded random moments, a short-lived
child that does one thing to the same root: ``resume`` (checked bit for bit), ``asyncckpt
verify --all``, ``asyncckpt ls --json``, ``asyncckpt gc --min-age 0``, or a second
``AsyncCheckpointer`` on the root (which must raise ``RootBusyError`` and touch nothing).

Children come from a fork server like ``_procs.Zygote`` whose children run :func:`run`
here instead of ``_trainer.run``.  This module is imported by those children, so it imports
neither pytest nor the conftest.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import _procs
from ._procs import Child, Zygote, child_env
from ._support import REPO, FileAudit, make_state, s3_options_from_env, state_mismatch

EVENT_FD = 1

OPS = (("resume", 0.30), ("verify", 0.20), ("ls", 0.15), ("gc", 0.15), ("construct", 0.20))

# the trainer's configuration: permanent saves every EVERY steps, snapshots every
# SNAPSHOT_EVERY steps (when no permanent save happens), KEEP permanent steps, SLOTS snapshots
EVERY, SNAPSHOT_EVERY, KEEP, SLOTS = 4, 3, 2, 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400] or type(e).__name__


# ============================================================================= children


def event(text: str) -> None:
    os.write(EVENT_FD, f"EV {os.getpid()} {text}\n".encode())


def _redirect(cfg: dict[str, Any]) -> None:
    """Events keep the inherited stdout; the child's own output goes to ``cfg["log"]``."""
    global EVENT_FD
    EVENT_FD = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    fd = os.open(cfg.get("log") or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run(cfg: dict[str, Any]) -> int:
    """Entry point of a child forked by :class:`ActorZygote`."""
    import torch

    _redirect(cfg)
    torch.set_num_threads(1)
    if cfg["mode"] == "trainer":
        return trainer(cfg)  # a normal interpreter exit: atexit hooks run
    code = actor(cfg)
    # An actor holds no checkpointer and its verdict is out; the interpreter finalization of
    # a process with torch loaded costs over a second of CPU, which would halve the actors'
    # rate on a busy machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _checkpointer(cfg: dict[str, Any], state: dict[str, Any]) -> Any:
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.options import ScheduleOptions, SnapshotOptions, StorageOptions, WriterOptions

    return AsyncCheckpointer(
        cfg["root"],
        state,
        schedule=ScheduleOptions(policy=EVERY, final=False),
        keep=KEEP,
        snapshots=SnapshotOptions(every=SNAPSHOT_EVERY, slots=SLOTS),
        writer=WriterOptions(executor=cfg.get("executor", "thread")),
        storage=StorageOptions(fsspec=s3_options_from_env() if cfg.get("s3") else None),
    )


def trainer(cfg: dict[str, Any]) -> int:
    """Save every step the schedule wants, each filled for its step, until ``cfg["stop"]``
    exists; append ``STEP TIER`` to ``cfg["confirmed"]`` once its ``result()`` returned."""
    from ._support import fill

    state = make_state(cfg["numel"])
    rng = random.Random(cfg["seed"])
    try:
        ck = _checkpointer(cfg, state)
    except BaseException as e:
        event(f"ERROR construct {type(e).__name__} {_one_line(e)}")
        return 1
    event(f"READY {ck._pipeline.run_id}")  # its owner token, which names its saves in flight
    step = 0
    with open(cfg["confirmed"], "a") as confirmed:
        try:
            while not os.path.exists(cfg["stop"]):
                fill(state, step)
                h = ck.save_async(step)
                if h is not None:
                    info = h.result(timeout=cfg["save_timeout"])
                    confirmed.write(f"{step} {info.tier}\n")
                    confirmed.flush()
                    event(f"CONFIRMED {step} {info.tier}")
                step += 1
                if cfg.get("train_ms"):
                    time.sleep(rng.random() * cfg["train_ms"] / 1000)
            ck.close(timeout=cfg["save_timeout"])
        except BaseException as e:
            event(f"ERROR {type(e).__name__} {_one_line(e)}")
            with contextlib.suppress(BaseException):
                ck.close(timeout=30)
            return 1
    event(f"CLOSED {step}")
    return 0


def _cli(cfg: dict[str, Any], *args: str) -> tuple[int, str]:
    from asyncckpt.cli import main

    argv = list(args)
    if cfg.get("s3"):
        argv = ["--storage-options", json.dumps(s3_options_from_env()), *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _op_resume(cfg: dict[str, Any]) -> dict[str, Any]:
    from asyncckpt import resume

    fresh = make_state(cfg["numel"])
    opts = s3_options_from_env() if cfg.get("s3") else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = resume(cfg["root"], fresh, storage_options=opts)
    skipped = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # on an object store a save in flight (or a step retention is deleting) is a step prefix
    # without a manifest: resume names it and moves on; nothing of it is loaded
    uncommitted = [m for m in skipped if "was never committed" in m] if cfg.get("s3") else []
    skipped = [m for m in skipped if m not in uncommitted]
    out: dict[str, Any] = {"step": got, "uncommitted_warnings": len(uncommitted)}
    if got is None:
        return {**out, "ok": False, "why": "resume found no checkpoint on a root with committed steps"}
    if skipped:
        return {**out, "ok": False, "why": f"resume skipped a committed step: {skipped[:3]}"}
    bad = state_mismatch(fresh, got)
    if bad is not None:
        return {**out, "ok": False, "why": f"step {got} loaded wrong values: {bad}"}
    return {**out, "ok": True}


def _op_verify(cfg: dict[str, Any]) -> dict[str, Any]:
    rc, text = _cli(cfg, "verify", cfg["root"], "--all")
    lines = text.splitlines()
    out = {
        "checked": sum(line.startswith("OK ") for line in lines),
        "gone": sum(line.startswith("GONE ") for line in lines),
    }
    if rc != 0 or "FAILED" in text:
        return {**out, "ok": False, "why": f"verify --all exited {rc}: {' | '.join(lines[-6:])[:600]}"}
    return {**out, "ok": True}


def _op_ls(cfg: dict[str, Any]) -> dict[str, Any]:
    rc, text = _cli(cfg, "ls", cfg["root"], "--json")
    if rc != 0:
        return {"ok": False, "why": f"ls exited {rc}"}
    doc = json.loads(text)
    steps = [c["step"] for c in doc["checkpoints"]]
    return {"ok": bool(steps), "why": "ls listed nothing", "listed": len(steps),
            "leftovers": len(doc["leftovers"])}  # fmt: skip


def _op_gc(cfg: dict[str, Any]) -> dict[str, Any]:
    rc, text = _cli(cfg, "gc", cfg["root"], "--min-age", "0")
    lines = text.splitlines()
    removed = [line.split()[2] for line in lines if line.startswith("removed uncommitted")]
    out = {
        "removed": len(removed),
        "removed_paths": removed[:50],
        "in_use": sum("a save in progress by a live writer" in line for line in lines),
        "aborted": sum(line.startswith("aborted abandoned multipart") for line in lines),
    }
    if rc != 0:
        return {**out, "ok": False, "why": f"gc exited {rc}: {' | '.join(lines[-6:])[:600]}"}
    return {**out, "ok": True}


_MUTATING = {"os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod", "os.symlink"}


def _op_construct(cfg: dict[str, Any]) -> dict[str, Any]:
    from asyncckpt import RootBusyError

    audit = FileAudit() if not cfg.get("s3") else contextlib.nullcontext()
    with audit:
        try:
            ck = _checkpointer(cfg, make_state(cfg["numel"]))
        except RootBusyError:
            ck = None
    if ck is not None:
        ck.close()
        return {"ok": False, "why": "a second AsyncCheckpointer started on a root a live trainer owns"}
    if isinstance(audit, FileAudit):
        touched = [(ev, p) for ev, p in audit.touching(cfg["root"]) if ev in _MUTATING]
        if touched:
            return {"ok": False, "why": f"the refused checkpointer changed the root: {touched[:5]}"}
    return {"ok": True}


def actor(cfg: dict[str, Any]) -> int:
    """One operation; its verdict as one ``RESULT {json}`` event."""
    t0 = time.monotonic()
    try:
        out = {"resume": _op_resume, "verify": _op_verify, "ls": _op_ls, "gc": _op_gc,
               "construct": _op_construct}[cfg["op"]](cfg)  # fmt: skip
    except BaseException as e:  # noqa: BLE001 - every error is a verdict
        out = {"ok": False, "why": f"{type(e).__name__}: {_one_line(e)}"}
    out["ms"] = int((time.monotonic() - t0) * 1000)
    if out.get("ok"):
        out.pop("why", None)
    event("RESULT " + json.dumps(out))
    return 0


# ============================================================================= fork server

# the same fork server; its children run this module's ``run``, and with S3 in the
# environment s3fs is imported once here too (about half a second per child otherwise)
_SCRIPT = _procs._ZYGOTE.replace(
    "from tests.reliability import _trainer",
    "from tests.reliability import _actors as _trainer\n"
    "if os.environ.get('ASYNCCKPT_TEST_S3_ENDPOINT'):\n"
    "    import s3fs  # starts no thread: safe to fork",
)
assert _SCRIPT != _procs._ZYGOTE, "_procs._ZYGOTE changed: update ActorZygote"


class ActorZygote(Zygote):
    """``_procs.Zygote`` whose children run :func:`run` of this module; ``start`` may be
    called from several threads."""

    def __init__(self, env_extra: dict[str, str] | None = None, log_path: str | None = None) -> None:
        self._log = open(log_path or os.devnull, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=child_env(env_extra),
            cwd=REPO,
        )
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._children: dict[int, Child] = {}
        self._early: dict[int, list[str]] = {}
        self._spawned: dict[str, Any] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="actor-zygote-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(180):
            self.close()
            raise RuntimeError("the actor zygote did not start within 180 s")

    def start(self, cfg: dict[str, Any]) -> Child:
        with self._start_lock:
            return super().start(cfg)


# ============================================================================= the test's side


@dataclass
class ActorsResult:
    ops: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    loaded: set[int] = field(default_factory=set)  # steps any reader of the current run resumed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def summary(self) -> dict[str, Any]:
        return {"ops": dict(sorted(self.ops.items())), **dict(sorted(self.counts.items()))}


@dataclass
class ActorsRun:
    """One trainer on ``root`` and ``actors`` actor threads for ``seconds``."""

    zygote: ActorZygote
    root: str
    work: str  # outside the root: the confirmed-steps file, the stop file, logs
    numel: int
    seconds: float
    actors: int
    rng: random.Random
    result: ActorsResult
    s3: bool = False
    storage_options: dict[str, Any] | None = None
    executor: str = "thread"
    op_timeout: float = 90.0
    run_no: int = 0
    _todo: set[str] = field(default_factory=set)
    _token: str = "?"

    def _cfg(self, **extra: Any) -> dict[str, Any]:
        return {"root": self.root, "numel": self.numel, "s3": self.s3, "executor": self.executor, **extra}

    def _log_tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.work, name), "rb") as f:
                return f.read()[-2500:].decode(errors="replace")
        except OSError:
            return ""

    # -- one actor thread
    def _actor_loop(self, index: int, seed: int, deadline: float, trainer: Child) -> None:
        rng = random.Random(seed)
        res = self.result
        names, weights = [n for n, _ in OPS], [w for _, w in OPS]
        while time.monotonic() < deadline and not trainer.exited:
            time.sleep(rng.choice([0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.4)]))
            with res.lock:  # every kind once early in each run, then at random
                todo = [n for n in names if n in self._todo]
                op = rng.choice(todo) if todo else rng.choices(names, weights)[0]
                self._todo.discard(op)
            child = self.zygote.start(
                self._cfg(mode="actor", op=op, log=os.path.join(self.work, f"actor{index}.log"))
            )
            try:
                text = child.wait_event("RESULT ", self.op_timeout)
            except TimeoutError:
                res.counts["hangs"] += 1
                res.fail(
                    f"run {self.run_no}: {op} (pid {child.pid}) did not finish within {self.op_timeout}s"
                )
                child.kill()
                child.wait(30)
                continue
            except RuntimeError as e:  # exited without a verdict
                res.fail(f"run {self.run_no}: {op}: {e}; log:\n{self._log_tail(f'actor{index}.log')}")
                continue
            code = child.wait(self.op_timeout)
            if code is None:
                res.counts["hangs"] += 1
                res.fail(f"run {self.run_no}: {op} (pid {child.pid}) did not exit after its verdict")
                child.kill()
            elif code != 0:
                res.fail(f"run {self.run_no}: {op} (pid {child.pid}) exited {code} after its verdict")
            out = json.loads(text[len("RESULT ") :])
            # a save in flight is named step_N.<owner token><random>: gc must never remove one
            # of the live trainer's (its trash, named after no owner, may go)
            stolen = [p for p in out.get("removed_paths", []) if "." + self._token in p.rsplit("/", 1)[-1]]
            if stolen:
                res.fail(f"run {self.run_no}: gc removed the live trainer's save in progress: {stolen}")
            with res.lock:
                res.ops[op] += 1
                res.counts["op_ms_max"] = max(res.counts["op_ms_max"], out.get("ms", 0))
                for k in ("checked", "gone", "listed", "leftovers", "removed", "in_use", "aborted",
                          "uncommitted_warnings"):  # fmt: skip
                    if out.get(k):
                        res.counts[f"{op}_{k}"] += out[k]
                if op == "resume" and out.get("step") is not None:
                    res.loaded.add(out["step"])
                if op == "construct" and out.get("ok"):
                    res.counts["root_busy_refusals"] += 1
            if not out.get("ok"):
                res.counts[f"{op}_failed"] += 1
                res.fail(f"run {self.run_no}: {op} (pid {child.pid}): {out.get('why')}")

    # -- the whole run; returns the confirmed (step, tier) pairs in order
    def run(self) -> list[tuple[int, str]]:
        res = self.result
        confirmed_path = os.path.join(self.work, "confirmed.txt")
        stop = os.path.join(self.work, "stop")
        cfg = self._cfg(
            mode="trainer",
            seed=self.rng.randrange(1 << 30),
            confirmed=confirmed_path,
            stop=stop,
            save_timeout=self.op_timeout,
            train_ms=self.rng.choice([0, 2, 5]),
            log=os.path.join(self.work, "trainer.log"),
        )
        self._todo = {n for n, _ in OPS}
        res.loaded = set()
        trainer = self.zygote.start(cfg)
        try:
            self._token = trainer.wait_event("READY ", 180).split()[1]
            trainer.wait_event("CONFIRMED ", 180)
            deadline = time.monotonic() + self.seconds
            threads = [
                threading.Thread(
                    target=self._actor_loop,
                    args=(i, self.rng.randrange(1 << 30), deadline, trainer),
                    name=f"actor-{i}",
                    daemon=True,
                )
                for i in range(self.actors)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.seconds + 3 * self.op_timeout)
                if t.is_alive():
                    res.counts["hangs"] += 1
                    res.fail(f"run {self.run_no}: actor thread {t.name} is stuck")
            with open(stop, "w"):
                pass
            code = trainer.wait(self.op_timeout + 60)
            if code is None:
                res.counts["hangs"] += 1
                res.fail(
                    f"run {self.run_no}: the trainer did not stop; log:\n{self._log_tail('trainer.log')}"
                )
        finally:
            trainer.kill()
        trainer.drain()
        errors = [e for e in trainer.seen if e.startswith("ERROR")]
        res.counts["trainer_errors"] += len(errors)
        if errors or code != 0 or not any(e.startswith("CLOSED") for e in trainer.seen):
            res.fail(
                f"run {self.run_no}: the trainer exited {code} with {errors[:3]}; "
                f"log:\n{self._log_tail('trainer.log')}"
            )
        with open(confirmed_path) as f:
            return [(int(s), tier) for s, tier in (line.split() for line in f if line.strip())]
