"""Write and load throughput and host memory of asyncckpt, against raw file I/O and DCP.

Every number comes from one run on one machine, so the ratios are comparable; absolute
figures are not comparable across machines.  The state is ``--tensors`` fp32 tensors of mixed
sizes, ``--size-gib`` in all (``bench_stall``'s generator).  GB/s is always the state's byte
count (the payload) over seconds, so every method is charged for the same bytes.

Writes, after one untimed raw write; each repetition runs every method into a fresh directory,
in an order that rotates from one repetition to the next; ``os.sync()`` before each write:
1. raw write     the same byte count from one allocated buffer: 64 MiB ``write``s on an
                 unbuffered file, then ``fsync``.  The disk's ceiling.
2. asyncckpt     thread and process executors, 1 and 2 write threads (one checkpointer each,
                 built untimed): ``save_async`` until ``h.result()``, staging copy included,
                 and the background-only ``stats()[-1]["write_s"]`` (write, fsync, commit).
3. dcp.save      ``FileSystemWriter(sync_files=True)``, synchronous.
Loads, each after dropping the page cache (the method used is recorded):
4. raw read      ``readinto`` a preallocated buffer from the raw file of (1).
5. asyncckpt     ``resume(root, like, step=N)`` into preallocated, touched tensors.
6. dcp.load      the checkpoint of (3) into the same tensors.  Both loads are verified.
Host memory, each in a fresh spawned process so earlier phases cannot inflate ``ru_maxrss``:
7. peak RSS while the checkpointer is built and one save runs, minus the RSS before, against
   the pool (state bytes x max_inflight).  ``/proc/<pid>/status`` is sampled every 5 ms, for
   the writer process too.  Shared memory counts in the RSS of every process that touches it
   (``RssShmem``), so ``RssAnon`` is reported as well.
8. RSS growth over 100 consecutive saves of a 16 MiB state (max_inflight=2): after save 10
   against after save 100.

Usage: ``python -m benchmarks.bench_write [--size-gib 1.0] [--tensors 64] [--reps 3]
[--dir PARENT] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from asyncckpt import AsyncCheckpointer, SaveHandle, resume
from benchmarks.bench_stall import machine_info, make_state, nbytes

GB = 1e9
MIB = float(1 << 20)
CHUNK = 64 << 20
RAW, DCP = "raw write", "dcp.save (FileSystemWriter)"
CONFIGS = {f"asyncckpt {ex} wt={n}": (ex, n) for ex in ("thread", "process") for n in (1, 2)}
LOAD_FROM = "asyncckpt thread wt=1"  # whose checkpoint the load phase reads
LOADS = ("raw read", "asyncckpt resume", "dcp.load")
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous uint8 tensor (via numpy when it is installed)."""
    try:
        return t.numpy().data
    except RuntimeError:  # "Numpy is not available"
        return memoryview((ctypes.c_char * t.numel()).from_address(t.data_ptr())).cast("B")


def raw_io(view: memoryview, path: str, write: bool) -> float:
    """Seconds to write ``view`` to ``path`` and fsync, or to read it back into ``view``."""
    t0 = time.perf_counter()
    with open(path, "wb" if write else "rb", buffering=0) as f:
        off = 0
        while off < len(view):
            n = f.write(view[off : off + CHUNK]) if write else f.readinto(view[off : off + CHUNK])
            if not n:
                raise EOFError(f"{path}: short read at {off} of {len(view)} bytes")
            off += n
        if write:
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def save(ck: AsyncCheckpointer, step: int) -> SaveHandle:
    h = ck.save_async(step)
    assert h is not None  # on_busy="wait" (the default) always saves
    return h


