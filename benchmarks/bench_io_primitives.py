"""I/O primitives for "save at the hardware's limit": checksums, O_DIRECT, page cache.

Research, not a benchmark of asyncckpt itself; nothing here imports it.  One run on one machine.

1. Checksums of a ``--mib`` in-memory buffer (a torch uint8 tensor of random bytes), one thread,
   median of ``--reps``, GB/s = 1e9 bytes/s: ``zlib.crc32`` (what asyncckpt uses), ``crc32c``,
   ``google-crc32c``, ``xxhash`` (xxh3_64, xxh3_128, xxh64) and ``blake3`` (max_threads=1), each
   one-shot and streamed in 64 MiB updates (which must agree).  GIL: (a) two threads on the two
   halves against one thread on the whole (``speedup`` ~2 when the GIL is released and two cores
   are free); (b) a Python loop on the main thread while another thread hashes the whole
   buffer repeatedly: its rate inside the calls (3 ms from either end trimmed off) against the
   loop alone (``main_thread_progress`` ~0 when the GIL is held; ``crc32c`` with
   ``gil_release_mode=0`` is the negative control).  (a) needs two idle cores; (b) does not.  Zero copy: which buffer views each function accepts (numpy view of
   the tensor, ``memoryview`` of a ``ctypes`` array at ``data_ptr()`` as asyncckpt builds them,
   a float32 view, the tensor itself), whether the digest matches that of ``bytes``, and the
   peak-RSS growth during a call on the whole buffer (``/proc/self/clear_refs`` 5 resets
   ``VmHWM``), which a copy would show as ~``--mib``.  Versions and PyPI release dates (when
   reachable) are recorded.
2. Direct I/O on ``--dir``, ``/dev/shm`` and ``/tmp`` (a dir on the same filesystem as one already
   measured is only probed): O_DIRECT support and alignment (statx ``STATX_DIOALIGN``, and probe
   writes with misaligned length and address); then writes of the whole buffer, in an order that
   rotates per repetition, each into a fresh file after ``os.sync()``:
   buffered (64 MiB ``os.write``s, fsync), buffered + ``posix_fadvise(DONTNEED)`` after fsync,
   buffered + per-chunk ``sync_file_range`` + DONTNEED (page cache bounded during the write), and
   O_DIRECT in 8, 16 and 64 MiB chunks (then fsync) from a page-aligned ``mmap`` buffer.  Each:
   GB/s, process CPU (``ru_utime + ru_stime``) per GiB, the machine's busy CPU (``/proc/stat``,
   includes kernel writeback threads and every other process), ``Cached:`` growth in
   ``/proc/meminfo`` and the file's resident fraction (``mincore``) afterwards.  Reads, cold
   (the file's pages dropped with ``posix_fadvise(DONTNEED)`` before each, checked with
   ``mincore``): buffered ``readinto`` against O_DIRECT ``preadv`` into an aligned buffer, plus a
   warm buffered read; every read is verified.  A size that is not a multiple of 4096 (the tail):
   one O_DIRECT write of it (EINVAL expected), and three ways that work: O_DIRECT for the aligned
   part then (a) reopen without O_DIRECT for the tail, (b) clear O_DIRECT on the same fd with
   ``fcntl(F_SETFL)``, (c) pad to the block and ``ftruncate``; each verified by an O_DIRECT read.
3. ``df -T``, ``statvfs``, the block device's queue limits, whether ``drop_caches`` is writable
   (checked, never written: it would drop the whole machine's cache).

Usage: ``python -m benchmarks.bench_io_primitives [--mib 256] [--reps 3] [--dir DIR]
[--json out.json] [--skip-checksums] [--skip-io]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import gc
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.bench_resume import resident_bytes

MiB = 1 << 20
GiB = 1 << 30
PAGE = mmap.PAGESIZE
DIO_ALIGN = 4096  # alignment used for O_DIRECT buffers, lengths and offsets
IO_CHUNK = 64 * MiB  # asyncckpt's _WRITE_CHUNK
TAIL_EXTRA = 12345  # bytes past a 4096 multiple, for the tail tests
TAIL_BASE = 32 * MiB

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4


# ----------------------------------------------------------------------------- helpers


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all processes and kernel threads)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


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


def _resident_fraction(path: str) -> float | None:
    """Fraction of the file's pages in the page cache (bench_resume's mincore probe)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    resident = resident_bytes(path)
    return None if resident is None else resident / size


