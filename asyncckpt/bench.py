"""Trainer-visible stall per checkpoint save: asyncckpt vs torch.save vs DCP, against a floor.

This is what ``asyncckpt bench`` runs (the repository's stall benchmark script is a thin command
line over it).  It needs only torch and asyncckpt, so it works from an installed wheel.

The *stall* is the wall time of the one call that blocks the training loop: the whole save for
synchronous methods, the time until ``async_save``/``save_async`` returns for asynchronous ones.
Background work (the write, the commit, an overlapped copy) is waited for between repetitions
and is not counted.  All methods save the same synthetic state (``n_tensors`` fp32 tensors of
mixed sizes, ``size_gib`` in all) in one process, in one run:

1. ``torch.save``                         synchronous, the whole write is the stall
2. ``dcp.save``                           synchronous
3. ``dcp.async_save``                     a fresh host copy is allocated on every call
4. ``dcp.async_save`` + reused stager     one ``DefaultStager`` kept across calls (cached storages)
5. asyncckpt, ``overlap=False``           copy into a pre-allocated, pre-touched host buffer
6. asyncckpt, ``overlap=True``            the copy itself runs on a background thread
7. floor                                  ``dst.copy_(src)`` per tensor into buffers that are
                                          already allocated and touched

``median / floor`` says how much a method pays on top of the one copy every snapshot needs
(allocation, page faults, pickling, planning, file I/O).  Between repetitions (untimed) the
background work is waited for and ``os.sync()`` is called, so every repetition starts with no
dirty page cache.  Checkpoints go to a temporary directory that is removed afterwards.

torch is imported inside the functions, so importing this module (``asyncckpt --help``) is cheap.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.staging import DefaultStager

FLOOR = "floor (copy_ into touched buffers)"
ASYNCCKPT = ("asyncckpt (overlap=False)", "asyncckpt (overlap=True)")
# One repetition: (rep index, fresh path for this rep) -> (stall seconds, untimed wait).
RepFn = Callable[[int, str], tuple[float, Callable[[], None]]]


def make_state(size_gib: float, n_tensors: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n_tensors`` random fp32 tensors of log-uniformly mixed sizes, ~``size_gib`` in all."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(n_tensors, generator=gen, dtype=torch.float64) * 7.0)  # 1..~1100
    total = int(size_gib * (1 << 30)) // 4
    numels = [max(1, int(total * w / weights.sum())) for w in weights.tolist()]
    state = {}
    for i, n in enumerate(numels):
        shape = (n // 256, 256) if n >= 4096 else (n,)
        state[f"layer{i:03d}.weight"] = torch.rand(shape, generator=gen)
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def machine_info() -> dict[str, Any]:
    import torch

    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_gib": None if mem_kib is None else round(mem_kib / 2**20, 2),
    }


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def _nothing() -> None:
    return None


def _wait_dcp(resp: Any) -> None:
    """``async_save`` returns a Future, or an AsyncSaveResponse when staging is asynchronous."""
    (getattr(resp, "upload_completion", None) or resp).result()


def measure(rep_fn: RepFn, reps: int, workdir: str) -> list[float]:
    """Run ``reps`` repetitions, each into a fresh path; return the stalls."""
    stalls = []
    for i in range(reps):
        stall, wait = rep_fn(i, os.path.join(workdir, f"rep{i}"))
        wait()
        os.sync()
        stalls.append(stall)
    return stalls


def bench_torch_save(state: dict[str, torch.Tensor], reps: int, workdir: str) -> list[float]:
    import torch

    def rep(i: int, path: str) -> tuple[float, Callable[[], None]]:
        return _timed(lambda: torch.save(state, path + ".pt"))[0], _nothing

    return measure(rep, reps, workdir)


def bench_dcp_save(state: dict[str, torch.Tensor], reps: int, workdir: str) -> list[float]:
    import torch.distributed.checkpoint as dcp

    def rep(i: int, path: str) -> tuple[float, Callable[[], None]]:
        return _timed(lambda: dcp.save(state, checkpoint_id=path, no_dist=True))[0], _nothing

    return measure(rep, reps, workdir)


def bench_dcp_async(
    state: dict[str, torch.Tensor], reps: int, workdir: str, stager: DefaultStager | None = None
) -> list[float]:
    import torch.distributed.checkpoint as dcp

    def rep(i: int, path: str) -> tuple[float, Callable[[], None]]:
        stall, resp = _timed(
            lambda: dcp.async_save(state, checkpoint_id=path, no_dist=True, async_stager=stager)
        )
        return stall, lambda: _wait_dcp(resp)

    return measure(rep, reps, workdir)


def bench_dcp_async_reused(state: dict[str, torch.Tensor], reps: int, workdir: str) -> list[float]:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    # CPU-only: no pinned memory, no CUDA streams; shared memory is only for the process executor.
    opts = StagingOptions(
        use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
    )
    stager = DefaultStager(opts)
    try:
        return bench_dcp_async(state, reps, workdir, stager)
    finally:
        stager.close()


def bench_asyncckpt(state: dict[str, torch.Tensor], reps: int, workdir: str, overlap: bool) -> list[float]:
    from asyncckpt import AsyncCheckpointer

    ckpt = AsyncCheckpointer(workdir, {"t": state}, overlap=overlap)
    try:

        def rep(i: int, path: str) -> tuple[float, Callable[[], None]]:
            stall, _ = _timed(lambda: ckpt.save_async(i))  # steps 0, 1, 2, ...
            return stall, ckpt.wait  # staged, written and committed (re-raises a failed save)

        return measure(rep, reps, workdir)
    finally:
        ckpt.close()


def bench_floor(state: dict[str, torch.Tensor], reps: int, workdir: str) -> list[float]:
    import torch

    dst = {k: torch.empty_like(t).zero_() for k, t in state.items()}  # allocated and touched

    def copy_all() -> None:
        with torch.no_grad():
            for k, t in state.items():
                dst[k].copy_(t)

    def rep(i: int, path: str) -> tuple[float, Callable[[], None]]:
        return _timed(copy_all)[0], _nothing

    return measure(rep, reps, workdir)


METHODS: dict[str, Callable[[dict[str, torch.Tensor], int, str], list[float]]] = {
    "torch.save": bench_torch_save,
    "dcp.save": bench_dcp_save,
    "dcp.async_save": bench_dcp_async,
    "dcp.async_save + reused DefaultStager": bench_dcp_async_reused,
    ASYNCCKPT[0]: lambda s, r, d: bench_asyncckpt(s, r, d, overlap=False),
    ASYNCCKPT[1]: lambda s, r, d: bench_asyncckpt(s, r, d, overlap=True),
    FLOOR: bench_floor,
}


def summarize(stalls: list[float]) -> dict[str, Any]:
    rest = stalls[1:]
    return {
        "stalls_s": stalls,
        "first_s": stalls[0],
        "median_s": statistics.median(stalls),
        "median_excl_first_s": statistics.median(rest) if rest else None,
        "min_s": min(stalls),
    }


def add_ratios(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Set each method's median/floor; return asyncckpt speedups (alternative / asyncckpt)."""
    floor = methods.get(FLOOR, {}).get("median_s")
    for m in methods.values():
        m["ratio_to_floor"] = m["median_s"] / floor if floor and "median_s" in m else None
    speedups: dict[str, dict[str, float]] = {}
    for name in ASYNCCKPT:
        ours = methods.get(name, {}).get("median_s")
        if not ours:
            continue
        speedups[name] = {
            alt: m["median_s"] / ours
            for alt, m in methods.items()
            if alt not in ASYNCCKPT and alt != FLOOR and "median_s" in m
        }
    return speedups


