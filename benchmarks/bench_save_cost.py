"""The whole cost of a save: CPU per GiB, time to durable, page cache left behind.

For one state of ``--mib`` MiB (``--tensors`` float32 tensors), each method saves it
``--reps`` times into a fresh directory on ``--dir`` and is measured from the call until its
bytes are durable (fsync'd, committed):

- ``memcpy floor``: a copy of the state into a touched buffer (what the trainer's stall must
  cost at least; CPU only, nothing is written);
- ``raw O_DIRECT write``: the same bytes from page-aligned memory with ``O_DIRECT`` in 32 MiB
  writes, then fsync: what the device takes, the reference for time to durable;
- ``raw buffered write``: the same bytes through the page cache, then fsync;
- ``torch.save + fsync``, ``dcp.save``, ``dcp.async_save`` (thread): the alternatives;
- ``asyncckpt thread`` and ``asyncckpt process``: ``save_async`` until the handle's result;
  ``asyncckpt thread, write_during_copy``: the thread writer started before the copy ends.

CPU is that of the trainer and the writer together: ``getrusage`` of this process (every
thread) plus, for the process executor, the writer process's ``/proc/PID/stat`` ticks.
"Page cache left" is the bytes of the written files still cached afterwards (``mincore``).
The checkpointers are built, and save once, before timing (allocation and first-save work
are not part of a save's cost).  Ratios are against the same run's memcpy floor (CPU) and
raw ``O_DIRECT`` write (time).  ``os.sync()`` and a cache drop of the previous files run
between measurements.

Usage: ``python -m benchmarks.bench_save_cost [--mib 256] [--tensors 16] [--reps 3]
[--dir DIR] [--json out.json]``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from asyncckpt import AsyncCheckpointer, WriterOptions
from benchmarks.bench_resume import resident_bytes

PIECE = 32 << 20


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _writer_pids() -> list[int]:
    """This process's writer-process children (``asyncckpt._writer_proc``)."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == me:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"_writer_proc" in f.read():
                        out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_all(pids: list[int]) -> float:
    """This process's CPU and that of the writer processes ``pids`` (found beforehand: the
    scan of /proc costs milliseconds, which would be charged to the measured run)."""
    return _cpu_self() + sum(_cpu_of(p) for p in pids)


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def _cached(path: str) -> int:
    return sum(resident_bytes(p) or 0 for p in _files(path))


def _drop(path: str) -> None:
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _mv(t: torch.Tensor) -> memoryview:
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_state(mib: int, n: int) -> dict[str, torch.Tensor]:
    per = (mib << 20) // 4 // n
    g = torch.Generator().manual_seed(0)
    return {f"t{i:03d}": torch.randn(per, generator=g) for i in range(n)}


