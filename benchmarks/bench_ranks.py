"""Stall and commit latency per save on 1, 2 and 4 ranks: asyncckpt vs ``dcp.save``.

Every world size saves the same *global* state: ``--tensors`` fp32 tensors (``--size-gib`` in
all, equal sizes) held as DTensors sharded on dim 0 (``Shard(0)``), so each rank holds
``1/world`` of every tensor and the bytes per rank shrink as ranks are added, plus one small
plain tensor (64 KiB) that is identical on every rank (replicated, written once).  The global
values do not depend on the world size: each tensor is generated in 64 row blocks, each from
its own seed, and a rank generates only its blocks.

Each world size runs as N fresh processes (``python -m benchmarks.bench_ranks --worker ...``)
joined in a gloo group through a FileStore in the temp directory (no TCP port).  Each rank
writes its timings as JSON to a file the parent collects.  Per world size, in one run:

1. asyncckpt, ``executor="thread"``, ``overlap=False``: the **stall** is
   ``ck.stats()[-1]["stall_s"]`` (the time ``save_async`` blocks the trainer); the **commit
   latency** is the time from ``save_async`` returning to ``h.result()`` returning, i.e. until
   the manifest is committed, as seen by that rank.  Rank 0 writes the manifest once every
   rank's done record is there; the other ranks poll for it (asyncckpt's backoff starts at
   20 ms and grows to 0.5 s, so their latency includes up to one poll interval).
2. ``torch.distributed.checkpoint.save`` of the same DTensor state on the same group:
   synchronous, so its wall time is its stall (and its commit).

Every repetition starts at a ``dist.barrier()``, as a synchronous training step would.  For
each repetition the table takes rank 0's value and the maximum over ranks (a synchronous step
waits for the slowest rank); medians leave out the first repetition, which is reported on its
own.  Between repetitions (untimed) every rank waits for the commit, rank 0 deletes the step's
directory and calls ``os.sync()``, so each repetition starts with no dirty page cache.
``ratio`` is ``dcp.save`` stall / asyncckpt stall (max over ranks).

Each rank uses ``--threads`` torch threads (default 1, as ``OMP_NUM_THREADS=1`` in the
multi-rank tests), so every row copies with one thread per rank.  (On the 2-core CI VM under
load from other processes, 2 intra-op threads in one rank made the 32 MiB staging copy take
110-125 ms instead of 9-13 ms: a parallel copy waits for its slowest, preempted thread.)  A
world size larger than the machine's CPU count oversubscribes it (each rank also has a writer
thread); the output says so, since those rows then measure contention too.

Usage: ``python -m benchmarks.bench_ranks [--size-gib 0.25] [--tensors 16] [--reps 5]
[--ranks 1,2,4] [--threads N] [--dir PARENT] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

from .bench_stall import machine_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = 64  # row blocks per global tensor: world sizes must divide this
COLS = 256
REPLICATED_NUMEL = 16384  # 64 KiB fp32, the same on every rank
TAIL = 4000  # characters of a failed rank's stderr kept in the results


# ---------------------------------------------------------------------------------- the state


def global_rows(size_gib: float, n_tensors: int) -> int:
    """Rows (of ``COLS`` fp32) per global tensor: a multiple of ``BLOCKS``, at least one block."""
    numel = int(size_gib * (1 << 30)) // 4 // n_tensors
    return max(BLOCKS, numel // COLS // BLOCKS * BLOCKS)


def local_block(i: int, rows: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s dim-0 shard of global tensor ``i``; the values are independent of ``world``."""
    per_block = rows // BLOCKS
    mine = range(rank * BLOCKS // world, (rank + 1) * BLOCKS // world)
    out = torch.empty(len(mine) * per_block, COLS)
    for j, b in enumerate(mine):
        gen = torch.Generator().manual_seed(i * BLOCKS + b)
        out[j * per_block : (j + 1) * per_block] = torch.rand(per_block, COLS, generator=gen)
    return out


def make_state(size_gib: float, n_tensors: int, rank: int, world: int) -> dict[str, Any]:
    """{"w": {name: DTensor Shard(0)}, "rep": plain tensor identical on every rank}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    rows = global_rows(size_gib, n_tensors)
    w = {
        f"layer{i:03d}.weight": DTensor.from_local(
            local_block(i, rows, rank, world),
            mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size((rows, COLS)),
            stride=(COLS, 1),
        )
        for i in range(n_tensors)
    }
    rep = torch.rand(REPLICATED_NUMEL, generator=torch.Generator().manual_seed(12345))
    return {"w": w, "rep": rep}


def local_bytes(state: dict[str, Any]) -> int:
    shards = sum(d.to_local().numel() * 4 for d in state["w"].values())
    return shards + state["rep"].numel() * 4


# ---------------------------------------------------------------------------------- the worker


def _sync_point(rank: int, remove: str | None) -> None:
    """Untimed: all ranks done; rank 0 removes ``remove`` and flushes the page cache."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        os.sync()
    dist.barrier()


def worker_asyncckpt(state: dict[str, Any], root: str, reps: int, rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    from asyncckpt import AsyncCheckpointer, layout

    out: dict[str, Any] = {"stall_s": [], "commit_s": [], "call_s": [], "records": []}
    ck = AsyncCheckpointer(root, state, executor="thread", overlap=False, max_inflight=1, commit_timeout=300)
    try:
        for i in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            h = ck.save_async(i)
            t1 = time.perf_counter()
            assert h is not None, "save_async returned None (skipped)"
            stall = ck.stats()[-1]["stall_s"]
            h.result()
            t2 = time.perf_counter()
            out["stall_s"].append(stall)
            out["commit_s"].append(t2 - t1)
            out["call_s"].append(t1 - t0)
            out["records"].append(ck.stats()[-1])
            _sync_point(rank, os.path.join(root, layout.step_dirname(i)))
    finally:
        ck.close()
    return out


def worker_dcp(state: dict[str, Any], root: str, reps: int, rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    out: dict[str, Any] = {"stall_s": []}
    for i in range(reps):
        path = os.path.join(root, f"rep{i}")
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=path)
        out["stall_s"].append(time.perf_counter() - t0)
        _sync_point(rank, path)
    return out


def worker_main(args: argparse.Namespace) -> int:
    """One rank: build the state, run both methods, write this rank's JSON to ``args.out``."""
    import torch.distributed as dist

    rank, world = args.rank, args.world
    result: dict[str, Any] = {"rank": rank, "world": world, "pid": os.getpid(), "methods": {}, "errors": {}}

    def dump() -> None:
        with open(args.out + ".part", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".part", args.out)

    torch.set_num_threads(args.threads)
    result["torch_threads"] = torch.get_num_threads()
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(args.store, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.pg_timeout),
    )
    state = make_state(args.size_gib, args.tensors, rank, world)
    result["local_bytes"] = local_bytes(state)
    dump()
    methods = {
        "asyncckpt": lambda: worker_asyncckpt(state, os.path.join(args.root, "asyncckpt"), args.reps, rank),
        "dcp.save": lambda: worker_dcp(state, os.path.join(args.root, "dcp"), args.reps, rank),
    }
    for name, fn in methods.items():
        try:
            result["methods"][name] = fn()
        except BaseException:
            result["errors"][name] = traceback.format_exc()
            print(f"[rank {rank}] {name} failed:\n{result['errors'][name]}", file=sys.stderr, flush=True)
            dump()
            os._exit(1)  # the other ranks would wait at a barrier: skip collective teardown
        dump()
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------- the parent


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def launch_world(world: int, cfg: dict[str, Any], root: str, timeout: float) -> dict[str, Any]:
    """Run ``world`` worker processes; return their per-rank JSON (or the error)."""
    wdir = os.path.join(root, f"world{world}")
    os.makedirs(wdir)
    store = os.path.join(wdir, "store")
    outs = [os.path.join(wdir, f"rank{r}.json") for r in range(world)]
    threads = cfg["threads"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(threads))
    logs = [open(os.path.join(wdir, f"rank{r}.stderr"), "w+") for r in range(world)]
    procs = []
    t0 = time.perf_counter()
    load_before = loadavg()
    try:
        for r in range(world):
            cmd = [
                sys.executable, "-m", "benchmarks.bench_ranks", "--worker",
                "--rank", str(r), "--world", str(world), "--store", store,
                "--root", os.path.join(wdir, "ckpt"), "--out", outs[r],
                "--size-gib", repr(cfg["size_gib"]), "--tensors", str(cfg["n_tensors"]),
                "--reps", str(cfg["reps"]), "--threads", str(threads),
                "--pg-timeout", str(int(timeout)),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[r], env=env, cwd=REPO))
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    p.kill()  # only the workers this call started
            for p in procs:
                p.wait()
        ranks: list[dict[str, Any] | None] = []
        for path in outs:
            try:
                with open(path) as f:
                    ranks.append(json.load(f))
            except (OSError, ValueError):
                ranks.append(None)
        stderr = []
        for log in logs:
            log.seek(0)
            stderr.append(log.read()[-TAIL:])
    finally:
        for log in logs:
            log.close()
    res: dict[str, Any] = {
        "world": world,
        "threads_per_rank": threads,
        "oversubscribed": world > (os.cpu_count() or 1),
        "wall_s": time.perf_counter() - t0,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "returncodes": [p.returncode for p in procs],
        "ranks": ranks,
    }
    errors = {r: got["errors"] for r, got in enumerate(ranks) if got is not None and got["errors"]}
    bad = [r for r, p in enumerate(procs) if p.returncode != 0 or ranks[r] is None or r in errors]
    if timed_out or bad:
        res["error"] = (f"timed out after {timeout:.0f}s; " if timed_out else "") + f"ranks {bad} failed"
        res["stderr_tails"] = {r: stderr[r] for r in bad}
        res["tracebacks"] = errors
    return res


