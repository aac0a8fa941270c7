"""Training-step slowdown while a checkpoint is written in the background.

A checkpoint written "in the background" still competes with training: a writer *thread*
shares the trainer's GIL (pickling, planning, Python-level I/O loops) and a writer *process*
shares the CPU cores and memory bandwidth.  This benchmark runs a Python-heavy training step
(a few hundred tiny tensor ops plus pure-Python work, the kind of step whose speed depends on
the GIL) and measures how much slower it gets while each method writes a ``--size-gib`` state:

1. asyncckpt, ``executor="thread"``     writer thread in the trainer process
2. asyncckpt, ``executor="process"``    persistent writer process, shared-memory staging
3. ``dcp.async_save``                    default: thread mode
4. ``dcp.async_save``, process mode      ``AsyncCheckpointerType.PROCESS``; it needs a process
                                         group, so a single-rank gloo group is started on a
                                         ``FileStore`` in a temp dir
5. with ``--caps``: asyncckpt, ``executor="process"`` with ``WriterOptions(max_bandwidth=)``
   at each cap (MB/s): the trade of a slower (staler) save for fewer long steps

For every repetition: the baseline (median step time with no checkpoint activity), then for
each method one save is started and training steps run until the save's future completes.
The call that starts the save (the staging copy for all four methods) is the *stall*; it is
recorded separately and is not part of any step time.  Reported per method, as medians over
``--reps``: the median step time during the write and its slowdown against the same
repetition's baseline (the target); the mean, its slowdown and the p90 (a few long steps,
e.g. the GIL held by a writer thread, show there and not in the median); the number of steps
that overlapped the write; and the write's duration (from the start call's return to the
future's completion).  The p99 goal is judged on every step during a method's writes, pooled
over the reps, against every baseline step: one write's hundred-odd steps are too few for a
p99 of their own.  Each method first does one
untimed warm-up save (DCP's process mode spawns its daemon on the first call; asyncckpt's
writer builds its blob templates on its first write).  ``os.sync()`` runs between saves.

Usage: ``python -m benchmarks.bench_interference [--size-gib 0.5] [--tensors 64] [--reps 3]
[--steps 300] [--caps MBPS ...] [--dir PARENT] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from asyncckpt import AsyncCheckpointer, CheckpointInfo, WriterOptions
from benchmarks.bench_stall import machine_info, make_state, nbytes

ACK_THREAD, ACK_PROCESS = "asyncckpt thread", "asyncckpt process"
DCP_THREAD, DCP_PROCESS = "dcp.async_save (thread)", "dcp.async_save (process)"
# Starts one save of the state into a fresh path: returns the future of its completion.
StartFn = Callable[[int, str], "Future[Any]"]


def train_step(x0: torch.Tensor) -> float:
    """A Python-heavy step: 400 tiny tensor ops and a little pure-Python bookkeeping."""
    x = x0
    for _ in range(200):
        x = x * 1.0001 + 0.1
    acc = 0
    for i in range(2000):
        acc += i * i % 7
    return float(x[0]) + acc


def steps_while(running: Callable[[], bool], x0: torch.Tensor, max_steps: int | None = None) -> list[float]:
    """Step times (seconds) of steps run while ``running()``; at most ``max_steps`` of them."""
    times: list[float] = []
    while running() and (max_steps is None or len(times) < max_steps):
        t0 = time.perf_counter()
        train_step(x0)
        times.append(time.perf_counter() - t0)
    return times


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) >= 2 else xs[0]


def p99(xs: list[float]) -> float:
    """Within the samples (``inclusive``): the default method extrapolates past the longest
    step when there are fewer than 99, which inflates the p99 of a short write."""
    return statistics.quantiles(xs, n=100, method="inclusive")[-1] if len(xs) >= 2 else xs[0]


def _upload(resp: Any) -> Future[Any]:
    """``async_save`` returns a Future, or an AsyncSaveResponse when staging is asynchronous."""
    return getattr(resp, "upload_completion", None) or resp


@contextlib.contextmanager
def methods(state: dict[str, torch.Tensor], root: str, caps: list[float]) -> Iterator[dict[str, StartFn]]:
    """Every method as a start function; checkpointers and the process group live as long as this."""
    with contextlib.ExitStack() as stack:
        starts: dict[str, StartFn] = {}
        writers = [
            (ACK_THREAD, WriterOptions(executor="thread")),
            (ACK_PROCESS, WriterOptions(executor="process")),
        ]
        writers += [(capped(c), WriterOptions(executor="process", max_bandwidth=c * 1e6)) for c in caps]
        for name, opts in writers:
            ck = AsyncCheckpointer(os.path.join(root, name.replace(" ", "_")), {"model": state}, writer=opts)
            stack.callback(ck.close)

            def start(step: int, path: str, ck: AsyncCheckpointer = ck) -> Future[Any]:
                h = ck.save_async(step)
                assert h is not None  # on_busy="wait" always saves
                return h.committed

            starts[name] = start
        starts[DCP_THREAD] = lambda step, path: _upload(
            dcp.async_save(state, checkpoint_id=path, no_dist=True)
        )
        if not dist.is_initialized():
            store = dist.FileStore(os.path.join(root, "pg_filestore"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # the DCP daemon's own TCPStore
        stack.callback(_stop_dcp_daemon)
        starts[DCP_PROCESS] = lambda step, path: _upload(
            dcp.async_save(state, checkpoint_id=path, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        )
        yield starts


def capped(mbps: float) -> str:
    return f"{ACK_PROCESS} <={mbps:g} MB/s"


def _stop_dcp_daemon() -> None:
    # DCP keeps its process-mode daemon in a module global for the life of the interpreter;
    # dropping it sends TERMINATE (its __del__) so the next run starts clean.
    from torch.distributed.checkpoint import _async_process_executor as ape

    ape._CHECKPOINT_PROCESS = None
    gc.collect()


def finish(fut: Future[Any], path: str) -> None:
    """Wait (re-raising a failed save), then delete the checkpoint."""
    res = fut.result()
    shutil.rmtree(res.path if isinstance(res, CheckpointInfo) else path, ignore_errors=True)


def one_save(start: StartFn, step: int, path: str, x0: torch.Tensor) -> dict[str, Any]:
    """Start a save, then train until it completes; the stall is timed apart from the steps."""
    t0 = time.perf_counter()
    fut = start(step, path)
    t_ret = time.perf_counter()
    done_at: list[float] = []
    fut.add_done_callback(lambda _: done_at.append(time.perf_counter()))
    times = steps_while(lambda: not fut.done(), x0)
    finish(fut, path)
    return {"stall_s": t_ret - t0, "write_s": done_at[0] - t_ret, "step_times_s": times}


def run(
    size_gib: float,
    n_tensors: int,
    reps: int,
    n_steps: int,
    directory: str | None,
    caps: list[float] | None = None,
) -> dict[str, Any]:
    """Baseline and every method, ``reps`` times, interleaved; temp files under ``directory``."""
    caps = list(caps or [])
    if reps < 1 or n_tensors < 1 or size_gib <= 0 or n_steps < 10:
        raise ValueError("reps, n_tensors >= 1, size_gib > 0 and steps >= 10 are required")
    state = make_state(size_gib, n_tensors)
    x0 = torch.rand(64)
    steps_while(lambda: True, x0, 50)  # warm up the interpreter and the allocator
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench_interference-", dir=directory)
    raw: dict[str, list[dict[str, Any]]] = {}
    baselines: list[float] = []
    base_all: list[float] = []  # every baseline step of every rep
    load = {"start": os.getloadavg()}
    try:
        with warnings.catch_warnings(), methods(state, root, caps) as starts:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            for name, start in starts.items():  # untimed warm-up save
                print(f"[bench_interference] warm-up {name} ...", file=sys.stderr, flush=True)
                warmup = os.path.join(root, "warmup")
                finish(start(1000, warmup), warmup)
            for rep in range(reps):
                print(f"[bench_interference] rep {rep} ...", file=sys.stderr, flush=True)
                os.sync()
                base = steps_while(lambda: True, x0, n_steps)
                baselines.append(statistics.median(base))
                base_all += base
                for name, start in starts.items():
                    os.sync()
                    r = one_save(start, rep, os.path.join(root, f"{name.split()[0]}-{rep}"), x0)
                    r["baseline_s"], r["baseline_mean_s"] = baselines[-1], statistics.fmean(base)
                    r["baseline_p99_s"] = p99(base)
                    raw.setdefault(name, []).append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load["end"] = os.getloadavg()
    result = summarize(raw, baselines, base_all)
    result["config"] = {
        "size_gib": size_gib,
        "n_tensors": n_tensors,
        "reps": reps,
        "baseline_steps": n_steps,
        "state_bytes": nbytes(state),
        "caps_mbps": caps,
    }
    result["machine"] = {**machine_info(), "loadavg": load}
    return result


def summarize(
    raw: dict[str, list[dict[str, Any]]], baselines: list[float], base_all: list[float]
) -> dict[str, Any]:
    """Per method, medians over reps; and the p99 of every step during the method's writes,
    pooled over the reps, against the p99 of every baseline step: a write of ~100 steps has
    too few for a p99 of its own (it is its longest step)."""
    med = statistics.median
    out: dict[str, dict[str, Any]] = {}
    base_p99 = p99(base_all)
    for name, recs in raw.items():
        per_rep, pooled = [], []
        for r in recs:
            t = r.pop("step_times_s")
            pooled += t
            m = med(t) if t else float("nan")
            mean = statistics.fmean(t) if t else float("nan")
            r.update(
                steps=len(t),
                median_step_s=m,
                mean_step_s=mean,
                p90_step_s=p90(t) if t else float("nan"),
                p99_step_s=p99(t) if t else float("nan"),
            )
            r["p99_vs_baseline"] = r["p99_step_s"] / r["baseline_p99_s"] if r.get("baseline_p99_s") else None
            r["slowdown_pct"] = 100.0 * (m / r["baseline_s"] - 1.0)
            r["mean_slowdown_pct"] = 100.0 * (mean / r["baseline_mean_s"] - 1.0)
            per_rep.append(r)
        out[name] = {"reps": per_rep, "steps_pooled": len(pooled), "p99_pooled_s": p99(pooled)} | {
            k: med([r[k] for r in per_rep])
            for k in (
                "median_step_s",
                "mean_step_s",
                "p90_step_s",
                "p99_step_s",
                "slowdown_pct",
                "mean_slowdown_pct",
                "steps",
                "write_s",
                "stall_s",
            )
        }
    proc, thread = out.get(ACK_PROCESS), out.get(ACK_THREAD)
    targets = {}
    if proc and thread:
        targets["asyncckpt process slowdown <= 5%"] = proc["slowdown_pct"] <= 5.0
        targets["asyncckpt process below thread"] = proc["slowdown_pct"] < thread["slowdown_pct"]
    for name in out:
        out[name]["p99_vs_baseline_per_rep"] = med([r["p99_vs_baseline"] for r in out[name]["reps"]])
        ratio = out[name]["p99_pooled_s"] / base_p99
        out[name]["p99_vs_baseline"] = ratio
        if name.startswith("asyncckpt"):
            targets[f"{name} p99 within 10% of no write"] = ratio <= 1.1
    return {
        "baseline_step_s": med(baselines), "baselines_s": baselines, "baseline_steps_pooled": len(base_all),
        "baseline_p99_pooled_s": base_p99, "methods": out, "targets": targets,
    }  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    cfg, mach = result["config"], result["machine"]
    la = mach["loadavg"]
    lines = [
        f"state: {cfg['state_bytes'] / 2**30:.3f} GiB in {cfg['n_tensors']} fp32 tensors, {cfg['reps']} reps; "
        f"torch {mach['torch_version']}, {mach['cpu_count']} CPUs, {mach['torch_num_threads']} intra-op threads; "
        f"loadavg {la['start'][0]:.2f} at start, {la['end'][0]:.2f} at end",
        f"baseline step (no checkpoint): median {result['baseline_step_s'] * 1e3:.2f} ms over "
        f"{cfg['baseline_steps']} steps",
        f"{'method':<34} {'step ms':>8} {'slowdown':>9} {'mean ms':>8} {'mean slow':>9} {'p90 ms':>7} {'p99 ms':>7} {'steps':>6} "
        f"{'write s':>8} {'stall ms':>9} {'p99 x none':>10}",
    ]
    for name, m in result["methods"].items():
        lines.append(
            f"{name:<34} {m['median_step_s'] * 1e3:>8.2f} {m['slowdown_pct']:>8.1f}% {m['mean_step_s'] * 1e3:>8.2f} "
            f"{m['mean_slowdown_pct']:>8.1f}% {m['p90_step_s'] * 1e3:>7.2f} {m['p99_step_s'] * 1e3:>7.2f} {m['steps']:>6.0f} {m['write_s']:>8.2f} "
            f"{m['stall_s'] * 1e3:>9.1f} {m['p99_vs_baseline']:>10.2f}"
        )
    for t, ok in result["targets"].items():
        lines.append(f"target: {t:<52} {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=None, help="state size (default 0.5; --quick 1/16)")
    p.add_argument("--tensors", type=int, default=64, help="number of fp32 tensors (default 64)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; --quick 2)")
    p.add_argument(
        "--steps", type=int, default=None, help="baseline steps per rep (default 300; --quick 100)"
    )
    p.add_argument(
        "--caps", type=float, nargs="*", default=[], help="also the process executor capped at these MB/s"
    )
    p.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    p.add_argument("--json", default=None, help="write the full results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 2 reps")
    args = p.parse_args(argv)
    size = args.size_gib if args.size_gib is not None else (1 / 16 if args.quick else 0.5)
    reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    steps = args.steps if args.steps is not None else (100 if args.quick else 300)
    result = run(size, args.tensors, reps, steps, args.dir, args.caps)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
