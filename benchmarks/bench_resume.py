"""Resume throughput and host memory, cold page cache: asyncckpt against the disk's limit and DCP.

For each ``--sizes`` entry (GiB) the state is ~100 seeded fp32 tensors of mixed sizes (80 matrices
whose sizes span ~250x, 20 small vectors of odd lengths, interleaved; the total is not a multiple
of 4096, so the O_DIRECT tail is exercised).  It is saved once with
``AsyncCheckpointer(root, state).save_async(1).result(); close()``, and the same bytes, tensor
after tensor, are written to a raw file.  The parent then frees the state; every load runs in a
fresh child process (one per method per repetition, in an order that rotates per repetition),
so neither the allocator's caches nor the page cache of an earlier method carry over.

In each child, untimed: allocate the destination (touched), build what is "allocated before
timing", ``gc.collect()``, read the baseline ``VmRSS``; ``os.sync()``, then
``posix_fadvise(DONTNEED)`` on every file under the step directory and on the raw file; the
cache is checked cold with ``mincore`` on each file (``resident_after_drop`` should be 0) and
``/proc/meminfo`` ``Cached:`` is read before and after the drop.  ``VmHWM`` is reset through
``/proc/self/clear_refs`` ("5") and ``VmRSS`` is sampled every 5 ms in a thread; then, timed:

  raw_direct    O_DIRECT ``preadv`` of the raw file in 64 MiB chunks into a page-aligned,
                touched ``mmap.mmap(-1, n)``; the unaligned tail read after clearing O_DIRECT
                with ``fcntl(F_SETFL)``.  The hardware's limit.
  raw_buffered  plain buffered ``readinto`` (64 MiB) of the raw file into the same kind of buffer.
  resume_fn     ``asyncckpt.resume(root, live)``: allocates its shadow buffers while timed.
  ckpt_resume   ``AsyncCheckpointer(root, live).resume()``, the checkpointer (and its staging pool,
                pre-faulted) built before timing, on the same root after the saving one closed.
  dcp_load      stock ``torch.distributed.checkpoint.load(live, checkpoint_id=step_dir,
                no_dist=True)``.

``live`` is a dict of zero-filled tensors of the same names and shapes.  After timing, untimed,
every loaded tensor (or the raw buffer's slice of it) is checked bit-exactly: its SHA-256 must
equal that of the tensor the parent generated.  Peak extra RSS = ``VmHWM`` after the reset minus
the baseline (the 5 ms sample peak and ``ru_maxrss`` - baseline are recorded too), reported as a
ratio to the state's bytes: buffers built before timing (the raw buffers, the live state, (c)'s
staging pool) are in the baseline, so raw reads and ``ckpt_resume`` should add ~0 and
``resume_fn`` ~1x (its shadows).  The page cache is not RSS.

GB/s = state bytes / wall seconds (1e9), from the median wall time of ``--reps``.  ``vs_direct``
= GB/s / raw_direct's GB/s (the fraction of the hardware's limit); ``vs_dcp`` = GB/s / dcp_load's
GB/s (the speed-up over stock DCP).  Absolute figures are of one machine and its other load.

Usage: ``python -m benchmarks.bench_resume --sizes 1,4 --dir DIR --reps 3 --json out.json``
       ``python -m benchmarks.bench_resume --sizes 0.05``   (a smoke run)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import fcntl
import gc
import hashlib
import json
import math
import mmap
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
GB = 1e9
CHUNK = 64 * MiB
DIO_ALIGN = 4096
N_TENSORS = 100
SAMPLE_S = 0.005
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ["raw_direct", "raw_buffered", "resume_fn", "ckpt_resume", "dcp_load"]
LABELS = {
    "raw_direct": "(a) raw O_DIRECT read",
    "raw_buffered": "(a2) raw buffered read",
    "resume_fn": "(b) asyncckpt.resume()",
    "ckpt_resume": "(c) AsyncCheckpointer.resume()",
    "dcp_load": "(d) dcp.load (stock)",
}


# ----------------------------------------------------------------------------- state


def tensor_specs(size_gib: float, n: int = N_TENSORS, seed: int = 0) -> list[tuple[str, list[int]]]:
    """(name, shape) of ~``n`` fp32 tensors, ``size_gib`` in all (to within 4 KiB), seeded.

    One in five is a small vector of an odd length (256..8191 elements); the rest are
    ``(rows, 1024)`` matrices with log-uniform weights spanning 256x.  The largest absorbs the
    rounding.  Interleaved in a seeded order.
    """
    g = random.Random(seed)
    total = int(size_gib * GiB) // 4
    n_small = n // 5
    small = [g.randint(256, 8191) | 1 for _ in range(n_small)]
    weights = [math.exp(g.uniform(0.0, math.log(256.0))) for _ in range(n - n_small)]
    left = max(total - sum(small), 1024 * len(weights))
    mats = [max(1024, int(left * w / sum(weights)) // 1024 * 1024) for w in weights]
    big = max(range(len(mats)), key=mats.__getitem__)
    mats[big] = max(1024, mats[big] + (left - sum(mats)) // 1024 * 1024)
    kinds = [("w", m) for m in mats] + [("b", s) for s in small]
    g.shuffle(kinds)
    out = []
    for i, (kind, numel) in enumerate(kinds):
        shape = [numel // 1024, 1024] if kind == "w" else [numel]
        out.append((f"t{i:03d}_{kind}", shape))
    return out


def make_state(specs: list[tuple[str, list[int]]], seed: int = 0) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float32) for name, shape in specs}


def _sha256(buf: Any) -> str:
    return hashlib.sha256(buf).hexdigest()  # releases the GIL: threads hash in parallel


def digests(buffers: list[Any]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
        return list(ex.map(_sha256, buffers))


def _tensor_bytes(t: Any) -> memoryview:
    return memoryview(t.contiguous().view(-1).numpy()).cast("B")


# ----------------------------------------------------------------------------- page cache

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = mmap.PAGESIZE


def resident_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (mincore on a read-only shared mapping), or None."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            resident = sum(1 for v in bytes(vec) if v & 1)
            return min(size, resident * PAGE)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def files_under(step_dir: str) -> list[str]:
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs)


def _meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _total_resident(paths: list[str]) -> int | None:
    sizes = [resident_bytes(p) for p in paths]
    return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


def drop_cache(paths: list[str]) -> dict[str, Any]:
    """``os.sync()``, then DONTNEED on each file; residency and ``Cached:`` around it."""
    os.sync()
    out: dict[str, Any] = {
        "cached_before_kib": _meminfo_kib("Cached"),
        "resident_before": _total_resident(paths),
    }
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    out["cached_after_kib"] = _meminfo_kib("Cached")
    out["resident_after_drop"] = _total_resident(paths)
    out["file_bytes"] = sum(os.path.getsize(p) for p in paths)
    return out


# ----------------------------------------------------------------------------- memory


class RssSampler:
    """Peak ``VmRSS`` (bytes), sampled every 5 ms on a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> RssSampler:
        self.peak = _status_kib("VmRSS") * 1024
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status_kib("VmRSS") * 1024)


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- child