def summarize(values: list[float]) -> dict[str, Any]:
    rest = values[1:] or values
    return {
        "values_s": values,
        "first_s": values[0],
        "median_excl_first_s": statistics.median(rest),
        "min_s": min(values),
        "max_s": max(values),
    }


def aggregate(res: dict[str, Any]) -> dict[str, Any]:
    """Per metric: rank 0's series and the per-repetition max over ranks, each summarized."""
    ranks = res["ranks"]
    series = {
        "asyncckpt_stall": [r["methods"]["asyncckpt"]["stall_s"] for r in ranks],
        "asyncckpt_commit": [r["methods"]["asyncckpt"]["commit_s"] for r in ranks],
        "dcp_save_stall": [r["methods"]["dcp.save"]["stall_s"] for r in ranks],
    }
    out: dict[str, Any] = {}
    for name, per_rank in series.items():
        maxes = [max(vals) for vals in zip(*per_rank)]
        out[name] = {"rank0": summarize(per_rank[0]), "max_over_ranks": summarize(maxes)}
    ours = out["asyncckpt_stall"]["max_over_ranks"]["median_excl_first_s"]
    commit = out["asyncckpt_commit"]["max_over_ranks"]["median_excl_first_s"]
    theirs = out["dcp_save_stall"]["max_over_ranks"]["median_excl_first_s"]
    out["dcp_over_asyncckpt_stall"] = theirs / ours if ours > 0 else None
    out["dcp_over_asyncckpt_commit"] = theirs / commit if commit > 0 else None
    out["local_bytes_per_rank"] = [r["local_bytes"] for r in ranks]
    # asyncckpt's own record; on rank 0 of several it is the whole checkpoint's total
    out["asyncckpt_stats_bytes_written"] = [
        r["methods"]["asyncckpt"]["records"][-1].get("bytes_written") for r in ranks
    ]
    return out