def drop_cache(*paths: str) -> str:
    """Evict ``paths`` (files or trees) from the page cache; returns the method(s) that worked."""
    os.sync()
    if not all(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"nothing to evict at {paths}")
    trees = [os.path.join(d, n) for p in paths for d, _, ns in os.walk(p) for n in ns]
    for p in [p for p in paths if os.path.isfile(p)] + trees:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return "fadvise+drop_caches"
    except OSError:
        return "fadvise"


def cached_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Cached:")) / 2**20


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of ``pid`` in bytes ({} if it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in FIELDS:
                out[key] = int(val.split()[0]) * 1024
    return out


class RssSampler(threading.Thread):
    """Peak of each /proc status field per watched process, every 5 ms until ``done`` is set."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: dict[str, int | str] = {"trainer": "self"}
        self.peak: dict[str, dict[str, int]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while True:  # one last sample after ``done`` is set
            for name, pid in list(self.pids.items()):
                peak = self.peak.setdefault(name, {})
                for k, v in proc_status(pid).items():
                    peak[k] = max(peak.get(k, 0), v)
            if self.done.wait(0.005):
                return


def memory_child(size_gib: float, n_tensors: int, executor: str, root: str) -> dict[str, Any]:
    """(7), in a fresh process: peak RSS over construction plus one save, max_inflight=1."""
    state = make_state(size_gib, n_tensors)
    gc.collect()
    before, writer_start = proc_status(), {}
    s = RssSampler()
    s.start()
    ck = AsyncCheckpointer(root, {"model": state}, executor=executor, max_inflight=1)
    if executor == "process":
        s.pids["writer"] = pid = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
        writer_start = proc_status(pid)
    save(ck, 0).result()
    s.done.set()
    s.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    pool = ck._pipeline.stager.pool.nbytes if ck._pipeline.stager.pool is not None else 0
    ck.close()
    peak = s.peak["trainer"]
    return {
        "executor": executor,
        "pool_bytes": pool,
        "before": before,
        "peak": peak,  # the peak of each field on its own
        "peak_delta": peak["VmRSS"] - before["VmRSS"],
        "ratio_to_pool": (peak["VmRSS"] - before["VmRSS"]) / pool,
        "ru_maxrss_delta": maxrss - before["VmRSS"],
        "writer_at_start": writer_start,
        "writer_peak": s.peak.get("writer", {}),
    }


def growth_child(executor: str, root: str, saves: int = 100) -> dict[str, Any]:
    """(8), in a fresh process: RSS after save 10 and after save ``saves`` of a 16 MiB state."""
    ck = AsyncCheckpointer(root, {"model": make_state(1 / 64, 16)}, executor=executor, max_inflight=2)
    pids: dict[str, int | str] = {"trainer": "self"}
    if executor == "process":
        pids["writer"] = ck._pipeline.executor.process.pid  # type: ignore[union-attr]
    rss: dict[str, dict[str, int]] = {}

    def finish(h: SaveHandle) -> None:  # delete it once committed; sample after save 10 and the last
        shutil.rmtree(h.result().path)
        if h.step + 1 in (10, saves):
            rss.update({f"{who}@{h.step + 1}": proc_status(pid) for who, pid in pids.items()})

    prev = save(ck, 0)
    for step in range(1, saves):  # two saves in flight
        h = save(ck, step)
        finish(prev)
        prev = h
    finish(prev)
    ck.close()
    growth = {who: rss[f"{who}@{saves}"]["VmRSS"] - rss[f"{who}@10"]["VmRSS"] for who in pids}
    return {"executor": executor, "saves": saves, "rss": rss, "growth_bytes": growth}


def in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def measure_memory(size_gib: float, n_tensors: int, directory: str | None) -> tuple[dict[str, Any], ...]:
    """(7) and (8).  Run first: a spawned child inherits the parent's RSS peak (fork + exec)."""
    memory, growth = {}, {}
    for ex in ("thread", "process"):
        print(f"[bench_write] memory ({ex}) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_write-mem-", dir=directory) as d:
            memory[ex] = in_fresh_process(memory_child, size_gib, n_tensors, ex, d)
        with tempfile.TemporaryDirectory(prefix="bench_write-grow-", dir=directory) as d:
            growth[ex] = in_fresh_process(growth_child, ex, d)
    return memory, growth


def measure_writes(
    state: dict[str, torch.Tensor], view: memoryview, reps: int, root: str, keep: dict[str, str]
) -> dict[str, list[dict[str, float]]]:
    """(1)-(3).  The order of the methods rotates from one repetition to the next, after one
    untimed raw write (the first write of a run is slow here, whichever method makes it)."""
    writes: dict[str, list[dict[str, float]]] = {m: [] for m in (RAW, *CONFIGS, DCP)}
    with contextlib.ExitStack() as stack:
        cks = {}
        for name, (ex, wt) in CONFIGS.items():
            ck_root = os.path.join(root, name.replace(" ", "_"))
            cks[name] = AsyncCheckpointer(ck_root, {"model": state}, executor=ex, write_threads=wt)
            stack.callback(cks[name].close)

        def write(name: str, rep: int, rep_dir: str) -> dict[str, float]:
            os.sync()
            t0 = time.perf_counter()
            if name == RAW:
                keep["raw"] = os.path.join(rep_dir, "raw.bin")
                return {"s": raw_io(view, keep["raw"], write=True)}
            if name == DCP:
                keep["dcp"] = os.path.join(rep_dir, "dcp")
                dcp.save(state, storage_writer=FileSystemWriter(keep["dcp"], sync_files=True), no_dist=True)
                return {"s": time.perf_counter() - t0}
            info = save(cks[name], rep).result()
            t = time.perf_counter() - t0
            st = cks[name].stats()[-1]
            if rep == reps - 1 and name == LOAD_FROM:
                keep.update(ackpt_root=cks[name].root, ackpt_dir=info.path, ackpt_step=str(rep))
            else:
                shutil.rmtree(info.path)
            return {"s": t, **{k: st[k] for k in ("write_s", "stall_s", "bytes_written")}}

        write(RAW, -1, root)  # the untimed warm-up
        os.remove(keep["raw"])
        order = list(writes)
        for rep in range(reps):
            print(f"[bench_write] write rep {rep} ...", file=sys.stderr, flush=True)
            rep_dir = os.path.join(root, f"rep{rep}")
            os.makedirs(rep_dir)
            for name in order[rep % len(order) :] + order[: rep % len(order)]:
                writes[name].append(write(name, rep, rep_dir))
            if rep < reps - 1:
                shutil.rmtree(rep_dir)
    return writes


def measure_loads(
    state: dict[str, torch.Tensor], view: memoryview, reps: int, keep: dict[str, str], cache: dict[str, Any]
) -> dict[str, list[float]]:
    """(4)-(6), each after dropping the page cache; both checkpoint loads are verified."""
    loads: dict[str, list[float]] = {m: [] for m in LOADS}
    like = {k: torch.zeros_like(v) for k, v in state.items()}  # preallocated and touched
    cache["before_first_drop_gib"] = cached_gib()
    for rep in range(reps):
        print(f"[bench_write] load rep {rep} ...", file=sys.stderr, flush=True)
        cache["method"] = drop_cache(keep["raw"])
        cache.setdefault("after_first_drop_gib", cached_gib())
        loads["raw read"].append(raw_io(view, keep["raw"], write=False))
        for name in LOADS[1:]:
            for t in like.values():
                t.zero_()
            drop_cache(keep["dcp"] if name == "dcp.load" else keep["ackpt_dir"])
            t0 = time.perf_counter()
            if name == "dcp.load":
                dcp.load(like, checkpoint_id=keep["dcp"], no_dist=True)
            else:
                resume(keep["ackpt_root"], {"model": like}, step=int(keep["ackpt_step"]))
            loads[name].append(time.perf_counter() - t0)
            bad = [k for k in state if not torch.equal(state[k], like[k])]
            if bad:
                raise AssertionError(f"{name} loaded wrong data into {bad[:3]}")
    return loads


def run(size_gib: float, n_tensors: int, reps: int, directory: str | None) -> dict[str, Any]:
    """Measure everything; checkpoints go to a temp dir under ``directory`` (removed after)."""
    if reps < 1 or n_tensors < 1 or size_gib <= 0:
        raise ValueError("reps and n_tensors must be >= 1 and size_gib > 0")
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    memory, growth = measure_memory(size_gib, n_tensors, directory)
    state = make_state(size_gib, n_tensors)
    buf = torch.cat([t.reshape(-1).view(torch.uint8) for t in state.values()])  # allocated, touched
    view = byte_view(buf)
    root = tempfile.mkdtemp(prefix="bench_write-", dir=directory)
    keep: dict[str, str] = {}
    cache: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            # dcp warns on every no_dist call that it assumes a single process; that is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            writes = measure_writes(state, view, reps, root, keep)
            loads = measure_loads(state, view, reps, keep, cache)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = nbytes(state)
    result = summarize(n, writes, loads, memory, growth)
    result["config"] = {"size_gib": size_gib, "n_tensors": n_tensors, "reps": reps, "state_bytes": n}
    result["machine"] = {**machine_info(), "loadavg_end": os.getloadavg()}
    result["page_cache"] = cache
    return result


def summarize(
    n: int,
    writes: dict[str, list[dict[str, float]]],
    loads: dict[str, list[float]],
    memory: dict[str, Any],
    growth: dict[str, Any],
) -> dict[str, Any]:
    """Medians, GB/s and the ratios (all speed ratios: other time / this time)."""
    raw_s, dcp_s = med([r["s"] for r in writes[RAW]]), med([r["s"] for r in writes[DCP]])
    w_out: dict[str, dict[str, Any]] = {}
    for name, recs in writes.items():
        s = med([r["s"] for r in recs])
        m = w_out[name] = {"reps": recs, "median_s": s, "GBps": n / s / GB}
        m.update(x_raw=raw_s / s, x_dcp=dcp_s / s)
        if name in CONFIGS:
            bg = m["median_write_s"] = med([r["write_s"] for r in recs])
            m.update(bg_GBps=n / bg / GB, bg_x_raw=raw_s / bg)
            m["median_stall_s"] = med([r["stall_s"] for r in recs])
    l_out: dict[str, dict[str, Any]] = {k: {"reps_s": v, "median_s": med(v)} for k, v in loads.items()}
    for m in l_out.values():
        m["GBps"] = n / m["median_s"] / GB
    ours = l_out["asyncckpt resume"]["median_s"]
    speed = {f"x_{k.replace(' ', '_')}": l_out[k]["median_s"] / ours for k in ("raw read", "dcp.load")}
    targets = {
        "write >= 0.9x raw": {k: w_out[k]["x_raw"] >= 0.9 for k in CONFIGS},
        "write >= 1.5x dcp.save": {k: w_out[k]["x_dcp"] >= 1.5 for k in CONFIGS},
        "load >= 1.5x dcp.load": speed["x_dcp.load"] >= 1.5,
        "peak RSS <= pool + 10%": {k: m["ratio_to_pool"] <= 1.1 for k, m in memory.items()},
        "RSS growth 10->100 < 64MiB": {
            k: max(g["growth_bytes"].values()) < 64 * MIB for k, g in growth.items()
        },
    }
    out = {"writes": w_out, "loads": l_out, "resume_speed": speed, "memory": memory, "rss_growth": growth}
    return {**out, "targets": targets}


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:.0f}"


