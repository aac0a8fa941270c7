"""Lossless codecs for compressed checkpoints: ratio and single-core speed, by measurement.

CPU only, one process.  ``torch.set_num_threads(1)`` and every codec is given one thread, so
each GB/s is *per core*; one section runs the best candidates on 2 threads to see whether they
scale.  GB/s is always raw (uncompressed) bytes over seconds, so compress and decompress
figures are comparable with a disk's write/read speed of the raw state.

Data sets, each ``--mib`` MiB unless said (seeded, so every run sees the same bytes):
  bf16_weights       torch.randn * 0.02 -> bfloat16
  fp32_weights       torch.randn * 0.02, fp32
  adam_exp_avg       AdamW ``exp_avg`` of an MLP (4 square nn.Linear, ~``--mib``/4 M params)
  adam_exp_avg_sq    ``exp_avg_sq`` of the same, after ``--adam-steps`` real steps on random data
  zeros_fp32         an all-zero fp32 tensor (a freshly initialised buffer / unused state)
  int64_token_ids    ``--mib``/16 MiB of int64 token ids in [0, 50257) (data-loader state;
                     step counters are single int64 scalars: never worth compressing)
  random_u8          ``--mib``/16 MiB of uniformly random bytes: the incompressible case

Every configuration compresses the data set in independent chunks of ``--chunk-mib`` MiB (what a
streaming, parallel writer would do), from the contiguous host buffer (the staging copy) to a
list of compressed blobs, and decompresses them back into a preallocated, already-touched
buffer, which is then compared with the original (every configuration is verified).  Median and
best of ``--reps`` timed runs after one untimed warm-up (``time.perf_counter``); since other
work may share the cores, raw bytes per CPU-second of this process (``time.process_time``) are
recorded as well.  Configurations:
  zstd-L{1,3}             ``zstandard`` on the raw bytes
  zstd-L{1,3}+bshuf       the same on byte planes: each chunk viewed as uint8, reshape(-1, k).T
                          copied with numpy (k = element size); decompression scatters the planes
                          back.  The shuffle's own cost is measured separately, and included in
                          these configurations' GB/s.
  blosc2-*                ``blosc2.compress2``: codec ZSTD clevel 1/3 or LZ4 (clevel 5), filter
                          SHUFFLE or BITSHUFFLE (and SHUFFLE+BYTEDELTA), typesize = element size,
                          nthreads=1
  zipnn-huffman           ``zipnn.ZipNN(method='huffman', input_format='byte',
                          bytearray_dtype=..., threads=1)``: floats only.  It rewrites its input
                          buffer in place (detected and recorded below), so it is handed a fresh
                          copy before each timed run (the copy is not timed).
  numcodecs-blosc-zstd1   ``numcodecs.Blosc`` (c-blosc 1) zstd clevel 1, SHUFFLE: a cross-check.
Reference: a plain memcpy of the same bytes (``torch.clone``: allocation included, and
``copy_`` into a preallocated tensor), 1 and 2 threads.

Also: a chunk-size sweep (256 KiB .. whole buffer) for the candidates, a 2-thread run of them
(thread pool over chunks; blosc2's own nthreads=2), which configurations do not pay
(ratio < 1.05: store raw), and, for a disk of 0.5 and 0.7 GB/s, the raw-bytes throughput of a
compress-then-write pipeline on 1 and 2 cores: min(cores x compress GB/s, disk GB/s x ratio).

Usage: ``python -m benchmarks.bench_codecs [--mib 64] [--chunk-mib 4] [--reps 3]
[--adam-steps 8] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GB = 1e9
MIB = 1 << 20
NO_PAY = 1.05  # below this ratio, store raw
DISKS_GBPS = (0.5, 0.7)

try:
    import zstandard
except ImportError:  # pragma: no cover - reported in the JSON
    zstandard = None
try:
    import blosc2
except ImportError:  # pragma: no cover
    blosc2 = None
try:
    import zipnn
except ImportError:  # pragma: no cover
    zipnn = None
try:
    import numcodecs
    from numcodecs import blosc as numcodecs_blosc
except ImportError:  # pragma: no cover
    numcodecs = None


# ----------------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }


def lib_versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "numpy": np.__version__}
    for dist in ("zstandard", "blosc2", "zipnn", "numcodecs"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if zstandard is not None:
        out["libzstd (zstandard)"] = ".".join(map(str, zstandard.ZSTD_VERSION))
    if blosc2 is not None:
        out["c-blosc2"] = str(blosc2.blosclib_version).split()[0]
    return out


# ----------------------------------------------------------------------------- data sets


@dataclass
class Dataset:
    name: str
    desc: str
    tensor: torch.Tensor

    @property
    def itemsize(self) -> int:
        return self.tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.itemsize

    @property
    def u8(self) -> np.ndarray:
        return self.tensor.view(torch.uint8).numpy()


def adam_moments(mib: float, steps: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """exp_avg and exp_avg_sq of an MLP of ~mib MiB of fp32 params after ``steps`` AdamW steps."""
    n_target = int(mib * MIB / 4)
    width = max(64, int(math.sqrt(n_target / 4)) // 64 * 64)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(32, width)
        y = torch.randn(32, width)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    states = [opt.state[p] for p in model.parameters()]
    m = torch.cat([s["exp_avg"].reshape(-1) for s in states])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
    info = {
        "mlp": f"4 x Linear({width}, {width}) with GELU",
        "params": int(m.numel()),
        "adamw_steps": steps,
        "train_s": round(train_s, 2),
        "exp_avg_zero_fraction": float((m == 0).float().mean()),
        "exp_avg_sq_zero_fraction": float((v == 0).float().mean()),
    }
    return m, v, info


def make_datasets(mib: float, adam_steps: int) -> tuple[list[Dataset], dict[str, Any]]:
    torch.manual_seed(0)
    n16 = int(mib * MIB) // 2
    n32 = int(mib * MIB) // 4
    m, v, info = adam_moments(mib, adam_steps)
    n_tok = max(1024, int(mib * MIB / 16) // 8)
    out = [
        Dataset("bf16_weights", "torch.randn*0.02 -> bfloat16", (torch.randn(n16) * 0.02).bfloat16()),
        Dataset("fp32_weights", "torch.randn*0.02, float32", torch.randn(n32) * 0.02),
        Dataset("adam_exp_avg", f"AdamW exp_avg after {adam_steps} steps, {info['mlp']}", m),
        Dataset("adam_exp_avg_sq", f"AdamW exp_avg_sq after {adam_steps} steps, {info['mlp']}", v),
        Dataset("zeros_fp32", "torch.zeros, float32", torch.zeros(n32)),
        Dataset("int64_token_ids", "torch.randint(0, 50257), int64", torch.randint(0, 50257, (n_tok,))),
        Dataset(
            "random_u8",
            "torch.randint(0, 256), uint8: incompressible (RNG state, already-compressed bytes)",
            torch.randint(0, 256, (n_tok * 8,), dtype=torch.uint8),
        ),
    ]
    return out, info


# ----------------------------------------------------------------------------- byte shuffle


def byte_shuffle(u8: np.ndarray, k: int) -> np.ndarray:
    """Byte planes: plane j holds byte j of every element (the low byte first on x86)."""
    return u8.reshape(-1, k).T.copy()


def byte_unshuffle_into(planes: np.ndarray, out: np.ndarray, k: int) -> None:
    # One strided write per plane: ~5x faster than out.reshape(-1, k)[:] = planes.T.
    o = out.reshape(-1, k)
    p = planes.reshape(k, -1)
    for j in range(k):
        o[:, j] = p[j]


# ----------------------------------------------------------------------------- codecs


class Codec:
    name = "?"
    lib = "?"
    mutates_input = False

    def supports(self, ds: Dataset) -> bool:
        return True

    def fresh(self) -> Codec:
        """An independent instance, for another thread."""
        return self

    def compress(self, u8: np.ndarray, ds: Dataset) -> bytes:
        raise NotImplementedError

    def decompress_into(self, blob: bytes, out: np.ndarray, ds: Dataset) -> None:
        raise NotImplementedError


class ZstdCodec(Codec):
    lib = "zstandard"

    def __init__(self, level: int, shuffle: bool):
        self.level, self.shuffle = level, shuffle
        self.name = f"zstd-L{level}" + ("+bshuf" if shuffle else "")
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.dctx = zstandard.ZstdDecompressor()

    def fresh(self) -> Codec:
        return ZstdCodec(self.level, self.shuffle)

    def compress(self, u8: np.ndarray, ds: Dataset) -> bytes:
        return self.cctx.compress(byte_shuffle(u8, ds.itemsize) if self.shuffle else u8)

    def decompress_into(self, blob: bytes, out: np.ndarray, ds: Dataset) -> None:
        raw = np.frombuffer(self.dctx.decompress(blob), np.uint8)
        if self.shuffle:
            byte_unshuffle_into(raw, out, ds.itemsize)
        else:
            out[:] = raw


class Blosc2Codec(Codec):
    lib = "blosc2"

    def __init__(self, codec: str, clevel: int, filters: tuple[str, ...], nthreads: int = 1):
        self.codec, self.clevel, self.filters, self.nthreads = codec, clevel, filters, nthreads
        self.name = f"blosc2-{codec.lower()}{clevel if codec == 'ZSTD' else ''}-" + "+".join(
            f.lower() for f in filters
        )
        if nthreads != 1:
            self.name += f"-nt{nthreads}"
        self._cp: dict[int, Any] = {}
        self.dparams = blosc2.DParams(nthreads=nthreads)

    def fresh(self) -> Codec:
        return Blosc2Codec(self.codec, self.clevel, self.filters, self.nthreads)

    def cparams(self, typesize: int) -> Any:
        cp = self._cp.get(typesize)
        if cp is None:
            filters = [getattr(blosc2.Filter, f) for f in self.filters]
            meta = [typesize if f == "BYTEDELTA" else 0 for f in self.filters]
            cp = blosc2.CParams(
                codec=getattr(blosc2.Codec, self.codec),
                clevel=self.clevel,
                typesize=typesize,
                nthreads=self.nthreads,
                filters=filters,
                filters_meta=meta,
            )
            self._cp[typesize] = cp
        return cp

    def compress(self, u8: np.ndarray, ds: Dataset) -> bytes:
        return blosc2.compress2(u8, cparams=self.cparams(ds.itemsize))

    def decompress_into(self, blob: bytes, out: np.ndarray, ds: Dataset) -> None:
        blosc2.decompress2(blob, dst=out, dparams=self.dparams)


class ZipnnCodec(Codec):
    lib = "zipnn"
    name = "zipnn-huffman"
    mutates_input = True
    DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}

    def __init__(self) -> None:
        self._z: dict[str, Any] = {}

    def fresh(self) -> Codec:
        return ZipnnCodec()

    def supports(self, ds: Dataset) -> bool:
        return ds.tensor.dtype in self.DTYPES

    def z(self, ds: Dataset) -> Any:
        key = self.DTYPES[ds.tensor.dtype]
        if key not in self._z:
            self._z[key] = zipnn.ZipNN(method="huffman", input_format="byte", bytearray_dtype=key, threads=1)
        return self._z[key]

    def compress(self, u8: np.ndarray, ds: Dataset) -> bytes:
        return self.z(ds).compress(u8)

    def decompress_into(self, blob: bytes, out: np.ndarray, ds: Dataset) -> None:
        out[:] = np.frombuffer(self.z(ds).decompress(blob), np.uint8)


class NumcodecsBloscCodec(Codec):
    lib = "numcodecs"
    name = "numcodecs-blosc-zstd1-shuffle"

    def __init__(self) -> None:
        numcodecs_blosc.set_nthreads(1)
        numcodecs_blosc.use_threads = False
        self.c = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)

    def compress(self, u8: np.ndarray, ds: Dataset) -> bytes:
        return self.c.encode(u8.view(f"u{ds.itemsize}"))  # typesize from the itemsize

    def decompress_into(self, blob: bytes, out: np.ndarray, ds: Dataset) -> None:
        self.c.decode(blob, out=out)


def all_codecs() -> list[Codec]:
    out: list[Codec] = []
    if zstandard is not None:
        for shuffle in (False, True):
            for level in (1, 3):
                out.append(ZstdCodec(level, shuffle))
    if blosc2 is not None:
        for codec, clevel in (("ZSTD", 1), ("ZSTD", 3), ("LZ4", 5)):
            for filt in ("SHUFFLE", "BITSHUFFLE"):
                out.append(Blosc2Codec(codec, clevel, (filt,)))
        out.append(Blosc2Codec("ZSTD", 1, ("SHUFFLE", "BYTEDELTA")))
    if zipnn is not None:
        out.append(ZipnnCodec())
    if numcodecs is not None:
        out.append(NumcodecsBloscCodec())
    return out


# ----------------------------------------------------------------------------- timing


def chunk_bounds(nbytes: int, chunk: int, itemsize: int) -> list[tuple[int, int]]:
    chunk = max(itemsize, chunk - chunk % itemsize)
    return [(i, min(i + chunk, nbytes)) for i in range(0, nbytes, chunk)]


def compress_all(codec: Codec, src: np.ndarray, ds: Dataset, bounds: list[tuple[int, int]]) -> list[bytes]:
    return [codec.compress(src[a:b], ds) for a, b in bounds]


def decompress_all(
    codec: Codec, blobs: list[bytes], out: np.ndarray, ds: Dataset, bounds: list[tuple[int, int]]
) -> None:
    for blob, (a, b) in zip(blobs, bounds):
        codec.decompress_into(blob, out[a:b], ds)


def compress_pool(
    codecs: list[Codec], pool: ThreadPoolExecutor, src: np.ndarray, ds: Dataset, bounds: list[tuple[int, int]]
) -> list[bytes]:
    n = len(codecs)
    parts = [bounds[i::n] for i in range(n)]  # round-robin: one codec instance per worker
    futs = [pool.submit(compress_all, codecs[i], src, ds, parts[i]) for i in range(n)]
    res = [f.result() for f in futs]
    blobs: list[bytes] = [b""] * len(bounds)
    for i in range(n):
        blobs[i::n] = res[i]
    return blobs


def decompress_pool(
    codecs: list[Codec],
    pool: ThreadPoolExecutor,
    blobs: list[bytes],
    out: np.ndarray,
    ds: Dataset,
    bounds: list[tuple[int, int]],
) -> None:
    n = len(codecs)
    futs = [pool.submit(decompress_all, codecs[i], blobs[i::n], out, ds, bounds[i::n]) for i in range(n)]
    for f in futs:
        f.result()


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def measure(
    codec: Codec, ds: Dataset, chunk: int, reps: int, threads: int = 1, pool: ThreadPoolExecutor | None = None
) -> dict[str, Any]:
    """Ratio and compress/decompress GB/s of one configuration on one data set (verified)."""
    orig = ds.u8
    bounds = chunk_bounds(ds.nbytes, chunk, ds.itemsize)
    codecs = [codec] + [codec.fresh() for _ in range(threads - 1)]

    def comp(src: np.ndarray) -> list[bytes]:
        if threads == 1:
            return compress_all(codec, src, ds, bounds)
        assert pool is not None
        return compress_pool(codecs, pool, src, ds, bounds)

    def decomp(blobs: list[bytes], out: np.ndarray) -> None:
        if threads == 1:
            decompress_all(codec, blobs, out, ds, bounds)
        else:
            assert pool is not None
            decompress_pool(codecs, pool, blobs, out, ds, bounds)

    digest = hashlib.sha1(orig).hexdigest()
    out = np.zeros_like(orig)  # preallocated and touched, like a resume target
    src = orig.copy() if codec.mutates_input else orig
    blobs = comp(src)  # warm-up
    mutated = not np.array_equal(src, orig) if codec.mutates_input else False
    decomp(blobs, out)
    if not np.array_equal(out, orig):
        raise AssertionError(f"{codec.name} on {ds.name}: round trip differs")
    ct: list[float] = []
    dt: list[float] = []
    ccpu: list[float] = []
    dcpu: list[float] = []
    for _ in range(reps):
        src = orig.copy() if codec.mutates_input else orig
        p0, t0 = time.process_time(), time.perf_counter()
        blobs = comp(src)
        ct.append(time.perf_counter() - t0)
        ccpu.append(time.process_time() - p0)
        out[:] = 0
        p0, t0 = time.process_time(), time.perf_counter()
        decomp(blobs, out)
        dt.append(time.perf_counter() - t0)
        dcpu.append(time.process_time() - p0)
    if not np.array_equal(out, orig) or hashlib.sha1(orig).hexdigest() != digest:
        raise AssertionError(f"{codec.name} on {ds.name}: round trip differs")
    csize = sum(len(b) for b in blobs)
    ratio = ds.nbytes / csize
    res = {
        "dataset": ds.name,
        "config": codec.name,
        "lib": codec.lib,
        "threads": threads,
        "chunk_bytes": bounds[0][1] - bounds[0][0],
        "chunks": len(bounds),
        "raw_bytes": ds.nbytes,
        "compressed_bytes": csize,
        "ratio": round(ratio, 4),
        "pays": ratio >= NO_PAY,
        "compress_gbps": round(gbps(ds.nbytes, statistics.median(ct)), 3),
        "compress_gbps_best": round(gbps(ds.nbytes, min(ct)), 3),
        "decompress_gbps": round(gbps(ds.nbytes, statistics.median(dt)), 3),
        "decompress_gbps_best": round(gbps(ds.nbytes, min(dt)), 3),
        # raw bytes per CPU-second of this process (all its threads): robust to other load
        "compress_gbps_per_cpu_s": round(gbps(ds.nbytes, statistics.median(ccpu)), 3),
        "decompress_gbps_per_cpu_s": round(gbps(ds.nbytes, statistics.median(dcpu)), 3),
        # > 1 only if the work really ran on more than one core at once
        "compress_cpu_per_wall": round(statistics.median(ccpu) / statistics.median(ct), 2),
        "decompress_cpu_per_wall": round(statistics.median(dcpu) / statistics.median(dt), 2),
    }
    if codec.mutates_input:
        res["mutated_its_input"] = mutated
    return res


def time_median(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def memcpy_reference(ds: Dataset, reps: int) -> list[dict[str, Any]]:
    out = []
    t = ds.tensor
    dst = torch.empty_like(t)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for kind, fn in (
            ("clone (alloc+copy)", lambda: t.clone()),
            ("copy_ into preallocated", lambda: dst.copy_(t)),
        ):
            med, best = time_median(fn, reps)
            out.append(
                {
                    "dataset": ds.name,
                    "op": kind,
                    "threads": threads,
                    "gbps": round(gbps(ds.nbytes, med), 3),
                    "gbps_best": round(gbps(ds.nbytes, best), 3),
                }
            )
    torch.set_num_threads(1)
    return out


def shuffle_cost(ds: Dataset, chunk: int, reps: int) -> dict[str, Any]:
    u8 = ds.u8
    k = ds.itemsize
    bounds = chunk_bounds(ds.nbytes, chunk, k)
    planes = [byte_shuffle(u8[a:b], k) for a, b in bounds]
    out = np.zeros_like(u8)
    tu8 = ds.tensor.view(torch.uint8)

    def np_shuf() -> None:
        for a, b in bounds:
            byte_shuffle(u8[a:b], k)

    def np_unshuf() -> None:
        for p, (a, b) in zip(planes, bounds):
            byte_unshuffle_into(p, out[a:b], k)

    def torch_shuf() -> None:
        for a, b in bounds:
            tu8[a:b].reshape(-1, k).t().contiguous()

    res: dict[str, Any] = {"dataset": ds.name, "itemsize": k, "chunk_bytes": bounds[0][1] - bounds[0][0]}
    for key, fn in (
        ("numpy_shuffle", np_shuf),
        ("numpy_unshuffle", np_unshuf),
        ("torch_shuffle", torch_shuf),
    ):
        med, best = time_median(fn, reps)
        res[key + "_gbps"] = round(gbps(ds.nbytes, med), 3)
        res[key + "_gbps_best"] = round(gbps(ds.nbytes, best), 3)
    np_unshuf()
    assert np.array_equal(out, u8)
    return res


def pipeline(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raw GB/s of compress-then-write on a disk of D GB/s with c cores compressing in parallel.

    A model: per-core speed is the single-thread raw bytes per CPU-second, scaled linearly.
    """
    out = []
    for r in results:
        if r["threads"] != 1:
            continue
        for disk in DISKS_GBPS:
            row = {"dataset": r["dataset"], "config": r["config"], "disk_gbps": disk}
            for cores in (1, 2):
                eff = min(cores * r["compress_gbps_per_cpu_s"], disk * r["ratio"])
                row[f"raw_gbps_{cores}core"] = round(eff, 3)
                row[f"speedup_vs_raw_write_{cores}core"] = round(eff / disk, 2)
            out.append(row)
    return out