def _drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _aligned(nbytes: int) -> tuple[mmap.mmap, torch.Tensor, int]:
    """A page-aligned anonymous mapping, a uint8 tensor over it, and its address."""
    mm = mmap.mmap(-1, nbytes)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    return mm, t, t.data_ptr()


def _mv(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of a contiguous tensor, no copy (asyncckpt's raw_bytes style)."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


def _pypi_release(name: str) -> dict[str, Any]:
    """Latest version and its first upload date from PyPI's JSON API (None when unreachable)."""
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=15) as r:
            d = json.load(r)
        v = d["info"]["version"]
        dated = sorted(
            (min(f["upload_time"] for f in files), ver) for ver, files in d["releases"].items() if files
        )
        return {
            "latest": v,
            "latest_uploaded": min(f["upload_time"] for f in d["releases"][v]),
            "releases": len(dated),
            "previous_uploads": [f"{ver} {up[:10]}" for up, ver in dated[-5:]],
            "requires_python": d["info"].get("requires_python"),
        }
    except Exception as e:  # offline machine: not an error for the benchmark
        return {"error": repr(e)}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _license(dist: str) -> str | None:
    from importlib import metadata

    try:
        m = metadata.metadata(dist)
    except metadata.PackageNotFoundError:
        return None
    return m.get("License-Expression") or m.get("License")


# ----------------------------------------------------------------------------- 1. checksums


@dataclasses.dataclass
class Hasher:
    name: str
    dist: str | None  # the PyPI distribution, None for the standard library
    oneshot: Callable[[Any], Any]  # whole buffer -> digest
    stream: Callable[[list[Any]], Any]  # chunks -> digest, the way a writer would update it
    update_full: Callable[[Any], Any]  # one streaming update of a whole buffer (for the GIL probe)
    note: str = ""


def _hashers() -> list[Hasher]:
    def zlib_stream(chunks: list[Any]) -> int:
        c = 0
        for ch in chunks:
            c = zlib.crc32(ch, c)
        return c

    hs = [
        Hasher(
            "zlib.crc32",
            None,
            zlib.crc32,
            zlib_stream,
            lambda b: zlib.crc32(b, 12345),
            f"zlib runtime {zlib.ZLIB_RUNTIME_VERSION}; CRC-32 (IEEE)",
        )
    ]
    try:
        import crc32c

        def c_stream(chunks: list[Any]) -> int:
            c = 0
            for ch in chunks:
                c = crc32c.crc32c(ch, value=c)
            return c

        hs.append(
            Hasher(
                "crc32c.crc32c",
                "crc32c",
                crc32c.crc32c,
                c_stream,
                lambda b: crc32c.crc32c(b, value=12345),
                f"hardware_based={crc32c.hardware_based}; CRC-32C (Castagnoli); gil_release_mode=-1 default",
            )
        )
        hs.append(
            Hasher(
                "crc32c (gil_release_mode=0)",
                "crc32c",
                lambda b: crc32c.crc32c(b, gil_release_mode=0),
                c_stream,
                lambda b: crc32c.crc32c(b, value=12345, gil_release_mode=0),
                "negative control for the GIL probes: holds the GIL for the whole call",
            )
        )
    except ImportError:
        pass
    try:
        import google_crc32c

        def g_stream(chunks: list[Any]) -> int:
            c = 0
            for ch in chunks:
                c = google_crc32c.extend(c, ch)
            return c

        hs.append(
            Hasher(
                "google_crc32c.value",
                "google-crc32c",
                google_crc32c.value,
                g_stream,
                lambda b: google_crc32c.extend(12345, b),
                f"implementation={google_crc32c.implementation}; CRC-32C (Castagnoli)",
            )
        )
    except ImportError:
        pass
    try:
        import xxhash

        for algo in ("xxh3_64", "xxh3_128", "xxh64"):
            cls = getattr(xxhash, algo)

            def x_stream(chunks: list[Any], cls: Any = cls) -> int:
                h = cls()
                for ch in chunks:
                    h.update(ch)
                return h.intdigest()

            def x_update(b: Any, cls: Any = cls) -> None:
                cls().update(b)

            hs.append(
                Hasher(
                    f"xxhash.{algo}",
                    "xxhash",
                    getattr(xxhash, f"{algo}_intdigest"),
                    x_stream,
                    x_update,
                    f"libxxhash {xxhash.XXHASH_VERSION}; non-cryptographic, not a CRC",
                )
            )
    except ImportError:
        pass
    try:
        import blake3

        def b_stream(chunks: list[Any]) -> bytes:
            h = blake3.blake3(max_threads=1)
            for ch in chunks:
                h.update(ch)
            return h.digest()

        hs.append(
            Hasher(
                "blake3",
                "blake3",
                lambda b: blake3.blake3(b, max_threads=1).digest(),
                b_stream,
                lambda b: blake3.blake3(max_threads=1).update(b),
                "max_threads=1; cryptographic",
            )
        )
        hs.append(
            Hasher(
                "blake3 (max_threads=AUTO)",
                "blake3",
                lambda b: blake3.blake3(b, max_threads=blake3.blake3.AUTO).digest(),
                b_stream,
                lambda b: blake3.blake3(max_threads=blake3.blake3.AUTO).update(b),
                "uses every core: not single-threaded, for reference only",
            )
        )
    except ImportError:
        pass
    return hs


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _two_threads(fn: Callable[[Any], Any], a: Any, b: Any) -> float:
    barrier = threading.Barrier(3)

    def run(x: Any) -> None:
        barrier.wait()
        fn(x)

    ts = [threading.Thread(target=run, args=(x,)) for x in (a, b)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def _stamp_until(stop: threading.Event, stamps: list[float], every: int) -> float:
    """A Python loop that notes the time every ``every`` iterations; returns iterations/s."""
    n = 0
    t0 = time.perf_counter()
    while not stop.is_set():
        n += 1
        if n % every == 0:
            stamps.append(time.perf_counter())
    return n / (time.perf_counter() - t0)


def _main_thread_progress(
    fn: Callable[[Any], Any], buf: Any, seconds: float = 0.3, trim: float = 0.003, every: int = 256
) -> dict[str, float]:
    """How fast a Python loop on this thread runs *during* ``fn(buf)`` calls made by another
    thread (for ``seconds``), relative to the loop alone: ~0 when ``fn`` holds the GIL, ~1 when
    it releases it and a core is free.

    The loop notes the time every ``every`` iterations; only notes inside a call, ``trim``
    seconds away from its start and end, count, so that the GIL hand-overs around each call
    (which let the loop run for a moment even when ``fn`` holds the GIL) do not."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # short hand-overs: less of the loop runs around each call
    try:
        stop, stamps = threading.Event(), []
        threading.Timer(seconds, stop.set).start()
        alone = _stamp_until(stop, stamps, every)
        stop, stamps = threading.Event(), []
        spans: list[tuple[float, float]] = []

        def work() -> None:
            end = time.perf_counter() + seconds
            try:
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    fn(buf)
                    spans.append((t0, time.perf_counter()))
            finally:
                stop.set()

        th = threading.Thread(target=work)
        th.start()
        _stamp_until(stop, stamps, every)
        th.join()
    finally:
        sys.setswitchinterval(old)
    windows = [(a + trim, b - trim) for a, b in spans if b - a > 3 * trim]
    inside = int(
        sum(np.count_nonzero((np.asarray(stamps) > a) & (np.asarray(stamps) < b)) for a, b in windows)
    )
    window_s = sum(b - a for a, b in windows)
    during = inside * every / window_s if window_s else float("nan")
    return {
        "loop_rate_alone": alone,
        "loop_rate_during_calls": during,
        "calls": len(spans),
        "calls_long_enough": len(windows),
        "median_call_s": _median([b - a for a, b in spans]) if spans else float("nan"),
        "main_thread_progress": during / alone,
    }


def _peak_rss_growth(fn: Callable[[Any], Any], arg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
        fn(arg)
        out["peak_rss_growth_mib"] = (_status_kib("VmHWM") - base) / 1024
    except OSError as e:
        out["peak_rss_growth_mib"] = None
        out["clear_refs_error"] = repr(e)
    tracemalloc.start()
    try:
        fn(arg)
        out["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / MiB
    finally:
        tracemalloc.stop()
    return out


def _views(t: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {
        "numpy_uint8_memoryview": lambda: memoryview(t.numpy()),
        "numpy_uint8_array": lambda: t.numpy(),
        "ctypes_c_char_memoryview": lambda: memoryview(
            (ctypes.c_char * t.numel()).from_address(t.data_ptr())
        ),
        "ctypes_c_char_memoryview_cast_B": lambda: _mv(t),
        "ctypes_c_char_memoryview_readonly": lambda: _mv(t).toreadonly(),
        "numpy_float32_memoryview": lambda: memoryview(t.view(torch.float32).numpy()),
        "torch_tensor": lambda: t,
    }


def bench_checksums(nbytes: int, reps: int, pypi: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    assert src.is_contiguous()
    mv = _mv(src)
    small = src[: 1 * MiB]
    small_bytes = bytes(_mv(small))
    res: dict[str, Any] = {
        "buffer": {
            "nbytes": nbytes,
            "kind": "torch.randint uint8 tensor (torch allocator)",
            "data_ptr_mod_4096": src.data_ptr() % 4096,
        },
        "functions": {},
    }
    hashers = _hashers()
    args: dict[str, Any] = {}
    for h in hashers:
        r: dict[str, Any] = {
            "note": h.note,
            "dist": h.dist,
            "version": _version(h.dist) if h.dist else None,
            "license": _license(h.dist) if h.dist else "PSF (standard library; zlib licence)",
        }
        print(f"[checksum] {h.name}", flush=True)
        # acceptance of buffer kinds (1 MiB slice) against the digest of bytes
        ref = h.oneshot(small_bytes)
        acc: dict[str, Any] = {}
        for vname, make in _views(small).items():
            try:
                acc[vname] = {"accepted": True, "matches_bytes": h.oneshot(make()) == ref}
            except Exception as e:
                acc[vname] = {"accepted": False, "error": f"{type(e).__name__}: {e}"}
        r["accepts"] = acc
        if acc["ctypes_c_char_memoryview_cast_B"]["accepted"]:
            args[h.name], r["timed_on"] = mv, "memoryview.cast('B') of a ctypes array (no copy)"
        elif acc["numpy_uint8_array"]["accepted"]:
            args[h.name] = np.frombuffer(mv, dtype=np.uint8)
            r["timed_on"] = "numpy uint8 array over the memory (no copy)"
        else:
            args[h.name], r["timed_on"] = bytes(mv), "bytes (a copy: no view accepted)"
        arg = args[h.name]
        r["stream_64mib_matches_oneshot"] = h.stream(
            [arg[i : i + IO_CHUNK] for i in range(0, nbytes, IO_CHUNK)]
        ) == h.oneshot(arg)
        r["memory_during_call"] = _peak_rss_growth(h.oneshot, arg)
        r["single_thread_s"], r["two_threads_halves_s"] = [], []
        res["functions"][h.name] = r
    # timings interleaved across functions, so that load from other processes hits all alike
    for rep in range(reps):
        print(f"[checksum] timing rep {rep}", flush=True)
        for h in hashers:
            arg, r = args[h.name], res["functions"][h.name]
            r["single_thread_s"].append(_time(functools.partial(h.oneshot, arg)))
            r["two_threads_halves_s"].append(_two_threads(h.oneshot, arg[: nbytes // 2], arg[nbytes // 2 :]))
    for h in hashers:
        arg, r = args[h.name], res["functions"][h.name]
        single, two = r["single_thread_s"], r["two_threads_halves_s"]
        r["single_thread_gbps"] = nbytes / _median(single) / 1e9
        r["single_thread_best_gbps"] = nbytes / min(single) / 1e9
        r["two_threads_gbps"] = nbytes / _median(two) / 1e9
        r["two_thread_speedup"] = _median(single) / _median(two)
        r["gil_oneshot"] = _main_thread_progress(h.oneshot, arg)
        r["gil_stream_update"] = _main_thread_progress(h.update_full, arg)
    del arg, args
    if pypi:
        res["pypi"] = {d: _pypi_release(d) for d in ("crc32c", "google-crc32c", "xxhash", "blake3")}
    del src, mv
    return res


# ----------------------------------------------------------------------------- 2. direct I/O


def _statx_dio(path: str) -> dict[str, Any]:
    """STATX_DIOALIGN (Linux 6.1+): the memory and offset alignment O_DIRECT needs, 0 = unsupported."""
    if not hasattr(_libc, "statx"):
        return {"error": "no statx in libc"}
    buf = ctypes.create_string_buffer(256)
    rc = _libc.statx(-100, os.fsencode(path), 0, 0x2000, buf)  # AT_FDCWD, STATX_DIOALIGN
    if rc != 0:
        return {"error": os.strerror(ctypes.get_errno())}
    mask = struct.unpack_from("<I", buf, 0)[0]
    if not mask & 0x2000:
        return {"error": "STATX_DIOALIGN not reported"}
    mem, off = struct.unpack_from("<II", buf, 152)
    return {"dio_mem_align": mem, "dio_offset_align": off}


def _block_device(path: str) -> dict[str, Any]:
    st = os.stat(path)
    maj, mnr = os.major(st.st_dev), os.minor(st.st_dev)
    out: dict[str, Any] = {"st_dev": f"{maj}:{mnr}"}
    sysdev = f"/sys/dev/block/{maj}:{mnr}"
    if not os.path.exists(sysdev):
        out["block_device"] = None  # tmpfs, overlay upper on a virtual fs, ...
        return out
    real = os.path.realpath(sysdev)
    out["block_device"] = os.path.basename(real)
    q = os.path.join(real, "queue")
    if not os.path.isdir(q):  # a partition: the queue is the parent's
        q = os.path.join(os.path.dirname(real), "queue")
    for k in (
        "logical_block_size",
        "physical_block_size",
        "minimum_io_size",
        "optimal_io_size",
        "max_sectors_kb",
        "rotational",
        "scheduler",
    ):
        with contextlib.suppress(OSError):
            with open(os.path.join(q, k)) as f:
                out[k] = f.read().strip()
    return out


def _fs_info(d: str) -> dict[str, Any]:
    sv = os.statvfs(d)
    out: dict[str, Any] = {
        "statvfs_f_bsize": sv.f_bsize,
        "statvfs_f_frsize": sv.f_frsize,
        "free_gib": sv.f_bavail * sv.f_frsize / GiB,
    }
    with contextlib.suppress(Exception):
        out["df_T"] = subprocess.run(["df", "-T", d], capture_output=True, text=True, timeout=10).stdout
    out.update(_block_device(d))
    return out


def _write_all(fd: int, mv: memoryview, chunk: int, offset: int = 0) -> None:
    done, n = 0, len(mv)
    while done < n:
        w = os.pwrite(fd, mv[done : done + chunk], offset + done)
        if w <= 0:
            raise OSError(errno.EIO, "short write")
        done += w


def _try(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        v = fn()
        return {"ok": True, **({"value": v} if v is not None else {})}
    except OSError as e:
        return {"ok": False, "errno": errno.errorcode.get(e.errno or 0, str(e.errno)), "error": str(e)}


def _probe_direct(d: str, addr_buf: memoryview) -> dict[str, Any]:
    path = os.path.join(d, f".dio_probe_{os.getpid()}")
    out: dict[str, Any] = {}
    try:
        out["open_O_DIRECT"] = _try(
            lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644))
        )
        if not out["open_O_DIRECT"]["ok"]:
            return out
        out["statx_dioalign_of_a_file"] = _statx_dio(path)  # ext4 reports it for regular files only

        def w(buf: memoryview, off: int = 0) -> int:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
            try:
                return os.pwrite(fd, buf, off)
            finally:
                os.close(fd)

        out["write_4096_aligned"] = _try(lambda: w(addr_buf[:4096]))
        out["write_512_len_512_offset"] = _try(lambda: w(addr_buf[:512], 512))
        out["write_unaligned_length_4096+100"] = _try(lambda: w(addr_buf[: 4096 + 100]))
        out["write_unaligned_address_+64 (torch.empty's alignment)"] = _try(
            lambda: w(addr_buf[64 : 64 + 4096])
        )
        out["write_address_+512"] = _try(lambda: w(addr_buf[512 : 512 + 4096]))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return out


def _measure(op: Callable[[], None], path: str, nbytes: int) -> dict[str, Any]:
    cached0 = _meminfo_kib("Cached")
    cpu0, busy0, t0 = _cpu_s(), _machine_busy_s(), time.perf_counter()
    op()
    wall = time.perf_counter() - t0
    cpu, busy = _cpu_s() - cpu0, _machine_busy_s() - busy0
    cached1 = _meminfo_kib("Cached")
    return {
        "wall_s": wall,
        "gbps": nbytes / wall / 1e9,
        "cpu_s": cpu,
        "cpu_s_per_gib": cpu / (nbytes / GiB),
        "machine_busy_cpu_s": busy,
        "cached_growth_mib": (cached1 - cached0) / 1024,
        "file_resident_fraction": _resident_fraction(path),
    }


def _w_buffered(path: str, mv: memoryview, fadvise: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, mv, IO_CHUNK)
        os.fsync(fd)
        if fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _w_buffered_sfr(path: str, mv: memoryview) -> None:
    """Start writeback of each chunk as it is written; wait for and drop the previous one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        prev: tuple[int, int] | None = None
        for off in range(0, len(mv), IO_CHUNK):
            part = mv[off : off + IO_CHUNK]
            _write_all(fd, part, IO_CHUNK, off)
            if _libc.sync_file_range(fd, off, len(part), SFR_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "sync_file_range")
            if prev is not None:
                _libc.sync_file_range(fd, prev[0], prev[1], SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER)
                os.posix_fadvise(fd, prev[0], prev[1], os.POSIX_FADV_DONTNEED)
            prev = (off, len(part))
        os.fsync(fd)  # sync_file_range neither writes metadata nor flushes the disk cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _w_direct(path: str, mv: memoryview, chunk: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        _write_all(fd, mv, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def _r_buffered(path: str, mv: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(mv):
            got = f.readinto(mv[done : done + IO_CHUNK])
            if not got:
                raise OSError(errno.EIO, "short read")
            done += got


def _r_direct(path: str, mv: memoryview, chunk: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        done = 0
        while done < len(mv):
            got = os.preadv(fd, [mv[done : done + chunk]], done)
            if got <= 0:
                break
            done += got
        return done
    finally:
        os.close(fd)


def _tail_tests(d: str, src: memoryview) -> dict[str, Any]:
    """Sizes that are not a multiple of 4096 through O_DIRECT; every file is read back and checked."""
    size = min(TAIL_BASE, len(src) // 2) + TAIL_EXTRA
    aligned = size // DIO_ALIGN * DIO_ALIGN
    padded = -(-size // DIO_ALIGN) * DIO_ALIGN
    want = zlib.crc32(src[:size])
    pad_mm, pad_t, _ = _aligned(padded)
    pad_mv = _mv(pad_t)
    pad_mv[:size] = src[:size]  # the rest stays zero
    back_mm, back_t, _ = _aligned(padded)
    back_mv = _mv(back_t)
    path = os.path.join(d, f"tail_{os.getpid()}.bin")
    out: dict[str, Any] = {"size": size, "aligned_part": aligned, "tail_bytes": size - aligned}

    def check() -> dict[str, Any]:
        back_mv[:] = b"\0" * padded
        got = _r_direct(path, back_mv, IO_CHUNK)  # O_DIRECT read of a padded length: short at EOF
        return {
            "file_size_ok": os.path.getsize(path) == size,
            "o_direct_read_returned": got,
            "content_ok": got == size and zlib.crc32(back_mv[:size]) == want,
        }

    def one_shot() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            os.pwrite(fd, pad_mv[:size], 0)
        finally:
            os.close(fd)

    def reopen() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            _write_all(fd, pad_mv[:aligned], IO_CHUNK)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_WRONLY)
        try:
            _write_all(fd, pad_mv[aligned:size], IO_CHUNK, aligned)
            os.fsync(fd)
        finally:
            os.close(fd)

    def setfl() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            _write_all(fd, pad_mv[:aligned], IO_CHUNK)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(fd, pad_mv[aligned:size], IO_CHUNK, aligned)
            os.fsync(fd)
        finally:
            os.close(fd)

    def pad_truncate() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            _write_all(fd, pad_mv[:padded], IO_CHUNK)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        for name, fn in (
            ("single_O_DIRECT_write_of_unaligned_size", one_shot),
            ("direct_then_reopen_buffered_for_tail", reopen),
            ("direct_then_fcntl_clear_O_DIRECT_for_tail", setfl),
            ("direct_padded_then_ftruncate", pad_truncate),
        ):
            r = _try(fn)
            if r["ok"]:
                r.update(check())
                r["tail_pages_resident_fraction"] = _resident_fraction(path)
            out[name] = r
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return out  # the mappings are unmapped when the last reference goes


def bench_dir(d: str, nbytes: int, reps: int, src: memoryview, dst: memoryview, full: bool) -> dict[str, Any]:
    os.makedirs(d, exist_ok=True)
    res: dict[str, Any] = {"dir": d, "fs": _fs_info(d)}
    res["o_direct_probe"] = _probe_direct(d, src)
    direct_ok = res["o_direct_probe"].get("write_4096_aligned", {}).get("ok", False)
    res["o_direct_supported"] = bool(direct_ok)
    if direct_ok:
        print(f"[io] {d}: tail tests", flush=True)
        res["tail"] = _tail_tests(d, src)
    if not full:
        res["note"] = "same filesystem as a directory already measured: probed only"
        return res
    path = os.path.join(d, f"bench_{os.getpid()}.bin")
    want = zlib.crc32(src)
    writes: dict[str, Callable[[], None]] = {
        "buffered": lambda: _w_buffered(path, src, fadvise=False),
        "buffered+fadvise_dontneed": lambda: _w_buffered(path, src, fadvise=True),
        "buffered+sync_file_range+dontneed_per_chunk": lambda: _w_buffered_sfr(path, src),
    }
    if direct_ok:
        for c in (8, 16, 64):
            writes[f"o_direct_{c}mib"] = lambda c=c: _w_direct(path, src, c * MiB)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in writes}
    names = list(writes)
    try:
        _w_buffered(path, src, fadvise=True)  # untimed: allocate, warm up the path
        os.unlink(path)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for k in order:
                os.sync()
                print(f"[io] {d}: write {k} rep {rep}", flush=True)
                runs[k].append(_measure(writes[k], path, nbytes))
                os.unlink(path)
        res["writes"] = {k: _summary(v) for k, v in runs.items()}

        # reads: one file, its cache dropped before each cold read
        _w_buffered(path, src, fadvise=True)
        reads: dict[str, Callable[[], None]] = {"buffered_cold": lambda: _r_buffered(path, dst)}
        if direct_ok:
            for c in (8, 16, 64):
                reads[f"o_direct_{c}mib_cold"] = lambda c=c: _check_len(_r_direct(path, dst, c * MiB), nbytes)
        rruns: dict[str, list[dict[str, Any]]] = {k: [] for k in reads}
        rnames = list(reads)
        for rep in range(reps):
            order = rnames[rep % len(rnames) :] + rnames[: rep % len(rnames)]
            for k in order:
                _drop_file_cache(path)
                before = _resident_fraction(path)
                ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(dst)), 0, len(dst))
                print(f"[io] {d}: read {k} rep {rep}", flush=True)
                m = _measure(reads[k], path, nbytes)
                m["resident_fraction_before"] = before
                m["verified"] = zlib.crc32(dst) == want
                rruns[k].append(m)
        rruns["buffered_warm"] = []
        _r_buffered(path, dst)
        for _ in range(reps):
            rruns["buffered_warm"].append(_measure(lambda: _r_buffered(path, dst), path, nbytes))
        res["reads"] = {k: _summary(v) for k, v in rruns.items()}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return res


def _check_len(got: int, want: int) -> None:
    if got != want:
        raise OSError(errno.EIO, f"O_DIRECT read returned {got} of {want} bytes")


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for k in ("gbps", "cpu_s_per_gib", "machine_busy_cpu_s", "cached_growth_mib", "file_resident_fraction"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[f"median_{k}"] = _median(vals)
    if runs and "verified" in runs[0]:
        out["all_verified"] = all(r["verified"] for r in runs)
    return out


def bench_io(nbytes: int, reps: int, dirs: list[str]) -> dict[str, Any]:
    if nbytes % DIO_ALIGN:
        raise SystemExit(f"--mib must give a multiple of {DIO_ALIGN} bytes")
    src_mm, src_t, src_addr = _aligned(nbytes)
    dst_mm, dst_t, dst_addr = _aligned(nbytes)
    g = torch.Generator().manual_seed(1)
    src_t.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g))
    dst_t.zero_()
    src, dst = _mv(src_t), _mv(dst_t)
    torch_empty_align = sorted({torch.empty(s, dtype=torch.uint8).data_ptr() % 4096 for s in (MiB, 64 * MiB)})
    res: dict[str, Any] = {
        "buffers": {
            "source": "mmap.mmap(-1, n) wrapped by torch.frombuffer",
            "mmap_addr_mod_4096": src_addr % 4096,
            "torch_empty_data_ptr_mod_4096_1MiB_64MiB": torch_empty_align,
            "note": "torch.empty (asyncckpt's non-shared staging) is 64-byte aligned, not page aligned; "
            "multiprocessing.shared_memory (its shared staging) is an mmap, page aligned",
        },
        "drop_caches": {
            "path": "/proc/sys/vm/drop_caches",
            "writable": os.access("/proc/sys/vm/drop_caches", os.W_OK),
            "used": False,
            "why": "would drop the page cache of the whole machine; posix_fadvise(DONTNEED) per file "
            "is used instead and checked with mincore",
        },
        "dirs": {},
    }
    seen: dict[int, str] = {}
    try:
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            dev = os.stat(d).st_dev
            full = dev not in seen
            r = bench_dir(d, nbytes, reps, src, dst, full)
            if not full:
                r["same_filesystem_as"] = seen[dev]
            seen.setdefault(dev, d)
            res["dirs"][d] = r
    finally:
        del src, dst, src_t, dst_t, src_mm, dst_mm
        gc.collect()
    return res


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=os.path.join("benchmarks", "results", "tmp"))
    p.add_argument("--extra-dirs", default="/dev/shm,/tmp", help="comma-separated; '' for none")
    p.add_argument("--json", default=None)
    p.add_argument("--skip-checksums", action="store_true")
    p.add_argument("--skip-io", action="store_true")
    p.add_argument("--no-pypi", action="store_true", help="do not ask PyPI for release dates")
    a = p.parse_args(argv)
    nbytes = a.mib * MiB
    root = os.path.abspath(a.dir)
    created = not os.path.exists(root)
    scratch = [os.path.join(root, f"io_primitives_{os.getpid()}")]
    for d in filter(None, a.extra_dirs.split(",")):
        scratch.append(os.path.join(d, f"asyncckpt_io_primitives_{os.getpid()}"))
    out: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "kernel": platform.release(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "mem_total_gib": _meminfo_kib("MemTotal") / 2**20,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "loadavg_before": os.getloadavg(),
        },
        "args": vars(a),
    }
    try:
        if not a.skip_checksums:
            out["checksums"] = bench_checksums(nbytes, a.reps, pypi=not a.no_pypi)
        if not a.skip_io:
            out["io"] = bench_io(nbytes, a.reps, scratch)
    finally:
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(root)
    out["machine"]["loadavg_after"] = os.getloadavg()
    _print_summary(out)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _print_summary(out: dict[str, Any]) -> None:
    cs = out.get("checksums", {}).get("functions", {})
    if cs:
        print(
            f"\n{'checksum':28s} {'GB/s':>7s} {'2thr GB/s':>9s} {'speedup':>7s} {'main prog':>9s} {'RSS+MiB':>8s}"
        )
        for k, r in cs.items():
            mem = r["memory_during_call"].get("peak_rss_growth_mib")
            print(
                f"{k:28s} {r['single_thread_gbps']:7.2f} {r['two_threads_gbps']:9.2f} "
                f"{r['two_thread_speedup']:7.2f} {r['gil_oneshot']['main_thread_progress']:9.2f} "
                f"{mem if mem is None else round(mem, 1)!s:>8s}"
            )
    for d, r in out.get("io", {}).get("dirs", {}).items():
        print(f"\n{d}: O_DIRECT supported={r['o_direct_supported']} {r.get('note', '')}")
        for kind in ("writes", "reads"):
            for k, s in r.get(kind, {}).items():
                print(
                    f"  {kind[:-1]:5s} {k:44s} {s['median_gbps']:6.2f} GB/s  cpu {s['median_cpu_s_per_gib']:5.2f} s/GiB"
                    f"  cached +{s.get('median_cached_growth_mib', 0):7.1f} MiB"
                    f"  resident {s.get('median_file_resident_fraction', float('nan')):.2f}"
                )


if __name__ == "__main__":
    main()