def format_table(r: dict[str, Any]) -> str:
    c, mach, cache = r["config"], r["machine"], r["page_cache"]
    lines = [
        f"state: {c['state_bytes'] / 2**30:.3f} GiB in {c['n_tensors']} fp32 tensors, {c['reps']} reps; "
        f"torch {mach['torch_version']}, {mach['cpu_count']} CPUs; page cache dropped by {cache['method']} "
        f"(Cached {cache['before_first_drop_gib']:.2f} -> {cache['after_first_drop_gib']:.2f} GiB)",
        f"{'write, fsync included':<28} {'median s':>8} {'GB/s':>6} {'x raw':>6} {'x dcp':>6} "
        f"{'bg s':>6} {'bg GB/s':>7} {'bg x raw':>8} {'stall ms':>8}",
    ]
    for name, m in r["writes"].items():
        row = f"{name:<28} {m['median_s']:>8.2f} {m['GBps']:>6.3f} {m['x_raw']:>6.2f} {m['x_dcp']:>6.2f}"
        if "median_write_s" in m:
            row += f" {m['median_write_s']:>6.2f} {m['bg_GBps']:>7.3f} {m['bg_x_raw']:>8.2f}"
            row += f" {m['median_stall_s'] * 1e3:>8.1f}"
        lines.append(row)
    lines.append(f"{'load, page cache dropped':<28} {'median s':>8} {'GB/s':>6}")
    lines += [f"{k:<28} {m['median_s']:>8.2f} {m['GBps']:>6.3f}" for k, m in r["loads"].items()]
    sp = r["resume_speed"]
    lines.append(
        f"asyncckpt resume: {sp['x_raw_read']:.2f}x raw read speed, {sp['x_dcp.load']:.2f}x dcp.load"
    )
    lines.append(
        f"{'host memory, MiB':<16} {'pool':>6} {'dRSS pk':>7} {'x pool':>6} {'dmaxrss':>7} {'dAnon pk':>8} "
        f"{'Shmem pk':>8} {'writer RSS':>11} {'writer Anon':>11} {'writer Shmem':>12}"
    )
    for ex, m in r["memory"].items():
        b, p, w0, wp = m["before"], m["peak"], m["writer_at_start"], m["writer_peak"]
        wr = [f"{_mib(w0[k])}->{_mib(wp[k])}" if wp else "-" for k in ("VmRSS", "RssAnon")]
        lines.append(
            f"{ex:<16} {_mib(m['pool_bytes']):>6} {_mib(m['peak_delta']):>7} {m['ratio_to_pool']:>6.2f} "
            f"{_mib(m['ru_maxrss_delta']):>7} {_mib(p['RssAnon'] - b['RssAnon']):>8} {_mib(p['RssShmem']):>8} "
            f"{wr[0]:>11} {wr[1]:>11} {_mib(wp.get('RssShmem')):>12}"
        )
    for ex, g in r["rss_growth"].items():
        desc = ", ".join(
            f"{who} {_mib(g['rss'][f'{who}@10']['VmRSS'])} -> {_mib(g['rss'][f'{who}@100']['VmRSS'])} MiB"
            for who in g["growth_bytes"]
        )
        lines.append(f"RSS after save 10 -> 100 of 16 MiB ({ex}, max_inflight=2): {desc}")
    lines.append("targets:")
    for t, v in r["targets"].items():
        verdict = {True: "met", False: "MISSED"}
        res = verdict[v] if isinstance(v, bool) else ", ".join(f"{k}: {verdict[ok]}" for k, ok in v.items())
        lines.append(f"  {t:<28} {res}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=None, help="state size (default 1.0; --quick 1/8)")
    p.add_argument("--tensors", type=int, default=64, help="number of fp32 tensors (default 64)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; --quick 2)")
    p.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    p.add_argument("--json", default=None, help="write the full results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 128 MiB, 2 reps")
    args = p.parse_args(argv)
    size = args.size_gib if args.size_gib is not None else (1 / 8 if args.quick else 1.0)
    reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    result = run(size, args.tensors, reps, args.dir)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