def _aligned_buffer(n: int) -> mmap.mmap:
    mm = mmap.mmap(-1, max(n, 1))  # anonymous: page aligned
    mv = memoryview(mm)
    for off in range(0, n, CHUNK):  # touch every page now, not while timed
        mv[off : off + CHUNK] = bytes(min(CHUNK, n - off))
    mv.release()
    return mm


def read_direct(path: str, buf: mmap.mmap, n: int) -> None:
    """O_DIRECT reads of the 4096-aligned part, 64 MiB at a time; the tail without O_DIRECT."""
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        aligned = n // DIO_ALIGN * DIO_ALIGN
        off = 0
        while off < aligned:
            got = os.preadv(fd, [mv[off : min(off + CHUNK, aligned)]], off)
            if got <= 0:
                raise OSError(f"short O_DIRECT read at {off} of {path}")
            off += got
        if aligned < n:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            while off < n:
                got = os.preadv(fd, [mv[off:n]], off)
                if got <= 0:
                    raise OSError(f"short read at {off} of {path}")
                off += got
    finally:
        os.close(fd)
        mv.release()


def read_buffered(path: str, buf: mmap.mmap, n: int) -> None:
    mv = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            off = 0
            while off < n:
                got = f.readinto(mv[off : min(off + CHUNK, n)])
                if not got:
                    raise OSError(f"short read at {off} of {path}")
                off += got
    finally:
        mv.release()


