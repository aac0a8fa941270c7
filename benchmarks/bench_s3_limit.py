"""asyncckpt's S3 upload and load against the server's own throughput, on a local moto server.

``bench_s3`` compares asyncckpt with DCP's fsspec writer and reader; this asks a different
question: how close do asyncckpt's upload and load come to what the server itself can take?
The server's limit is measured in the same run, on the same server, by plain requests with no
asyncckpt in them, shaped exactly like asyncckpt's:

- **raw PUT**: one multipart upload per shard file asyncckpt wrote (same object sizes), parts
  of the same size (``FsspecStorage.part_size``), the same number in flight per object
  (``upload_concurrency``), all objects at once (as ``write_threads`` writes its files).  The
  bodies are prebuilt ``bytes``; nothing is staged, checksummed or stat'ed afterwards.
- **raw GET**: the same ranged GETs asyncckpt's reader issues (each file's blobs coalesced by
  ``reader.coalesce`` up to ``ManifestReader.COALESCE_BYTES``), ``READ_CONCURRENCY`` in
  flight, each body streamed into its place in one buffer allocated and touched beforehand
  (as asyncckpt's reader streams into a staging slot; reading each body whole into new
  ``bytes`` cost the client about a fifth more and understated the server).
- **raw GET of whole-file pieces**: the ranged GETs of ``ck.resume``, which reads each shard
  file whole into its staging slot in pieces sized for the load
  (``ManifestReader.get_size``: 32 MiB up to 256 MiB, about two rounds of GETs in flight);
  both loads read whole files so (the standalone ``resume`` into a slab laid out as the
  files) and are compared with this one; the one above is the shape of a partial load.

Both go through s3fs's async client (``S3FileSystem._call_s3``, aiobotocore) on its own event
loop, the same client asyncckpt uses.  asyncckpt is timed end to end: upload is
``save_async(step)`` until ``h.result()`` (staging copy, checksums, manifest, the size check
after each upload included); load is ``asyncckpt.resume(url, like, step=..., storage_options=...)``
into preallocated, touched tensors (listing, manifest, size checks, checksums, the copy into
the live state included), verified bit-exact after timing.  The ratio asyncckpt / raw is the
result; the goal is >= 0.9 for both.

The moto caveats of ``bench_s3`` apply to both sides equally: every GET reads the whole stored
object under a per-object lock (ranged GETs of one object are serialised), and the server is
Python on the same cores as the client, so absolute MB/s are far below real S3.  Each
repetition runs asyncckpt and raw back to back (raw first on odd repetitions); the ratio of
the medians and the median of the per-repetition ratios ("paired", which cancels the machine's
drift) are both reported.

Usage: ``python -m benchmarks.bench_s3_limit [--size-gib 0.25] [--tensors 32] [--reps 3]
[--threads 1 4] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from fsspec.asyn import sync

from asyncckpt import AsyncCheckpointer, StorageOptions, WriterOptions, layout, resume
from asyncckpt.manifest import Manifest
from asyncckpt.reader import ManifestReader, coalesce, pieces
from asyncckpt.step_files import shard_files
from asyncckpt.storage.fsspec import FsspecStorage
from benchmarks.bench_s3 import REQUESTS, moto_s3, rm
from benchmarks.bench_stall import machine_info, make_state, nbytes

MB = 1e6
GOAL = 0.9


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


async def _raw_put(fs: Any, objects: list[tuple[str, int]], part: int, conc: int, body: bytes) -> None:
    """One multipart upload per (url, size), ``conc`` parts in flight per object, all at once."""
    call = fs._call_s3

    async def one_object(url: str, size: int) -> None:
        bucket, key = _split(url)
        uid = (await call("create_multipart_upload", Bucket=bucket, Key=key))["UploadId"]
        gate = asyncio.Semaphore(conc)

        async def one_part(n: int) -> dict[str, Any]:
            length = min(part, size - n * part)
            async with gate:
                out = await call(
                    "upload_part", Bucket=bucket, Key=key, UploadId=uid, PartNumber=n + 1,
                    Body=body if length == part else body[:length],
                )  # fmt: skip
            return {"PartNumber": n + 1, "ETag": out["ETag"]}

        parts = await asyncio.gather(*(one_part(n) for n in range(-(-size // part))))
        await call(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=uid,
            MultipartUpload={"Parts": list(parts)},
        )  # fmt: skip

    await asyncio.gather(*(one_object(u, s) for u, s in objects))


async def _raw_get(fs: Any, ranges: list[tuple[str, int, int]], conc: int, out: memoryview) -> int:
    """Ranged GETs of (url, start, end), ``conc`` in flight, each streamed into its own place
    in ``out`` (allocated and touched beforehand, as a staging slot is) as its body arrives;
    returns the bytes received.  No new buffer per GET, so the client does no more per byte
    than asyncckpt's reader does."""
    gate = asyncio.Semaphore(conc)
    at = [0]
    for _, a, b in ranges:
        at.append(at[-1] + b - a)

    async def one(i: int, url: str, start: int, end: int) -> int:
        bucket, key = _split(url)
        dst, got = out[at[i] : at[i + 1]], 0
        async with gate:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            async with resp["Body"] as stream:
                while chunk := await stream.read(1 << 20):
                    dst[got : got + len(chunk)] = chunk
                    got += len(chunk)
        return got

    return sum(await asyncio.gather(*(one(i, *r) for i, r in enumerate(ranges))))