def run(
    size_gib: float,
    n_tensors: int,
    reps: int,
    worlds: list[int],
    threads: int,
    directory: str | None,
    timeout: float,
) -> dict[str, Any]:
    """Benchmark every world size; checkpoints go to a temp dir under ``directory`` (removed after)."""
    if reps < 1 or n_tensors < 1 or size_gib <= 0:
        raise ValueError("reps and n_tensors must be >= 1 and size_gib > 0")
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if not worlds or any(w < 1 or BLOCKS % w for w in worlds):
        raise ValueError(f"every world size must divide {BLOCKS}, got {worlds}")
    rows = global_rows(size_gib, n_tensors)
    cfg = {
        "size_gib": size_gib,
        "n_tensors": n_tensors,
        "reps": reps,
        "worlds": worlds,
        "threads": threads,
        "global_shape_per_tensor": [rows, COLS],
        "global_sharded_bytes": rows * COLS * 4 * n_tensors,
        "replicated_bytes": REPLICATED_NUMEL * 4,
        "executor": "thread",
        "overlap": False,
    }
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench_ranks-", dir=directory)
    cfg["dir"] = root
    results: dict[str, Any] = {}
    try:
        for world in worlds:
            print(f"[bench_ranks] {world} rank(s) ...", file=sys.stderr, flush=True)
            res = launch_world(world, cfg, root, timeout)
            if "error" not in res:
                res["summary"] = aggregate(res)
            else:
                print(f"[bench_ranks] {world} rank(s) failed: {res['error']}", file=sys.stderr, flush=True)
                for r, tb in res.get("tracebacks", {}).items():
                    print(f"--- rank {r}:\n{json.dumps(tb, indent=1)}", file=sys.stderr, flush=True)
            results[str(world)] = res
            shutil.rmtree(os.path.join(root, f"world{world}"), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"config": cfg, "machine": machine_info(), "worlds": results}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def format_table(result: dict[str, Any]) -> str:
    cfg, mach = result["config"], result["machine"]
    ncpu = mach["cpu_count"]
    lines = [
        f"global state: {cfg['global_sharded_bytes'] / 2**20:.0f} MiB in {cfg['n_tensors']} fp32 DTensors "
        f"{tuple(cfg['global_shape_per_tensor'])} Shard(0) + {cfg['replicated_bytes'] // 1024} KiB replicated; "
        f"{cfg['reps']} reps (medians exclude the first); asyncckpt executor=thread overlap=False",
        f"torch {mach['torch_version']}, {ncpu} CPUs, {mach['mem_total_gib']} GiB RAM; "
        "ms, each cell rank 0 / max over ranks",
        f"{'ranks':>5} {'MiB/rank':>8} {'thr':>3} {'ack stall med':>15} {'ack commit med':>15} "
        f"{'dcp.save med':>15} {'ratio':>6} {'dcp/commit':>10} {'1st stall':>13} {'1st commit':>15} {'load':>5}",
    ]
    notes = []
    for world, res in result["worlds"].items():
        if "error" in res:
            lines.append(f"{world:>5} ERROR: {res['error']}")
            continue
        s = res["summary"]

        def pair(metric: str, key: str = "median_excl_first_s", _s: dict[str, Any] = s) -> str:
            return f"{_ms(_s[metric]['rank0'][key])}/{_ms(_s[metric]['max_over_ranks'][key])}"

        mib = max(s["local_bytes_per_rank"]) / 2**20
        ratio = s["dcp_over_asyncckpt_stall"]
        cratio = s["dcp_over_asyncckpt_commit"]
        load = res["loadavg_after"][0] if res["loadavg_after"] else None
        over = "*" if res["oversubscribed"] else " "
        lines.append(
            f"{world:>4}{over} {mib:>8.1f} {res['threads_per_rank']:>3} {pair('asyncckpt_stall'):>15} "
            f"{pair('asyncckpt_commit'):>15} {pair('dcp_save_stall'):>15} "
            f"{'-' if ratio is None else f'{ratio:.1f}x':>6} {'-' if cratio is None else f'{cratio:.2f}x':>10} "
            f"{pair('asyncckpt_stall', 'first_s'):>13} {pair('asyncckpt_commit', 'first_s'):>15} "
            f"{'-' if load is None else f'{load:.1f}':>5}"
        )
        if res["oversubscribed"]:
            notes.append(
                f"* {world} ranks on {ncpu} CPUs oversubscribe this machine (plus one writer thread per "
                "rank): that row measures CPU contention as much as checkpointing"
            )
    lines.append(
        "ratio = dcp.save stall / asyncckpt stall; dcp/commit = dcp.save stall / asyncckpt commit latency "
        "(max over ranks); load = 1-min load average after the world size ran"
    )
    lines.extend(notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--size-gib", type=float, default=None, help="global state size (default 0.25; --quick 1/32)"
    )
    p.add_argument("--tensors", type=int, default=16, help="number of sharded fp32 tensors (default 16)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per method (default 5; --quick 2)")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    p.add_argument("--json", default=None, help="write the full results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 32 MiB, 2 reps")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per world size before its ranks are killed"
    )
    # worker mode (internal): one rank, launched by the parent
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--pg-timeout", type=int, default=900, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = args.size_gib if args.size_gib is not None else (1 / 32 if args.quick else 0.25)
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    if args.worker:
        args.size_gib, args.reps = size, reps
        return worker_main(args)
    worlds = [int(w) for w in args.ranks.split(",") if w.strip()]
    result = run(size, args.tensors, reps, worlds, args.threads, args.dir, args.timeout)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if any("error" in r for r in result["worlds"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