class Bench:
    def __init__(self, state: dict[str, torch.Tensor], parent: str) -> None:
        self.state = state
        self.nbytes = sum(t.numel() * t.element_size() for t in state.values())
        self.parent = parent
        self.n = 0
        self.flat = torch.cat([t.view(-1) for t in state.values()])
        self.mm = mmap.mmap(-1, self.nbytes)  # page aligned, for the raw O_DIRECT write
        self.aligned = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.aligned.copy_(self.flat.view(torch.uint8))
        self.touched = torch.empty_like(self.flat)
        self.touched.zero_()

    def path(self, tag: str) -> str:
        self.n += 1
        return os.path.join(self.parent, f"{tag}-{self.n}")

    def measure(self, run: Callable[[str], float | None], tag: str, writes: bool = True) -> dict[str, Any]:
        """``run(path)`` does one save and returns its stall (or None); times and CPU around it."""
        path = self.path(tag)
        os.sync()
        pids = _writer_pids()
        cpu0, t0 = _cpu_all(pids), time.perf_counter()
        stall = run(path)
        wall = time.perf_counter() - t0
        cpu = _cpu_all(pids) - cpu0
        cached = _cached(path) if writes else 0
        if writes:
            _drop(path)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return {"durable_s": wall, "cpu_s": cpu, "cached_bytes": cached, "stall_s": stall}

    # -- the methods
    def memcpy(self, path: str) -> None:
        self.touched.copy_(self.flat)
        return None

    @staticmethod
    def _raw_write(path: str, src: torch.Tensor, flags: int) -> None:
        """``src``'s bytes in 32 MiB writes, then fsync."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            mv, done = _mv(src), 0
            while done < mv.nbytes:
                done += os.write(fd, mv[done : done + PIECE])
            os.fsync(fd)
        finally:
            os.close(fd)

    def raw_direct(self, path: str) -> None:
        self._raw_write(path, self.aligned, os.O_DIRECT)  # page-aligned memory

    def raw_buffered(self, path: str) -> None:
        self._raw_write(path, self.flat, 0)

    def torch_save(self, path: str) -> None:
        with open(path, "wb") as f:
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        return None

    def dcp_save(self, path: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(self.state, checkpoint_id=path)
        return None

    def dcp_async(self, path: str) -> float:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fut = dcp.async_save(self.state, checkpoint_id=path)
        stall = time.perf_counter() - t0
        fut.result()
        return stall

    def asyncckpt(self, ck: AsyncCheckpointer, step: list[int]) -> Callable[[str], float]:
        def run(path: str) -> float:
            step[0] += 1
            t0 = time.perf_counter()
            h = ck.save_async(step[0])
            stall = time.perf_counter() - t0
            info = h.result()
            os.makedirs(path)
            os.rename(info.path, os.path.join(path, "step"))  # measured (cache), then removed
            return stall

        return run


def run(mib: int, n_tensors: int, reps: int, parent: str, executors: list[str]) -> dict[str, Any]:
    state = make_state(mib, n_tensors)
    b = Bench(state, parent)
    methods: dict[str, tuple[Callable[[str], float | None], bool]] = {
        "memcpy floor": (b.memcpy, False),
        "raw O_DIRECT write": (b.raw_direct, True),
        "raw buffered write": (b.raw_buffered, True),
        "torch.save + fsync": (b.torch_save, True),
        "dcp.save": (b.dcp_save, True),
        "dcp.async_save": (b.dcp_async, True),
    }
    cks = []
    settings = [(f"asyncckpt {ex}", WriterOptions(executor=ex)) for ex in executors]
    if "thread" in executors:  # the thread writer writing while the trainer still copies
        settings.append(("asyncckpt thread, write_during_copy", WriterOptions(write_during_copy=True)))
    for name, opts in settings:
        root = os.path.join(parent, f"root-{len(cks)}")
        ck = AsyncCheckpointer(root, state, writer=opts, keep=1000)
        ck.save_async(0).result()  # warm: the first save's one-time work is not a save's cost
        cks.append(ck)
        methods[name] = (b.asyncckpt(ck, [0]), True)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    try:
        for _ in range(reps):
            for name, (fn, writes) in methods.items():
                results[name].append(b.measure(fn, name.split()[0], writes))
    finally:
        for ck in cks:
            ck.close()
    gib = b.nbytes / 2**30
    summary: dict[str, Any] = {}
    for name, rs in results.items():
        summary[name] = {
            "durable_s": statistics.median(r["durable_s"] for r in rs),
            "cpu_s_per_gib": statistics.median(r["cpu_s"] for r in rs) / gib,
            "cached_mib": statistics.median(r["cached_bytes"] for r in rs) / 2**20,
            "stall_s": statistics.median(r["stall_s"] for r in rs) if rs[0]["stall_s"] is not None else None,
        }
    floor = summary["memcpy floor"]["cpu_s_per_gib"]
    raw = summary["raw O_DIRECT write"]["durable_s"]
    for name, s in summary.items():
        s["cpu_x_memcpy"] = s["cpu_s_per_gib"] / floor if floor else None
        s["speed_x_raw_direct"] = raw / s["durable_s"] if name != "memcpy floor" else None
        s["gb_per_s"] = b.nbytes / s["durable_s"] / 1e9 if name != "memcpy floor" else None
    return {
        "mib": mib,
        "tensors": n_tensors,
        "reps": reps,
        "dir": parent,
        "load_avg": os.getloadavg(),
        "summary": summary,
        "runs": results,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"state {r['mib']} MiB in {r['tensors']} tensors, median of {r['reps']}, on {r['dir']} "
        f"(load average {r['load_avg'][0]:.1f})",
        "| method | time to durable | GB/s | × raw O_DIRECT | CPU s/GiB | × memcpy | page cache left | stall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["summary"].items():

        def f(v: Any, fmt: str) -> str:
            return "–" if v is None else format(v, fmt)

        lines.append(
            f"| {name} | {f(s['durable_s'] if name != 'memcpy floor' else None, '.3f')} s | {f(s['gb_per_s'], '.2f')} "
            f"| {f(s['speed_x_raw_direct'], '.2f')} | {s['cpu_s_per_gib']:.3f} | {f(s['cpu_x_memcpy'], '.1f')} "
            f"| {s['cached_mib']:.0f} MiB | {f(s['stall_s'], '.4f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--dir", default=None, help="parent directory on the disk to measure (default: a temp dir)"
    )
    p.add_argument("--executors", default="thread,process")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    parent = tempfile.mkdtemp(prefix="ackpt-cost-", dir=a.dir)
    try:
        r = run(a.mib, a.tensors, a.reps, parent, a.executors.split(","))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    print(format_table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