def run_methods(state: dict[str, torch.Tensor], reps: int, root: str) -> dict[str, dict[str, Any]]:
    """Each method in its own directory under ``root``, deleted as soon as it is measured."""
    methods: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        # dcp warns on every no_dist save that it assumes a single process; that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        for i, (name, fn) in enumerate(METHODS.items()):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            workdir = os.path.join(root, f"m{i}")
            os.makedirs(workdir)
            try:
                methods[name] = summarize(fn(state, reps, workdir))
            except Exception:
                methods[name] = {"error": traceback.format_exc()}
                print(methods[name]["error"], file=sys.stderr, flush=True)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                gc.collect()
    return methods


def run(size_gib: float, n_tensors: int, reps: int, directory: str | None) -> dict[str, Any]:
    """Benchmark every method; checkpoints go to a temp dir under ``directory`` (removed after).

    Returns ``{"config", "machine", "methods", "asyncckpt_speedup"}``; a method that failed has
    ``{"error": traceback}`` instead of its stalls.  Raises ValueError for a bad argument.
    """
    if reps < 1 or n_tensors < 1 or size_gib <= 0:
        raise ValueError("reps and n_tensors must be >= 1 and size_gib > 0")
    state = make_state(size_gib, n_tensors)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    root = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=directory)
    try:
        methods = run_methods(state, reps, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    speedups = add_ratios(methods)
    return {
        "config": {"size_gib": size_gib, "n_tensors": n_tensors, "reps": reps, "state_bytes": nbytes(state)},
        "machine": machine_info(),
        "methods": methods,
        "asyncckpt_speedup": speedups,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The result of ``run`` as a text table: one line per method, then asyncckpt's speedups."""
    cfg, mach = result["config"], result["machine"]
    lines = [
        f"state: {cfg['state_bytes'] / 2**30:.3f} GiB in {cfg['n_tensors']} fp32 tensors, {cfg['reps']} reps; "
        f"torch {mach['torch_version']}, {mach['cpu_count']} CPUs, {mach['mem_total_gib']} GiB RAM",
        f"{'method':<40} {'median ms':>10} {'med-1st':>9} {'min ms':>9} {'first ms':>9} {'x floor':>8}",
    ]
    for name, m in result["methods"].items():
        if "error" in m:
            lines.append(f"{name:<40} ERROR: {m['error'].strip().splitlines()[-1]}")
            continue
        ratio = "-" if m["ratio_to_floor"] is None else f"{m['ratio_to_floor']:.2f}"
        lines.append(
            f"{name:<40} {_ms(m['median_s']):>10} {_ms(m['median_excl_first_s']):>9} "
            f"{_ms(m['min_s']):>9} {_ms(m['first_s']):>9} {ratio:>8}"
        )
    for ours, alts in result["asyncckpt_speedup"].items():
        lines.append(f"speedup of {ours} (alternative median / asyncckpt median):")
        lines.extend(f"  vs {alt:<38} {s:8.1f}x" for alt, s in alts.items())
    return "\n".join(lines)