def child(spec_path: str, method: str, out_path: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    import asyncckpt

    with open(spec_path) as f:
        spec = json.load(f)
    n, entries = spec["state_bytes"], spec["entries"]
    res: dict[str, Any] = {"method": method, "pid": os.getpid()}
    buf: mmap.mmap | None = None
    live: dict[str, Any] | None = None
    ck: Any = None
    if method in ("raw_direct", "raw_buffered"):
        buf = _aligned_buffer(n)
    else:
        live = {e["name"]: torch.zeros(e["shape"], dtype=torch.float32) for e in entries}
    if method == "ckpt_resume":
        ck = asyncckpt.AsyncCheckpointer(spec["root"], live)  # staging pool allocated, pre-faulted
    gc.collect()
    base = _status_kib("VmRSS") * 1024
    res["baseline_rss"] = base
    res["cold"] = drop_cache(spec["files"] + [spec["raw"]])
    hwm_ok = reset_hwm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            if method == "raw_direct":
                read_direct(spec["raw"], buf, n)  # type: ignore[arg-type]
            elif method == "raw_buffered":
                read_buffered(spec["raw"], buf, n)  # type: ignore[arg-type]
            elif method == "resume_fn":
                res["step"] = asyncckpt.resume(spec["root"], live)  # type: ignore[arg-type]
            elif method == "ckpt_resume":
                res["step"] = ck.resume()
            elif method == "dcp_load":
                dcp.load(live, checkpoint_id=spec["step_dir"], no_dist=True)
            else:
                raise ValueError(method)
            wall = time.perf_counter() - t0
    res["wall_s"] = wall
    res["hwm_reset"] = hwm_ok
    res["peak_extra_hwm"] = _status_kib("VmHWM") * 1024 - base if hwm_ok else None
    res["peak_extra_sampled"] = sampler.peak - base
    res["peak_extra_ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    res["peak_extra"] = (
        res["peak_extra_hwm"] if hwm_ok else max(res["peak_extra_sampled"], res["peak_extra_ru_maxrss"])
    )
    res["resident_after_load"] = _total_resident(spec["files"] + [spec["raw"]])
    # untimed: bit-exact check against the parent's digests
    if buf is not None:
        mv = memoryview(buf)
        views = [mv[e["offset"] : e["offset"] + e["nbytes"]] for e in entries]
    else:
        assert live is not None
        views = [_tensor_bytes(live[e["name"]]) for e in entries]
    got = digests(views)
    bad = [e["name"] for e, d in zip(entries, got) if d != e["sha256"]]
    res["verified"] = not bad
    res["mismatched"] = bad[:10]
    if method in ("resume_fn", "ckpt_resume") and res.get("step") != 1:
        res["verified"] = False
        res["mismatched"].append(f"returned step {res.get('step')!r}, expected 1")
    del views
    if ck is not None:
        ck.close()
    with open(out_path, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- parent


def prepare(size_gib: float, work: str, seed: int) -> dict[str, Any]:
    """Save the state with asyncckpt and write the raw file; returns the children's spec."""
    import asyncckpt

    specs = tensor_specs(size_gib, seed=seed)
    t = time.perf_counter()
    state = make_state(specs, seed)
    gen_s = time.perf_counter() - t
    root, raw = os.path.join(work, "ckpt"), os.path.join(work, "raw.bin")
    t = time.perf_counter()
    ck = asyncckpt.AsyncCheckpointer(root, state)
    ck.save_async(1).result()
    ck.close()
    save_s = time.perf_counter() - t
    entries, off = [], 0
    buffers = []
    with open(raw, "wb", buffering=0) as f:
        for name, shape in specs:
            mv = _tensor_bytes(state[name])
            f.write(mv)
            buffers.append(mv)
            entries.append({"name": name, "shape": shape, "offset": off, "nbytes": mv.nbytes})
            off += mv.nbytes
        os.fsync(f.fileno())
    for e, d in zip(entries, digests(buffers)):
        e["sha256"] = d
    del buffers, state
    gc.collect()
    step_dir = os.path.join(root, "step_000000001")
    if not os.path.isdir(step_dir):
        raise RuntimeError(f"expected {step_dir} after saving step 1; found {os.listdir(root)}")
    files = files_under(step_dir)
    assert os.path.getsize(raw) == off
    return {
        "size_gib": size_gib,
        "state_bytes": off,
        "n_tensors": len(entries),
        "root": root,
        "step_dir": step_dir,
        "raw": raw,
        "files": files,
        "ckpt_file_bytes": sum(os.path.getsize(p) for p in files),
        "entries": entries,
        "generate_s": gen_s,
        "save_s": save_s,
    }


def run_child(spec_path: str, method: str, work: str, timeout: float) -> dict[str, Any]:
    out = os.path.join(work, f"result_{method}.json")
    if os.path.exists(out):
        os.unlink(out)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.bench_resume", "--child", method, spec_path, out]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0 or not os.path.exists(out):
        return {"method": method, "error": f"rc {proc.returncode}: {proc.stderr[-2000:]}"}
    with open(out) as f:
        return json.load(f)


def summarize(spec: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    n = spec["state_bytes"]
    out: dict[str, Any] = {}
    for m, rs in runs.items():
        ok = [r for r in rs if "wall_s" in r]
        if not ok:
            out[m] = {"error": rs[0].get("error") if rs else "not run"}
            continue
        walls = [r["wall_s"] for r in ok]
        med = statistics.median(walls)
        peaks = [r["peak_extra"] for r in ok]
        cold = [r["cold"] for r in ok]
        out[m] = {
            "wall_s": walls,
            "median_wall_s": med,
            "gbps": n / med / GB,
            "gbps_min": n / max(walls) / GB,
            "gbps_max": n / min(walls) / GB,
            "peak_extra_bytes": peaks,
            "peak_extra_x_state": max(peaks) / n,
            "peak_extra_sampled_x_state": max(r["peak_extra_sampled"] for r in ok) / n,
            "verified": all(r["verified"] for r in ok) and len(ok) == len(rs),
            "cold_resident_after_drop": [c["resident_after_drop"] for c in cold],
            "cold_resident_before_drop": [c["resident_before"] for c in cold],
            "cached_drop_mib": [(c["cached_before_kib"] - c["cached_after_kib"]) / 1024 for c in cold],
            "resident_after_load": [r["resident_after_load"] for r in ok],
            "errors": [r["error"] for r in rs if "error" in r],
            "runs": rs,
        }
    for ref, key in (("raw_direct", "vs_direct"), ("dcp_load", "vs_dcp")):
        base = out.get(ref, {}).get("gbps")
        for r in out.values():
            if "gbps" in r:
                r[key] = r["gbps"] / base if base else None
    return out


def machine_info(directory: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "mem_total_gib": _meminfo_kib("MemTotal") / 2**20,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dir": directory,
    }
    try:
        import asyncckpt

        info["asyncckpt"] = asyncckpt.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        df = subprocess.run(["df", "-T", directory], capture_output=True, text=True, timeout=10).stdout.split(
            "\n"
        )
        cols = df[1].split()
        info["fs_device"], info["fs_type"] = cols[0], cols[1]
    except Exception:
        pass
    try:
        st = os.stat(directory)
        base = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        for q in ("queue/rotational", "queue/max_sectors_kb", "device/model"):
            p = os.path.join(base, q)
            if not os.path.exists(p):
                p = os.path.join(base, "..", q)  # a partition: its disk's queue
            if os.path.exists(p):
                with open(p) as f:
                    info[q.replace("/", "_")] = f.read().strip()
    except Exception:
        pass
    return info


def _fmt_table(spec: dict[str, Any], summary: dict[str, Any]) -> str:
    n = spec["state_bytes"]
    lines = [
        f"\n{spec['size_gib']:g} GiB: {n} bytes in {spec['n_tensors']} fp32 tensors; checkpoint "
        f"{spec['ckpt_file_bytes']} bytes in {len(spec['files'])} files (saved in {spec['save_s']:.1f}s)",
        f"{'method':32s} {'GB/s':>7s} {'(min-max)':>15s} {'vs O_DIRECT':>11s} {'vs dcp':>7s} "
        f"{'peak +RSS':>10s} {'cold':>5s} {'exact':>5s}",
    ]
    for m in METHODS:
        r = summary.get(m)
        if r is None:
            continue
        if "gbps" not in r:
            lines.append(f"{LABELS[m]:32s} ERROR {r.get('error', '')[:200]}")
            continue
        fb = spec["ckpt_file_bytes"] + n
        cold = all(x is not None and x <= 0.01 * fb for x in r["cold_resident_after_drop"])

        def ratio(x: float | None) -> str:
            return f"{x:.2f}x" if x is not None else "-"

        lines.append(
            f"{LABELS[m]:32s} {r['gbps']:7.2f} {r['gbps_min']:7.2f}-{r['gbps_max']:<7.2f} "
            f"{ratio(r.get('vs_direct')):>11s} {ratio(r.get('vs_dcp')):>7s} "
            f"{r['peak_extra_x_state']:9.2f}x {'yes' if cold else 'NO':>5s} "
            f"{'yes' if r['verified'] else 'NO':>5s}"
        )
    drops = [d for r in summary.values() for d in r.get("cached_drop_mib", [])]
    if drops:
        lines.append(
            f"Cached: dropped {min(drops):.0f}..{max(drops):.0f} MiB per drop (files {(spec['ckpt_file_bytes'] + n) / MiB:.0f} MiB; "
            "other processes move it too); 'cold' = mincore residency <= 1% after the drop"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[2], argv[1], argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4", help="state sizes in GiB, comma separated")
    ap.add_argument("--dir", default=None, help="parent directory for the files (default: the temp dir)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, default=1800.0)
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {METHODS}")
    parent = os.path.abspath(args.dir or tempfile.gettempdir())
    os.makedirs(parent, exist_ok=True)
    work_all = tempfile.mkdtemp(prefix="bench_resume_", dir=parent)
    result: dict[str, Any] = {
        "machine": machine_info(work_all),
        "args": vars(args),
        "notes": {
            "gbps": "state bytes / median wall seconds, 1e9 bytes/s",
            "vs_direct": "GB/s over raw_direct's GB/s (fraction of the disk's limit)",
            "vs_dcp": "GB/s over dcp_load's GB/s (speed-up over stock DCP)",
            "peak_extra_x_state": "max over reps of (VmHWM after a clear_refs reset, minus VmRSS before "
            "timing) / state bytes; what is built before timing (buffers, live state, (c)'s pool) is "
            "in the baseline",
            "cold": "os.sync + posix_fadvise(DONTNEED) per file before each rep, residency by mincore",
        },
        "sizes": {},
    }
    try:
        for size in sizes:
            work = os.path.join(work_all, f"{size:g}GiB")
            os.makedirs(work)
            spec = prepare(size, work, args.seed)
            spec_path = os.path.join(work, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            for rep in range(args.reps):
                order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
                for m in order:
                    r = run_child(spec_path, m, work, args.child_timeout)
                    r["rep"] = rep
                    runs[m].append(r)
                    brief = (
                        f"{spec['state_bytes'] / r['wall_s'] / GB:.2f} GB/s, +RSS "
                        f"{r['peak_extra'] / spec['state_bytes']:.2f}x, exact={r['verified']}"
                        if "wall_s" in r
                        else r.get("error", "")[-300:]
                    )
                    print(f"  {size:g} GiB rep {rep} {m}: {brief}", flush=True)
            summary = summarize(spec, runs)
            meta = {k: v for k, v in spec.items() if k != "entries"}
            meta["shapes"] = [[e["name"], e["shape"]] for e in spec["entries"]]
            result["sizes"][f"{size:g}"] = {"spec": meta, "methods": summary}
            print(_fmt_table(spec, summary), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if not args.keep:
            shutil.rmtree(work_all, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    bad = [
        (s, m)
        for s, r in result["sizes"].items()
        for m, x in r["methods"].items()
        if not x.get("verified", False)
    ]
    if bad:
        print(f"NOT verified or failed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
