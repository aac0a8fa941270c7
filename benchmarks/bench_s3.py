"""S3 upload and load throughput of asyncckpt against DCP's fsspec writer and reader, and the
trainer stall with an ``s3://`` root against a local root, on a local moto S3 server.

Everything runs in one process, in one run, against one ``moto`` server listening on
127.0.0.1 (nothing else is contacted).  The state is ``--tensors`` fp32 tensors of mixed sizes,
``--size-gib`` in all (``bench_stall``'s generator).  MB/s is always the state's byte count
(the payload) over seconds, so every method is charged for the same bytes.

**Read the ratios, not the MB/s.**  moto is an in-process Python HTTP server: its request
threads share this process's GIL and the machine's cores with the client under test, so it
is far slower than real S3 and the absolute MB/s say little about a real object store.
Every method talks to the same server in the same run, so the ratios between them are the
result.  Two moto costs that real S3 does not have shape them:

- every GET, ranged or not, reads the whole stored object (spilled to a temp file above
  ~5 MiB) under a per-object lock and slices it, so a load's cost grows with its number of
  GETs times the object size, and concurrent ranged GETs of one object are serialised;
- the server's per-byte work (request parsing, checksums, spooling, multipart assembly) runs
  in Python on the same 2 cores, so the server, not the client, is usually the bottleneck.

The server's requests are counted by verb (werkzeug's request log, silenced) and shown per
method, so the tables say how much of a difference is request count.

1. Upload  the repetitions are interleaved, each into a fresh prefix, removed once timed:
           asyncckpt, thread executor, ``write_threads`` 1 and 4 (one checkpointer each, built
           untimed): ``save_async`` until ``h.result()``, staging copy included, with the
           background-only ``stats()[-1]["write_s"]``;
           ``dcp.save(sd, storage_writer=FsspecWriter(url, **storage_options), no_dist=True)``
           with the writer's defaults (``thread_count=1``, ``sync_files=True``; on S3 the
           stream has no ``fileno()``, so each "fsync" is a local ``os.sync()``), and tuned
           (``thread_count=4``, ``sync_files=False``), writer built inside the timing.
           All methods share one connected s3fs instance (fsspec's instance cache).
2. Load    ``asyncckpt.resume(url, like, step=N, storage_options=...)`` and
           ``dcp.load(like, storage_reader=FsspecReader(url, **storage_options), no_dist=True)``
           into the same preallocated, touched tensors, interleaved; both loads are verified.
           They read the last repetition's asyncckpt ``write_threads=1`` and default-DCP
           checkpoints (both single-file).
3. Stall   the trainer-visible ``stall_s`` of ``save_async`` (``overlap=False``) with an
           ``s3://`` root against a local temp dir root, same state, interleaved, each save
           waited for (untimed) before the next.  The stall is the copy into the staging
           pool and should not depend on where the bytes go: s3 / local should be ~1.  A
           floor (``copy_`` of every tensor into touched buffers, bench_stall's) is timed in
           the same loop: when it is noisy too, the noise is the machine, not the root.  On
           a 2-core box a busy neighbour makes torch's 2-thread ``copy_`` bimodal (a few ms,
           or ~170 ms when one of its threads waits for a core), so the minimum is given too.

Usage: ``python -m benchmarks.bench_s3 [--size-gib 0.25] [--tensors 32] [--reps 3]
[--stall-reps 5] [--dir PARENT] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from asyncckpt import AsyncCheckpointer, resume
from benchmarks.bench_stall import machine_info, make_state, nbytes

MB = 1e6
CONFIGS = {f"asyncckpt thread wt={n}": n for n in (1, 4)}
DCP_WRITERS: dict[str, dict[str, Any]] = {
    "dcp.save FsspecWriter (default)": {},  # thread_count=1, sync_files=True
    "dcp.save FsspecWriter tc=4 nosync": {"thread_count": 4, "sync_files": False},
}
LOAD_FROM = "asyncckpt thread wt=1"  # whose checkpoint the load phase reads
DCP_LOAD_FROM = "dcp.save FsspecWriter (default)"
LOADS = ("asyncckpt resume", "dcp.load FsspecReader")
STALLS = ("s3:// root", "local root")
FLOOR = "floor (copy_ into touched buffers)"
TARGET = 3.0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class RequestCounter(logging.Handler):
    """Counts the server's requests by HTTP verb from werkzeug's per-request log records.

    It is the ``werkzeug`` logger's only handler and the logger does not propagate, so the
    request log is silenced (nothing is printed) but every request is still counted.
    """

    ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some lines (e.g. 206, 404)
    VERB = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) ')

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._lock_counts = threading.Lock()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            m = self.VERB.search(self.ANSI.sub("", record.getMessage()))
            if m:
                with self._lock_counts:
                    self.counts[m.group(1)] = self.counts.get(m.group(1), 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock_counts:
            return dict(self.counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        now = self.snapshot()
        return {k: v - before.get(k, 0) for k, v in sorted(now.items()) if v - before.get(k, 0)}


REQUESTS = RequestCounter()


@contextlib.contextmanager
def moto_s3() -> Any:
    """A moto S3 server on 127.0.0.1 (random port), a fresh bucket, and its fsspec options."""
    from moto.server import ThreadedMotoServer

    wl = logging.getLogger("werkzeug")
    saved = (wl.level, wl.propagate, list(wl.handlers))
    wl.setLevel(logging.INFO)  # counted by REQUESTS, never printed
    wl.handlers[:] = [REQUESTS]
    wl.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        assert server._server is not None
        port = server._server.server_address[1]
        url = f"http://127.0.0.1:{port}"
        opts = {
            "key": "benchkey",
            "secret": "benchsecret",
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
        }
        import fsspec

        fs = fsspec.filesystem("s3", **opts)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.call_s3("create_bucket", Bucket=bucket)
        yield f"s3://{bucket}", opts, fs, url
    finally:
        server.stop()
        wl.level, wl.propagate, wl.handlers[:] = saved[0], saved[1], saved[2]


def rm(fs: Any, url: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(url, recursive=True)
    fs.invalidate_cache()


def measure_uploads(
    state: dict[str, torch.Tensor], reps: int, base: str, opts: dict[str, Any], fs: Any, keep: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """(1), repetitions interleaved; the last repetition's checkpoints are left in ``keep``."""
    ups: dict[str, list[dict[str, Any]]] = {m: [] for m in (*CONFIGS, *DCP_WRITERS)}
    with contextlib.ExitStack() as stack:
        cks = {}
        for name, wt in CONFIGS.items():
            root = f"{base}/{name.replace(' ', '_').replace('=', '')}"
            cks[name] = AsyncCheckpointer(
                root, {"model": state}, executor="thread", write_threads=wt, storage_options=opts
            )
            stack.callback(cks[name].close)
        for rep in range(reps):
            print(f"[bench_s3] upload rep {rep} ...", file=sys.stderr, flush=True)
            last = rep == reps - 1
            for name, ck in cks.items():
                before = REQUESTS.snapshot()
                t0 = time.perf_counter()
                h = ck.save_async(rep)
                assert h is not None  # on_busy="wait" (the default) always saves
                info = h.result()
                t = time.perf_counter() - t0
                st = ck.stats()[-1]
                rec = {"s": t, **{k: st[k] for k in ("write_s", "stall_s", "bytes_written")}}
                ups[name].append({**rec, "requests": REQUESTS.since(before)})
                if last and name == LOAD_FROM:
                    keep["ackpt_root"], keep["ackpt_step"] = ck.root, rep
                else:
                    rm(fs, info.path)
            for i, (name, kw) in enumerate(DCP_WRITERS.items()):
                url = f"{base}/dcp{i}_{rep}"
                before = REQUESTS.snapshot()
                t0 = time.perf_counter()
                dcp.save(state, storage_writer=FsspecWriter(url, **kw, **opts), no_dist=True)
                t = time.perf_counter() - t0
                reqs = REQUESTS.since(before)
                fs.invalidate_cache()
                ups[name].append({"s": t, "bytes_written": float(fs.du(url)), "requests": reqs})
                if last and name == DCP_LOAD_FROM:
                    keep["dcp"] = url
                else:
                    rm(fs, url)
    return ups