# ----------------------------------------------------------------------------- main


def print_table(results: list[dict[str, Any]], datasets: list[Dataset]) -> None:
    for ds in datasets:
        rows = [r for r in results if r["dataset"] == ds.name and r["threads"] == 1]
        print(f"\n== {ds.name}  ({ds.nbytes / MIB:.1f} MiB, {ds.desc})")
        print(
            f"{'config':34s} {'ratio':>8s} {'comp GB/s':>10s} {'decomp GB/s':>12s} {'(per CPU-s)':>14s}  pays"
        )
        for r in sorted(rows, key=lambda r: -r["ratio"]):
            print(
                f"{r['config']:34s} {r['ratio']:8.3f} {r['compress_gbps']:10.3f} "
                f"{r['decompress_gbps']:12.3f} {r['compress_gbps_per_cpu_s']:6.3f}/"
                f"{r['decompress_gbps_per_cpu_s']:<6.3f}  {'yes' if r['pays'] else 'NO'}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=float, default=64.0, help="size of each data set (MiB)")
    ap.add_argument("--chunk-mib", type=float, default=4.0, help="independent chunk size (MiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--adam-steps", type=int, default=8)
    ap.add_argument(
        "--candidates",
        default="blosc2-zstd1-shuffle,blosc2-lz4-bitshuffle,zstd-L1+bshuf,zipnn-huffman",
        help="configs for the chunk sweep and the 2-thread run",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="8 MiB, 1 rep (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.reps, args.adam_steps = 8.0, 1, 2
    torch.set_num_threads(1)
    chunk = int(args.chunk_mib * MIB)
    t_start = time.perf_counter()

    info = machine_info()
    versions = lib_versions()
    print("libraries:", json.dumps(versions))
    datasets, adam_info = make_datasets(args.mib, args.adam_steps)
    print("adam:", json.dumps(adam_info))
    codecs = all_codecs()

    memcpy = []
    for ds in datasets[:2]:
        memcpy += memcpy_reference(ds, args.reps)
    for m in memcpy:
        print(f"memcpy {m['dataset']:14s} {m['op']:24s} {m['threads']}t {m['gbps']:.3f} GB/s")
    shuffles = [shuffle_cost(ds, chunk, args.reps) for ds in datasets if ds.itemsize > 1]
    for s in shuffles:
        print(
            f"shuffle {s['dataset']:16s} k={s['itemsize']} numpy {s['numpy_shuffle_gbps']:.2f} GB/s, "
            f"unshuffle {s['numpy_unshuffle_gbps']:.2f} GB/s, torch shuffle {s['torch_shuffle_gbps']:.2f} GB/s"
        )

    results: list[dict[str, Any]] = []
    for ds in datasets:
        for codec in codecs:
            if not codec.supports(ds):
                continue
            r = measure(codec, ds, chunk, args.reps)
            results.append(r)
            print(
                f"{ds.name:16s} {codec.name:34s} ratio {r['ratio']:8.3f}  "
                f"c {r['compress_gbps']:6.3f}  d {r['decompress_gbps']:6.3f} GB/s",
                flush=True,
            )
    print_table(results, datasets)

    no_pay = {
        ds.name: [r["config"] for r in results if r["dataset"] == ds.name and not r["pays"]]
        for ds in datasets
    }
    print("\nratio < 1.05 (store raw):", json.dumps(no_pay, indent=1))

    wanted = [c.strip() for c in args.candidates.split(",") if c.strip()]
    cands = [c for c in codecs if c.name in wanted]
    sweep_sets = [ds for ds in datasets if ds.name in ("bf16_weights", "adam_exp_avg_sq")]
    sweep: list[dict[str, Any]] = []
    for ds in sweep_sets:
        for codec in cands:
            if not codec.supports(ds):
                continue
            sizes = [int(cm * MIB) for cm in (0.25, 1, 4, 16) if cm * MIB < ds.nbytes] + [ds.nbytes]
            for size in sizes:
                r = measure(codec, ds, size, args.reps)
                sweep.append(r)
                print(
                    f"sweep {ds.name:16s} {codec.name:30s} chunk {r['chunk_bytes'] / MIB:7.2f} MiB "
                    f"ratio {r['ratio']:.3f} c {r['compress_gbps']:.3f} d {r['decompress_gbps']:.3f}",
                    flush=True,
                )

    scaling: list[dict[str, Any]] = []
    with ThreadPoolExecutor(2) as pool:
        for ds in sweep_sets:
            for codec in cands:
                if not codec.supports(ds):
                    continue
                one = next(r for r in results if r["dataset"] == ds.name and r["config"] == codec.name)
                two = measure(codec, ds, chunk, args.reps, threads=2, pool=pool)
                two["mode"] = "thread pool over chunks, 1 codec thread each"
                two["speedup_compress"] = round(two["compress_gbps"] / one["compress_gbps"], 2)
                two["speedup_decompress"] = round(two["decompress_gbps"] / one["decompress_gbps"], 2)
                scaling.append(two)
                if isinstance(codec, Blosc2Codec):
                    c2 = Blosc2Codec(codec.codec, codec.clevel, codec.filters, nthreads=2)
                    r2 = measure(c2, ds, chunk, args.reps)
                    r2["threads"] = 2
                    r2["mode"] = "blosc2 nthreads=2, chunks in sequence"
                    r2["speedup_compress"] = round(r2["compress_gbps"] / one["compress_gbps"], 2)
                    r2["speedup_decompress"] = round(r2["decompress_gbps"] / one["decompress_gbps"], 2)
                    scaling.append(r2)
    for s in scaling:
        print(
            f"2 threads {s['dataset']:16s} {s['config']:30s} ({s['mode']}): c {s['compress_gbps']:.3f} "
            f"(x{s['speedup_compress']}, {s['compress_cpu_per_wall']} cores busy) d {s['decompress_gbps']:.3f} "
            f"(x{s['speedup_decompress']}, {s['decompress_cpu_per_wall']} cores busy) GB/s"
        )

    info["loadavg_end"] = os.getloadavg()
    doc = {
        "benchmark": "bench_codecs",
        "machine": info,
        "libraries": versions,
        "params": {
            "mib": args.mib,
            "chunk_bytes": chunk,
            "reps": args.reps,
            "no_pay_ratio": NO_PAY,
            "torch_threads": 1,
            "gbps": "raw (uncompressed) bytes / s, 1e9; *_gbps = median of reps (wall clock), "
            "*_gbps_best = min time, *_gbps_per_cpu_s = raw bytes / median process CPU seconds",
        },
        "datasets": {
            ds.name: {"desc": ds.desc, "bytes": ds.nbytes, "dtype": str(ds.tensor.dtype)} for ds in datasets
        },
        "adam": adam_info,
        "memcpy": memcpy,
        "shuffle": shuffles,
        "results": results,
        "no_pay": no_pay,
        "chunk_sweep": sweep,
        "two_threads": scaling,
        "disk_pipeline": pipeline(results),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