def whole_file_gets(files: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """The ranged GETs of ``ck.resume``'s whole-file reads of ``files``: each file in pieces
    sized for the whole load (``ManifestReader.get_size``)."""
    piece = ManifestReader.get_size(sum(size for _, size in files))
    return [(name, a, b) for name, size in files for a, b in pieces(size, piece)]


def shape_of(fs: Any, step_dir: str) -> tuple[list[tuple[str, int]], list[tuple[str, int, int]]]:
    """A committed step's shard files (name, size) and the ranged GETs a standalone load issues."""
    manifest = Manifest.from_json(fs.cat_file(f"{step_dir}/manifest.json"), step_dir)
    shards = shard_files(manifest)  # not .metadata: asyncckpt's small files are its own cost
    files = [(name, int(info["size"])) for name, info in sorted(manifest.files.items()) if name in shards]
    by_file: dict[str, list[Any]] = {}
    for t in manifest.tensors.values():
        for c in t.chunks:
            by_file.setdefault(c.file, []).append((c, None))
    ranges = []
    for name, reqs in sorted(by_file.items()):
        for group in coalesce(reqs, ManifestReader.COALESCE_BYTES):
            start, end = group[0][0].offset, max(c.offset + c.length for c, _ in group)
            ranges.append((name, start, end))
    return files, ranges


def _timed(fn: Any, *args: Any) -> tuple[float, dict[str, int]]:
    before = REQUESTS.snapshot()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0, REQUESTS.since(before)


def one_rep(
    rep: int,
    wt: int,
    ck: AsyncCheckpointer,
    r: dict[str, list[dict[str, Any]]],
    shapes: dict[int, Any],
    base: str,
    opts: dict[str, Any],
    fs: Any,
    state: dict[str, torch.Tensor],
    like: dict[str, torch.Tensor],
    part: int,
    conc: int,
    body: bytes,
    sink: memoryview,
) -> None:
    """One paired repetition: asyncckpt's upload and raw PUT, then asyncckpt's load and raw GET.
    Odd repetitions time the raw request first, so neither side always follows the other."""

    def save() -> None:
        before = REQUESTS.snapshot()
        t0 = time.perf_counter()
        h = ck.save_async(rep)
        assert h is not None
        info = h.result()
        s = time.perf_counter() - t0
        r["upload"].append({"s": s, "write_s": ck.stats()[-1]["write_s"], "requests": REQUESTS.since(before)})
        if wt not in shapes:
            shapes[wt] = shape_of(fs, info.path)

    def load() -> None:
        for t in like.values():
            t.zero_()
        s, reqs = _timed(lambda: resume(ck.root, {"model": like}, step=rep, storage_options=opts))
        r["load"].append({"s": s, "requests": reqs})
        bad = [k for k in state if not torch.equal(state[k], like[k])]
        if bad:
            raise AssertionError(f"resume loaded wrong data into {bad[:3]}")

    def load_ck() -> None:
        # what a training job calls: the checkpointer's resume reads into its staging buffers
        # (already allocated and touched), whole shard files at a time (after ``load``, which
        # checked ``like``)
        for t in state.values():
            t.zero_()
        s, reqs = _timed(lambda: ck.resume(step=rep))
        r["load_ck"].append({"s": s, "requests": reqs})
        bad = [k for k in state if not torch.equal(state[k], like[k])]
        if bad:
            raise AssertionError(f"ck.resume loaded wrong data into {bad[:3]}")

    raw = f"{base}/raw_wt{wt}_{rep}"

    def raw_put() -> None:
        objs = [(f"{raw}/{name}", size) for name, size in shapes[wt][0]]
        s, reqs = _timed(sync, fs.loop, _raw_put, fs, objs, part, conc, body)
        r["raw_put"].append({"s": s, "requests": reqs})

    def raw_get(key: str = "raw_get", whole: bool = False) -> None:
        ranges = whole_file_gets(shapes[wt][0]) if whole else shapes[wt][1]
        get = [(f"{raw}/{name}", a, b) for name, a, b in ranges]
        got, out = [0], sink[: sum(b - a for _, a, b in ranges)]
        s, reqs = _timed(
            lambda: got.__setitem__(0, sync(fs.loop, _raw_get, fs, get, ManifestReader.READ_CONCURRENCY, out))
        )
        assert got[0] == sum(b - a for _, a, b in ranges), got
        r[key].append({"s": s, "requests": reqs})

    def raw_get_whole() -> None:
        raw_get("raw_get_whole", whole=True)

    if wt not in shapes or rep % 2 == 0:  # the raw side needs the shape of a first save
        save(), raw_put(), load(), raw_get(), load_ck(), raw_get_whole()
    else:
        raw_put(), save(), raw_get(), load(), raw_get_whole(), load_ck()
    rm(fs, layout.step_dir(ck.root, layout.Kind.PERMANENT, rep))
    rm(fs, raw)


def run(size_gib: float, n_tensors: int, reps: int, threads: list[int]) -> dict[str, Any]:
    if reps < 1 or n_tensors < 1 or size_gib <= 0 or not threads:
        raise ValueError("reps and n_tensors must be >= 1, size_gib > 0, threads non-empty")
    state = make_state(size_gib, n_tensors)
    n = nbytes(state)
    like = {k: torch.zeros_like(v) for k, v in state.items()}
    load_start = os.getloadavg()
    recs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    shapes: dict[int, Any] = {}
    with warnings.catch_warnings(), moto_s3() as (base, opts, fs, _endpoint):
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        storage = FsspecStorage(base, opts)  # its defaults: the shape the raw requests copy
        part, conc = storage.part_size, storage.upload_concurrency
        body = os.urandom(part)
        sink = memoryview(bytearray(b"\1") * (n + n // 8 + (64 << 20)))  # touched; the files' size and more
        cks = {
            wt: AsyncCheckpointer(
                f"{base}/ackpt_wt{wt}",
                {"model": state},
                writer=WriterOptions(executor="thread", threads=wt),
                storage=StorageOptions(fsspec=opts),
            )  # fmt: skip
            for wt in threads
        }
        try:
            for wt in threads:
                recs[f"wt={wt}"] = {
                    "upload": [], "raw_put": [], "load": [], "load_ck": [], "raw_get": [], "raw_get_whole": []
                }  # fmt: skip
            for rep in range(reps):
                print(f"[bench_s3_limit] rep {rep} ...", file=sys.stderr, flush=True)
                for wt, ck in cks.items():
                    one_rep(
                        rep,
                        wt,
                        ck,
                        recs[f"wt={wt}"],
                        shapes,
                        base,
                        opts,
                        fs,
                        state,
                        like,
                        part,
                        conc,
                        body,
                        sink,
                    )
        finally:
            for ck in cks.values():
                ck.close()
    out = summarize(n, recs, shapes)
    out["config"] = {
        "size_gib": size_gib, "n_tensors": n_tensors, "reps": reps, "threads": threads,
        "state_bytes": n, "part_size": part, "upload_concurrency": conc,
        "read_concurrency": ManifestReader.READ_CONCURRENCY, "coalesce_bytes": ManifestReader.COALESCE_BYTES,
        "server": "moto ThreadedMotoServer, in-process, 127.0.0.1",
    }  # fmt: skip
    out["machine"] = {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    return out


def summarize(
    n: int, recs: dict[str, dict[str, list[dict[str, Any]]]], shapes: dict[int, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"configs": {}, "targets": {}}
    for cfg, r in recs.items():
        wt = int(cfg.split("=")[1])
        files, ranges = shapes[wt]
        m: dict[str, Any] = {
            "files": files, "gets": [[a, b] for _, a, b in ranges],
        }  # fmt: skip
        for what, xs in r.items():
            s = statistics.median(x["s"] for x in xs)
            m[what] = {"reps": xs, "median_s": s, "MBps": n / s / MB, "requests": xs[-1]["requests"]}
        m["upload"]["median_write_s"] = statistics.median(x["write_s"] for x in r["upload"])
        m["upload_x_raw"] = m["raw_put"]["median_s"] / m["upload"]["median_s"]
        # both loads read whole files in pieces sized for the load: against raw GETs of the same
        m["load_x_raw"] = m["raw_get_whole"]["median_s"] / m["load"]["median_s"]
        # each repetition's pair ran back to back: their ratio cancels the machine's drift
        m["upload_x_raw_paired"] = statistics.median(
            p["s"] / a["s"] for p, a in zip(r["raw_put"], r["upload"])
        )
        m["load_x_raw_paired"] = statistics.median(
            p["s"] / a["s"] for p, a in zip(r["raw_get_whole"], r["load"])
        )
        m["load_ck_x_raw"] = m["raw_get_whole"]["median_s"] / m["load_ck"]["median_s"]
        m["load_ck_x_raw_paired"] = statistics.median(
            p["s"] / a["s"] for p, a in zip(r["raw_get_whole"], r["load_ck"])
        )
        out["configs"][cfg] = m
        out["targets"][f"{cfg} upload >= {GOAL}x raw PUT"] = m["upload_x_raw"] >= GOAL
        out["targets"][f"{cfg} load >= {GOAL}x raw GET of its pieces"] = m["load_x_raw"] >= GOAL
        out["targets"][f"{cfg} ck.resume >= {GOAL}x raw GET of its pieces"] = m["load_ck_x_raw"] >= GOAL
    return out


def _reqs(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items())


def format_table(r: dict[str, Any]) -> str:
    c, mach = r["config"], r["machine"]
    lines = [
        f"state: {c['state_bytes'] / 2**30:.3f} GiB in {c['n_tensors']} fp32 tensors, {c['reps']} reps; "
        f"parts {c['part_size'] >> 20} MiB x {c['upload_concurrency']} in flight per object, GETs <= "
        f"{c['coalesce_bytes'] >> 20} MiB x {c['read_concurrency']} in flight; {mach['cpu_count']} CPUs, "
        f"loadavg {mach['loadavg_start'][0]:.2f} -> {mach['loadavg_end'][0]:.2f}",
        f"{'config':<8} {'measure':<34} {'median s':>8} {'MB/s':>7} {'x raw':>6} {'paired':>6}  requests (last rep)",
    ]
    for cfg, m in r["configs"].items():
        for what, label, ratio in (
            ("raw_put", f"raw PUT ({len(m['files'])} objects)", None),
            ("upload", "asyncckpt save..result", (m["upload_x_raw"], m["upload_x_raw_paired"])),
            ("raw_get", f"raw GET ({len(m['gets'])} ranges)", None),
            ("raw_get_whole", f"raw GET ({len(whole_file_gets(m['files']))} whole-file pieces)", None),
            ("load", "asyncckpt resume", (m["load_x_raw"], m["load_x_raw_paired"])),
            ("load_ck", "asyncckpt ck.resume", (m["load_ck_x_raw"], m["load_ck_x_raw_paired"])),
        ):
            x = m[what]
            rx = f"{ratio[0]:>6.2f} {ratio[1]:>6.2f}" if ratio is not None else f"{'':>13}"
            lines.append(
                f"{cfg:<8} {label:<34} {x['median_s']:>8.2f} {x['MBps']:>7.1f} {rx}  {_reqs(x['requests'])}"
            )
    lines += [f"target {k}: {v}" for k, v in r["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=None, help="state size (default 0.25; --quick 1/16)")
    p.add_argument("--tensors", type=int, default=32, help="number of fp32 tensors (default 32)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --quick 1)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="write_threads (default 1 4)")
    p.add_argument("--json", default=None, help="write the full results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 1 rep")
    args = p.parse_args(argv)
    size = args.size_gib if args.size_gib is not None else (1 / 16 if args.quick else 0.25)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    result = run(size, args.tensors, reps, args.threads)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