def measure_loads(
    state: dict[str, torch.Tensor], reps: int, opts: dict[str, Any], keep: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """(2), interleaved; both loads are verified against the saved state."""
    loads: dict[str, list[dict[str, Any]]] = {m: [] for m in LOADS}
    like = {k: torch.zeros_like(v) for k, v in state.items()}  # preallocated and touched
    for rep in range(reps):
        print(f"[bench_s3] load rep {rep} ...", file=sys.stderr, flush=True)
        for name in LOADS:
            for t in like.values():
                t.zero_()
            before = REQUESTS.snapshot()
            t0 = time.perf_counter()
            if name == "asyncckpt resume":
                got = resume(
                    keep["ackpt_root"], {"model": like}, step=keep["ackpt_step"], storage_options=opts
                )
                assert got == keep["ackpt_step"], got
            else:
                dcp.load(like, storage_reader=FsspecReader(keep["dcp"], **opts), no_dist=True)
            loads[name].append({"s": time.perf_counter() - t0, "requests": REQUESTS.since(before)})
            bad = [k for k in state if not torch.equal(state[k], like[k])]
            if bad:
                raise AssertionError(f"{name} loaded wrong data into {bad[:3]}")
    return loads


def measure_stalls(
    state: dict[str, torch.Tensor], reps: int, base: str, opts: dict[str, Any], fs: Any, local: str
) -> dict[str, list[dict[str, Any]]]:
    """(3), interleaved; every save is waited for (untimed) and removed before the next."""
    stalls: dict[str, list[dict[str, Any]]] = {m: [] for m in (*STALLS, FLOOR)}
    dst = {k: torch.empty_like(t).zero_() for k, t in state.items()}  # allocated and touched
    with contextlib.ExitStack() as stack:
        cks = {
            STALLS[0]: AsyncCheckpointer(
                f"{base}/stall", {"model": state}, overlap=False, storage_options=opts
            ),
            STALLS[1]: AsyncCheckpointer(local, {"model": state}, overlap=False),
        }
        for ck in cks.values():
            stack.callback(ck.close)
        for rep in range(reps):
            print(f"[bench_s3] stall rep {rep} ...", file=sys.stderr, flush=True)
            for name, ck in cks.items():
                t0 = time.perf_counter()
                h = ck.save_async(rep)
                wall = time.perf_counter() - t0
                assert h is not None
                info = h.result()
                st = ck.stats()[-1]
                stalls[name].append({"stall_s": st["stall_s"], "call_s": wall, "write_s": st["write_s"]})
                if name == STALLS[0]:
                    rm(fs, info.path)
                else:
                    shutil.rmtree(info.path)
                    os.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                for k, t in state.items():
                    dst[k].copy_(t)
            floor = time.perf_counter() - t0
            stalls[FLOOR].append({"stall_s": floor, "call_s": floor, "write_s": 0.0})
    return stalls


def _phase(errors: dict[str, str], name: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        errors[name] = traceback.format_exc()
        print(errors[name], file=sys.stderr, flush=True)
        return None


def run(size_gib: float, n_tensors: int, reps: int, stall_reps: int, directory: str | None) -> dict[str, Any]:
    """Measure everything against a fresh moto server; local checkpoints go under ``directory``."""
    if reps < 1 or stall_reps < 1 or n_tensors < 1 or size_gib <= 0:
        raise ValueError("reps, stall_reps and n_tensors must be >= 1 and size_gib > 0")
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    state = make_state(size_gib, n_tensors)
    n = nbytes(state)
    load_start = os.getloadavg()
    local = tempfile.mkdtemp(prefix="bench_s3-", dir=directory)
    errors: dict[str, str] = {}
    keep: dict[str, Any] = {}
    try:
        with warnings.catch_warnings(), moto_s3() as (base, opts, fs, endpoint):
            # dcp warns on every no_dist call that it assumes a single process; that is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            ups = _phase(errors, "upload", measure_uploads, state, reps, base, opts, fs, keep)
            loads = None
            if ups is not None:
                loads = _phase(errors, "load", measure_loads, state, reps, opts, keep)
            stalls = _phase(errors, "stall", measure_stalls, state, stall_reps, base, opts, fs, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    result = summarize(n, ups, loads, stalls)
    result["errors"] = errors
    result["config"] = {
        "size_gib": size_gib,
        "n_tensors": n_tensors,
        "reps": reps,
        "stall_reps": stall_reps,
        "state_bytes": n,
        "server": "moto ThreadedMotoServer, in-process, 127.0.0.1",
    }
    result["machine"] = {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    return result


def summarize(
    n: int,
    ups: dict[str, list[dict[str, Any]]] | None,
    loads: dict[str, list[dict[str, Any]]] | None,
    stalls: dict[str, list[dict[str, Any]]] | None,
) -> dict[str, Any]:
    """Medians, MB/s and the ratios (speed ratios: DCP time / asyncckpt time)."""
    out: dict[str, Any] = {"uploads": None, "loads": None, "stalls": None, "targets": {}}
    targets = out["targets"]
    if ups is not None:
        u_out: dict[str, dict[str, Any]] = {}
        for name, recs in ups.items():
            s = med([r["s"] for r in recs])
            m = u_out[name] = {
                "reps": recs,
                "median_s": s,
                "MBps": n / s / MB,
                "requests": recs[-1]["requests"],
            }
            if name in CONFIGS:
                bg = m["median_write_s"] = med([r["write_s"] for r in recs])
                m["bg_MBps"] = n / bg / MB
                m["median_stall_s"] = med([r["stall_s"] for r in recs])
        for name in CONFIGS:
            u_out[name]["x_dcp"] = {d: u_out[d]["median_s"] / u_out[name]["median_s"] for d in DCP_WRITERS}
        out["uploads"] = u_out
        targets[f"upload >= {TARGET:g}x dcp (default writer)"] = {
            k: u_out[k]["x_dcp"][DCP_LOAD_FROM] >= TARGET for k in CONFIGS
        }
        targets[f"upload >= {TARGET:g}x dcp (tc=4 nosync)"] = {
            k: u_out[k]["x_dcp"]["dcp.save FsspecWriter tc=4 nosync"] >= TARGET for k in CONFIGS
        }
    if loads is not None:
        l_out: dict[str, dict[str, Any]] = {
            k: {"reps": v, "median_s": med([r["s"] for r in v]), "requests": v[-1]["requests"]}
            for k, v in loads.items()
        }
        for m in l_out.values():
            m["MBps"] = n / m["median_s"] / MB
        out["loads"] = l_out
        out["load_x_dcp"] = l_out[LOADS[1]]["median_s"] / l_out[LOADS[0]]["median_s"]
        targets[f"load >= {TARGET:g}x dcp.load"] = out["load_x_dcp"] >= TARGET
    if stalls is not None:
        s_out: dict[str, dict[str, Any]] = {}
        for name, recs in stalls.items():
            s_out[name] = {
                "reps": recs,
                "median_stall_s": med([r["stall_s"] for r in recs]),
                "min_stall_s": min(r["stall_s"] for r in recs),
                "median_write_s": med([r["write_s"] for r in recs]),
            }
        for m in s_out.values():
            m["x_floor"] = m["median_stall_s"] / s_out[FLOOR]["median_stall_s"]
        out["stalls"] = s_out
        ratio = out["stall_s3_over_local"] = (
            s_out[STALLS[0]]["median_stall_s"] / s_out[STALLS[1]]["median_stall_s"]
        )
        out["stall_s3_over_local_min"] = s_out[STALLS[0]]["min_stall_s"] / s_out[STALLS[1]]["min_stall_s"]
        targets["stall s3/local within 0.8..1.25"] = 0.8 <= ratio <= 1.25
    return out


def _reqs(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items())


def format_table(r: dict[str, Any]) -> str:
    c, mach = r["config"], r["machine"]
    la0, la1 = mach["loadavg_start"], mach["loadavg_end"]
    lines = [
        f"state: {c['state_bytes'] / 2**30:.3f} GiB in {c['n_tensors']} fp32 tensors, {c['reps']} reps "
        f"({c['stall_reps']} for the stall); torch {mach['torch_version']}, {mach['cpu_count']} CPUs; "
        f"loadavg {la0[0]:.2f} -> {la1[0]:.2f}",
        "server: moto, in-process on 127.0.0.1 (shares the GIL and the cores): absolute MB/s are far "
        "below real S3, compare the ratios",
    ]
    if r["uploads"]:
        lines.append(
            f"{'upload (save_async..result)':<36} {'median s':>8} {'MB/s':>7} {'x dcp def':>9} {'x dcp tc4':>9} "
            f"{'bg s':>6} {'bg MB/s':>7} {'stall ms':>8}  requests (last rep)"
        )
        for name, m in r["uploads"].items():
            row = f"{name:<36} {m['median_s']:>8.2f} {m['MBps']:>7.1f}"
            if "x_dcp" in m:
                x = list(m["x_dcp"].values())
                row += f" {x[0]:>9.2f} {x[1]:>9.2f} {m['median_write_s']:>6.2f} {m['bg_MBps']:>7.1f}"
                row += f" {m['median_stall_s'] * 1e3:>8.1f}"
            else:
                row += f" {'-':>9} {'-':>9} {'-':>6} {'-':>7} {'-':>8}"
            lines.append(f"{row}  {_reqs(m['requests'])}")
    if r["loads"]:
        lines.append(
            f"{'load into preallocated tensors':<36} {'median s':>8} {'MB/s':>7}  requests (last rep)"
        )
        lines += [
            f"{k:<36} {m['median_s']:>8.2f} {m['MBps']:>7.1f}  {_reqs(m['requests'])}"
            for k, m in r["loads"].items()
        ]
        lines.append(f"asyncckpt resume: {r['load_x_dcp']:.2f}x dcp.load speed")
    if r["stalls"]:
        lines.append(f"{'stall, overlap=False':<36} {'med ms':>8} {'min ms':>7} {'x floor':>9} {'bg s':>6}")
        for name, m in r["stalls"].items():
            bg = f"{m['median_write_s']:>6.2f}" if name != FLOOR else f"{'-':>6}"
            lines.append(
                f"{name:<36} {m['median_stall_s'] * 1e3:>8.1f} {m['min_stall_s'] * 1e3:>7.1f} "
                f"{m['x_floor']:>9.2f} {bg}"
            )
        lines.append(
            f"stall s3 / local: {r['stall_s3_over_local']:.2f} (medians), "
            f"{r['stall_s3_over_local_min']:.2f} (minimums)"
        )
    for name, ok in r["targets"].items():
        lines.append(f"target {name}: {ok}")
    for phase, tb in r["errors"].items():
        lines.append(f"{phase} ERROR: {tb.strip().splitlines()[-1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=None, help="state size (default 0.25; --quick 1/32)")
    p.add_argument("--tensors", type=int, default=32, help="number of fp32 tensors (default 32)")
    p.add_argument("--reps", type=int, default=None, help="upload/load repetitions (default 3; --quick 1)")
    p.add_argument("--stall-reps", type=int, default=None, help="stall repetitions (default 5; --quick 3)")
    p.add_argument("--dir", default=None, help="parent directory for the local-root checkpoints")
    p.add_argument("--json", default=None, help="write the full results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 32 MiB, 1 rep (3 for the stall)")
    args = p.parse_args(argv)
    size = args.size_gib if args.size_gib is not None else (1 / 32 if args.quick else 0.25)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    stall_reps = args.stall_reps if args.stall_reps is not None else (3 if args.quick else 5)
    result = run(size, args.tensors, reps, stall_reps, args.dir)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
