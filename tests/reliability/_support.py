"""Shared pieces of the reliability suite: knobs, the deterministic training state, reporting.

This module is imported by the test process *and* by the trainer children (through
``_trainer``), so it imports neither pytest nor anything from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------- knobs


def knob(name: str, default: int) -> int:
    """An integer knob from the environment (documented in docs/reliability.md)."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def seed() -> int:
    """ASYNCCKPT_FUZZ_SEED: the base seed of every randomized test (fixed by default)."""
    return knob("ASYNCCKPT_FUZZ_SEED", 20250611)


def slow_enabled() -> bool:
    return os.environ.get("ASYNCCKPT_SLOW", "") == "1"


# ----------------------------------------------------------------------------- reporting


def report(name: str, counts: dict[str, Any]) -> None:
    """Print the counts of a randomized test (visible with ``-s`` or ``-rP``).

    With ASYNCCKPT_RELIABILITY_REPORT=path, also append them to that file as one JSON line.
    """
    line = json.dumps({"test": name, **counts}, sort_keys=True, default=str)
    print(f"\n[reliability] {line}", flush=True)
    path = os.environ.get("ASYNCCKPT_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------- state
#
# The trainer's state is a pure function of the step, so the value any committed step must
# load back to can be recomputed anywhere, bit for bit.

_BASES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_BASE_LOCK = threading.Lock()

# Differential checkpoints cut tensors into parts of 4 MiB (chunkstore.PART_SIZE, not imported
# here so the children do not load the chunk store before they need it).
PART_ELEMS = (4 << 20) // 4  # float32 / int32 elements in one part
_FROZEN: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _bases(numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    with _BASE_LOCK:
        if numel not in _BASES:
            a = torch.remainder(torch.arange(numel, dtype=torch.int64), 1000).to(torch.float32)
            b = torch.arange(numel // 2, dtype=torch.int64).mul_(7)
            _BASES[numel] = (a, b)
        return _BASES[numel]


def _frozen(parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-independent contents of ``f`` (``parts`` parts, distinct, not very
    compressible) and of the first part of ``g``."""
    with _BASE_LOCK:
        if parts not in _FROZEN:
            gen = torch.Generator().manual_seed(4242)
            f = torch.randint(0, 1 << 22, (parts * PART_ELEMS,), generator=gen, dtype=torch.int32)
            g0 = torch.arange(PART_ELEMS, dtype=torch.int32).mul_(3)
            _FROZEN[parts] = (f.to(torch.float32), g0)  # integers < 2**24: exact in float32
        return _FROZEN[parts]


def make_state(numel: int, frozen_parts: int = 0) -> dict[str, Any]:
    """A zeroed state: four tensors of four dtypes (about 2.3 * numel * 4 bytes) + plain values.

    ``frozen_parts`` > 0 (for differential checkpoints) adds ``w.f``, ``frozen_parts`` parts
    of 4 MiB whose values never change, and ``w.g``, 5 MiB whose first part never changes and
    whose last MiB changes every third step; so most of each save is deduplicated.
    """
    w: dict[str, torch.Tensor] = {
        "a": torch.zeros(numel, dtype=torch.float32),
        "b": torch.zeros(numel // 2, dtype=torch.int64),
        "c": torch.zeros(numel // 4, dtype=torch.bfloat16),
        "d": torch.zeros(64, dtype=torch.float64),
    }
    if frozen_parts:
        w["f"] = torch.zeros(frozen_parts * PART_ELEMS, dtype=torch.float32)
        w["g"] = torch.zeros(PART_ELEMS + PART_ELEMS // 4, dtype=torch.int32)
    return {"w": w, "extra": {"step": -1, "hist": [-1, -1]}}


def fill(state: dict[str, Any], step: int) -> None:
    """Set ``state`` (in place) to its value at ``step``; every value is exact in its dtype."""
    w = state["w"]
    a, b = _bases(w["a"].numel())
    w["a"].copy_(a).add_(float(step * 4))  # integers < 2**24: exact in float32
    w["b"].copy_(b).add_(step)
    w["c"].fill_(float(step % 200))  # integers <= 256: exact in bfloat16
    w["d"].fill_(step + 0.5)
    if "f" in w:
        f, g0 = _frozen(w["f"].numel() // PART_ELEMS)
        w["f"].copy_(f)
        w["g"][:PART_ELEMS].copy_(g0)
        w["g"][PART_ELEMS:].fill_(step // 3)
    state["extra"]["step"] = step
    state["extra"]["hist"] = [step - 1, step]


def expected_state(numel: int, step: int, frozen_parts: int = 0) -> dict[str, Any]:
    s = make_state(numel, frozen_parts)
    fill(s, step)
    return s


def save_two_steps(root: str, numel: int) -> None:
    """Steps 1 and 2 of ``make_state(numel)``, each filled for its step, committed at ``root``."""
    from asyncckpt import AsyncCheckpointer

    state = make_state(numel)
    with AsyncCheckpointer(root, state) as ck:
        for s in (1, 2):
            fill(state, s)
            ck.save_async(s).result()


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(-1).view(torch.uint8).numpy())


def state_mismatch(state: dict[str, Any], step: int) -> str | None:
    """None if ``state`` is bit-for-bit the state at ``step``; otherwise what differs."""
    w = state["w"]
    want = expected_state(w["a"].numel(), step, w["f"].numel() // PART_ELEMS if "f" in w else 0)
    for k, t in want["w"].items():
        got = state["w"].get(k)
        if got is None or got.dtype != t.dtype or got.shape != t.shape or _raw(got) != _raw(t):
            return f"tensor w.{k} differs from step {step}"
    if dict(state["extra"]) != want["extra"]:
        return f"extra {state['extra']!r} != {want['extra']!r}"
    return None


# ----------------------------------------------------------------------------- S3 for children

S3_ENV = ("ASYNCCKPT_TEST_S3_ENDPOINT", "ASYNCCKPT_TEST_S3_KEY", "ASYNCCKPT_TEST_S3_SECRET")


def s3_env(opts: dict[str, Any]) -> dict[str, str]:
    """Environment for a child that must reach the moto server (never printed)."""
    return dict(
        zip(S3_ENV, (opts["client_kwargs"]["endpoint_url"], opts["key"], opts["secret"]), strict=True)
    )


def s3_options_from_env() -> dict[str, Any]:
    endpoint, key, secret = (os.environ[k] for k in S3_ENV)
    return {
        "key": key,
        "secret": secret,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


# ----------------------------------------------------------------------------- errors


def cause_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (cycle-safe)."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return out


# ----------------------------------------------------------------------------- process metrics


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> set[tuple[int, str]]:
    """(fd, what it points at) for every open file descriptor of this process."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except OSError:  # closed meanwhile (e.g. the fd of the listdir itself)
            pass
    return out


class Resources:
    """Open fds and live threads now; ``leaked()`` names those that appeared since and are
    still there.  Set differences, not counts: a thread or socket of an unrelated server (the
    session's moto server) that ends meanwhile is not mistaken for a leak being fixed."""

    def __init__(self) -> None:
        self.fds = fd_table()
        self.threads = {t.ident for t in threading.enumerate()}

    def leaked(self) -> list[str]:
        new_fds = sorted(fd_table() - self.fds)
        new_threads = [t.name for t in threading.enumerate() if t.ident not in self.threads]
        return [f"fd {fd} -> {target}" for fd, target in new_fds] + [f"thread {n}" for n in new_threads]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- file access audit

_AUDIT_LOCK = threading.Lock()
_AUDIT_LOG: list[tuple[str, str]] | None = None
_AUDIT_EVENTS = {
    "open": 0, "os.rename": 0, "os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "shutil.rmtree": 0,
    "os.truncate": 0, "os.chmod": 0, "os.symlink": 0, "os.link": 0, "os.listdir": 0, "os.scandir": 0,
}  # fmt: skip
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    log = _AUDIT_LOG
    if log is None or event not in _AUDIT_EVENTS or not args:
        return
    for a in args[:2] if event in ("os.rename", "os.symlink", "os.link") else args[:1]:
        if isinstance(a, (str, bytes, os.PathLike)):
            p = os.fsdecode(a)
            if p:
                log.append((event, p))


class FileAudit:
    """Records every path the process opens, lists, renames or removes while active.

    Uses ``sys.addaudithook`` (installed once; inert while no audit is active), so it sees the
    library's real file accesses, not a mock's.  Root can read any file, so unreadable decoys
    cannot prove that a file outside the checkpoint root was never touched; this can.
    """

    def __enter__(self) -> FileAudit:
        global _AUDIT_LOG, _HOOKED
        with _AUDIT_LOCK:
            if not _HOOKED:
                sys.addaudithook(_audit)
                _HOOKED = True
            self.log: list[tuple[str, str]] = []
            _AUDIT_LOG = self.log
        return self

    def __exit__(self, *exc: Any) -> None:
        global _AUDIT_LOG
        _AUDIT_LOG = None

    def touching(self, forbidden: str) -> list[tuple[str, str]]:
        """Accesses whose resolved path is ``forbidden`` or lies under it."""
        bad = os.path.realpath(forbidden)
        out = []
        for event, p in self.log:
            real = os.path.realpath(p)
            if real == bad or real.startswith(bad.rstrip("/") + "/"):
                out.append((event, p))
        return out
