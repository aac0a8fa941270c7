"""GPU checkpointing: stall against the pinned-copy floor, training overhead, resume time.

All in one process, on one device (``--device cuda``, or ``cpu`` to exercise the code):

(a) floor       one ``copy_`` of the state's bytes from the device into a pre-allocated
                (pinned, touched) host buffer; also one ``copy_`` per tensor into views of it.
                A snapshot cannot be taken faster.
(b) stall       time until the call returns (the training loop is blocked that long) of
                ``torch.save`` (to a file), ``dcp.async_save`` with one reused pinned
                ``DefaultStager``, and asyncckpt (``overlap`` False/True x ``executor``
                thread/process).  One untimed warm-up, then ``--reps`` timed saves, median.
                Background work is waited for between saves (untimed), then ``os.sync()``;
                each save's files are deleted before the next one.
(c) train       a bf16 ``TransformerEncoderLayer`` stack with fused AdamW, ``--steps`` steps,
                asyncckpt saving every ``--every`` steps (overlap False/True) vs the same loop
                without saving (run before and after; the mean is the baseline).
(d) resume      ``asyncckpt.resume`` of the state into the live device tensors vs a raw read
                of the same bytes into pinned memory plus one H2D ``copy_`` per tensor; warm
                (page cache) median and one cold read (``posix_fadvise(DONTNEED)`` first).

The state of each ``--sizes`` entry (GiB) is 384 bf16 tensors: 128 of x bytes and 256 of
x/2, so power-of-two sizes keep every pinned allocation a power of two (torch's pinned
allocator rounds each block up to one).  Host and device memory is released between methods.

``--budget-s`` bounds the run.  The train section runs first, then two passes over the sizes
(smallest first): floor, asyncckpt thread (with resume), raw read, dcp; then asyncckpt process
and torch.save.  An item whose time, projected from the smaller sizes, would overrun the budget
is skipped and recorded as such; so is ``torch.save`` above ``--torch-save-max-gib`` (4).
States above ``--big-gib`` (4) get ``--big-reps`` (1) timed saves instead of ``--reps`` (3).
Each item's results go to the JSON as soon as it finishes, so a killed run keeps what it had.

Usage: ``python -m benchmarks.bench_gpu --sizes 1,4,16 --json out.json``
       ``python -m benchmarks.bench_gpu --device cpu --sizes 0.01,0.02``  (a smoke run)
"""

from __future__ import annotations

import argparse
import gc
import json
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
from typing import Any

import torch

GIB = 1 << 30
DTYPE = torch.bfloat16
FLOOR_ONE = "floor: one copy_"
FLOOR_PER = "floor: copy_ per tensor"
TORCH_SAVE = "torch.save"
DCP = "dcp.async_save + reused DefaultStager"
RAW = "raw read + H2D copy_"
FLOOR = "floor"


def ackpt_name(executor: str, overlap: bool) -> str:
    return f"asyncckpt {executor} overlap={overlap}"


# Two passes over the sizes, smallest first, the most important items first, so a tight
# budget cuts the least important.  asyncckpt thread overlap=False also measures resume (d).
PASSES = [
    [FLOOR, ackpt_name("thread", False), RAW, ackpt_name("thread", True), DCP],
    [ackpt_name("process", False), ackpt_name("process", True), TORCH_SAVE],
]

# one repetition: rep index -> (stall seconds, untimed wait for the background work)
RepFn = Callable[[int], tuple[float, Callable[[], None]]]


def log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    """Return freed device memory and cached pinned host memory to the system."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):  # pinned-block cache
            fn = getattr(torch._C, name, None)
            if fn is not None:
                try:
                    fn()
                except RuntimeError:
                    pass
                break


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
    buf.zero_()  # touched: no page faults inside the timed copies
    return buf


def host_views(buf: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    views, off = {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        views[k] = buf[off : off + n].view(t.dtype).view(t.shape)
        off += n
    return views


def make_state(size_gib: float, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """384 random bf16 tensors, ``size_gib`` in all: 128 of x bytes and 256 of x/2."""
    total = int(size_gib * GIB)
    half = max(256, total // 512 // 256 * 256)  # bytes; multiples of 256 keep offsets aligned
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for i in range(128):
        for name, nbytes in (("w1", 2 * half), ("w2", half), ("w3", half)):
            n = nbytes // 2
            shape = (n // 1024, 1024) if n % 1024 == 0 else (n,)
            state[f"layers.{i:03d}.{name}"] = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    sync(device)
    return state


def nbytes_of(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def machine_info(device: str, directory: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / GIB, 1)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["host_mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    for key, path in (("dir_free_gib", directory), ("dev_shm_free_gib", "/dev/shm")):
        try:
            info[key] = round(shutil.disk_usage(path).free / GIB, 1)
        except OSError:
            info[key] = None
    info["dir"] = directory
    info["dir_fstype"] = fstype(directory)
    return info


def fstype(path: str) -> str | None:
    """The filesystem type of ``path`` (tmpfs: no disk, and cold reads are not cold)."""
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or len(parts[1]) <= len(best):
                    continue
                real, mount = os.path.realpath(path), parts[1].rstrip("/")
                if real == parts[1] or real.startswith(mount + "/"):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def summarize(times: list[float], warmup: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"times_s": times, "median_s": statistics.median(times), "min_s": min(times)}
    if warmup is not None:
        out["warmup_s"] = warmup
    return out


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def measure(rep: RepFn, reps: int) -> dict[str, Any]:
    """One untimed-in-the-median warm-up, then ``reps`` repetitions; waits between them."""
    stalls, durable = [], []
    for i in range(reps + 1):
        stall, wait = rep(i)
        t_wait, _ = timed(wait)
        os.sync()
        stalls.append(stall)
        durable.append(stall + t_wait)
    res = summarize(stalls[1:], warmup=stalls[0])
    res["durable_median_s"] = statistics.median(durable[1:])
    return res


# ------------------------------------------------------------------------- file helpers


def write_all(path: str, buf: torch.Tensor) -> None:
    mv = memoryview(buf.numpy()).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < len(mv):
            off += os.write(fd, mv[off : off + (1 << 30)])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path: str, buf: torch.Tensor) -> None:
    mv = memoryview(buf.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        off = 0
        while off < len(mv):
            n = f.readinto(mv[off : off + (1 << 30)])
            if not n:
                raise EOFError(f"{path}: {off} of {len(mv)} bytes")
            off += n


def drop_page_cache(path: str) -> bool:
    """Evict ``path`` (a file or every file under a directory) from the page cache."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# ------------------------------------------------------------------------- (a) floor, (d) raw read


def bench_floor(state: dict[str, torch.Tensor], reps: int, workdir: str, device: str) -> dict[str, Any]:
    """(a) one ``copy_`` of the state's bytes into a touched (pinned) host buffer, and one per tensor."""
    pin = device == "cuda"
    nbytes = nbytes_of(state)
    buf = host_buffer(nbytes, pin)
    views = host_views(buf, state)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)

    def one() -> None:
        buf.copy_(src, non_blocking=pin)
        sync(device)

    def per_tensor() -> None:
        with torch.no_grad():
            for k, t in state.items():
                views[k].copy_(t, non_blocking=pin)
        sync(device)

    floor: dict[str, Any] = {"pinned": pin}
    for name, fn in ((FLOOR_ONE, one), (FLOOR_PER, per_tensor)):
        sync(device)
        times = [timed(fn)[0] for _ in range(reps + 1)]
        floor[name] = summarize(times[1:], warmup=times[0])
        floor[name]["GBps"] = nbytes / floor[name]["median_s"] / 1e9
    return floor


def bench_raw_read(state: dict[str, torch.Tensor], reps: int, workdir: str, device: str) -> dict[str, Any]:
    """(d) baseline: read the state's raw bytes into a pinned buffer, one H2D ``copy_`` per tensor."""
    pin = device == "cuda"
    buf = host_buffer(nbytes_of(state), pin)
    views = host_views(buf, state)
    with torch.no_grad():
        for k, t in state.items():
            views[k].copy_(t)
    path = os.path.join(workdir, "raw.bin")
    write_all(path, buf)  # the same bytes as the state, fsynced

    def raw_read() -> None:
        read_all(path, buf)
        with torch.no_grad():
            for k, t in state.items():
                t.copy_(views[k], non_blocking=pin)
        sync(device)

    times = [timed(raw_read)[0] for _ in range(reps + 1)]
    raw = summarize(times[1:], warmup=times[0])
    raw["GBps"] = nbytes_of(state) / raw["median_s"] / 1e9
    if drop_page_cache(path):
        raw["cold_s"] = timed(raw_read)[0]
    return raw


# ------------------------------------------------------------------------- (b) stall


def bench_torch_save(state: dict[str, torch.Tensor], reps: int, workdir: str, device: str) -> dict[str, Any]:
    def rep(i: int) -> tuple[float, Callable[[], None]]:
        path = os.path.join(workdir, f"rep{i}.pt")
        stall, _ = timed(lambda: torch.save(state, path))
        return stall, lambda: os.remove(path)

    return measure(rep, reps)


def bench_dcp(state: dict[str, torch.Tensor], reps: int, workdir: str, device: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device == "cuda"
    opts = StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
    )
    stager = DefaultStager(opts)
    try:

        def rep(i: int) -> tuple[float, Callable[[], None]]:
            path = os.path.join(workdir, f"rep{i}")
            stall, resp = timed(
                lambda: dcp.async_save(state, checkpoint_id=path, no_dist=True, async_stager=stager)
            )

            def wait() -> None:
                (getattr(resp, "upload_completion", None) or resp).result()
                shutil.rmtree(path, ignore_errors=True)

            return stall, wait

        return measure(rep, reps)
    finally:
        stager.close()


def bench_asyncckpt(
    state: dict[str, torch.Tensor],
    reps: int,
    workdir: str,
    device: str,
    *,
    executor: str,
    overlap: bool,
    resume_reps: int = 0,
) -> dict[str, Any]:
    from asyncckpt import AsyncCheckpointer

    setup_s, ck = timed(
        lambda: AsyncCheckpointer(
            workdir, {"t": state}, executor=executor, overlap=overlap, max_inflight=1, on_busy="wait"
        )
    )
    last: dict[str, Any] = {}
    try:

        def rep(i: int) -> tuple[float, Callable[[], None]]:
            stall, handle = timed(lambda: ck.save_async(i))

            def wait() -> None:
                ck.wait_staged()
                info = handle.result()
                if i < reps or not resume_reps:
                    shutil.rmtree(info.path, ignore_errors=True)
                last["info"] = info

            return stall, wait

        res = measure(rep, reps)
        stats = [s for s in ck.stats() if not s.get("skipped")]
    finally:
        ck.close()
    res["setup_s"] = setup_s
    for key in ("staging_s", "write_s"):
        vals = [s[key] for s in stats[1:] if isinstance(s.get(key), (int, float))]
        if vals:
            res[f"stats_{key}_median"] = statistics.median(vals)
    if resume_reps and "info" in last:
        res["resume"] = bench_resume(state, workdir, last["info"], resume_reps, device)
        shutil.rmtree(last["info"].path, ignore_errors=True)
    return res


def bench_resume(
    state: dict[str, torch.Tensor], root: str, info: Any, reps: int, device: str
) -> dict[str, Any]:
    """(d) ``asyncckpt.resume`` into the live device tensors; checks a few tensors bit for bit."""
    import asyncckpt

    keys = list(state)
    probe = {k: state[k].clone() for k in (keys[0], keys[len(keys) // 2], keys[-1])}
    nbytes = nbytes_of(state)

    def once() -> float:
        with torch.no_grad():
            for t in state.values():
                t.zero_()
        sync(device)
        t0 = time.perf_counter()
        step = asyncckpt.resume(root, {"t": state}, step=info.step)
        sync(device)
        dt = time.perf_counter() - t0
        assert step == info.step, (step, info.step)
        return dt

    times = [once() for _ in range(reps + 1)]
    res = summarize(times[1:], warmup=times[0])
    res["GBps"] = nbytes / res["median_s"] / 1e9
    if drop_page_cache(info.path):
        res["cold_s"] = once()
    res["bit_exact_probe"] = all(torch.equal(state[k], v) for k, v in probe.items())
    res["on_device"] = all(t.device.type == device for t in state.values())
    return res


def run_method(name: str, state: dict[str, torch.Tensor], reps: int, workdir: str, device: str):
    if name == FLOOR:
        return bench_floor(state, reps, workdir, device)
    if name == RAW:
        return bench_raw_read(state, reps, workdir, device)
    if name == TORCH_SAVE:
        return bench_torch_save(state, reps, workdir, device)
    if name == DCP:
        return bench_dcp(state, reps, workdir, device)
    for executor in ("thread", "process"):
        for overlap in (False, True):
            if name == ackpt_name(executor, overlap):
                resume_reps = reps if (executor, overlap) == ("thread", False) else 0
                return bench_asyncckpt(
                    state,
                    reps,
                    workdir,
                    device,
                    executor=executor,
                    overlap=overlap,
                    resume_reps=resume_reps,
                )
    raise ValueError(name)


# ------------------------------------------------------------------------- (c) train


def train_section(args: argparse.Namespace, device: str, root: str) -> dict[str, Any]:
    from asyncckpt import AsyncCheckpointer

    torch.manual_seed(0)
    d = args.d_model
    layers = [
        torch.nn.TransformerEncoderLayer(
            d, args.heads, 4 * d, dropout=0.0, batch_first=True, device=device, dtype=DTYPE
        )
        for _ in range(args.layers)
    ]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device == "cuda" else {}))
    x = torch.randn(args.batch, args.seq, d, device=device, dtype=DTYPE)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()

    for _ in range(3):  # warm-up; creates the optimizer state
        step()
    sync(device)
    state = {"model": model, "optim": opt}
    tensors = list(model.state_dict().values()) + [
        v for s in opt.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    out: dict[str, Any] = {
        "config": {
            "d_model": d,
            "heads": args.heads,
            "layers": args.layers,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "every": args.every,
            "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
        },
        "runs": {},
    }
    variants: list[tuple[str, bool | None]] = [("none", None), ("asyncckpt overlap=False", False)]
    variants += [("asyncckpt overlap=True", True), ("none (again)", None)]
    for name, overlap in variants:
        log(f"train: {name}")
        workdir = tempfile.mkdtemp(prefix="train-", dir=root)
        ck = None
        if overlap is not None:
            ck = AsyncCheckpointer(workdir, state, overlap=overlap, max_inflight=1, on_busy="wait", keep=1)
        try:
            sync(device)
            t0 = time.perf_counter()
            for s in range(1, args.steps + 1):
                step()
                if ck is not None and s % args.every == 0:
                    ck.save_async(s)
            sync(device)
            loop_s = time.perf_counter() - t0
            run: dict[str, Any] = {"loop_s": loop_s, "step_s": loop_s / args.steps}
            if ck is not None:
                ck.wait()
                run["loop_plus_drain_s"] = time.perf_counter() - t0
                stats = [r for r in ck.stats() if not r.get("skipped")]
                run["saves"] = len(stats)
                run["stall_s"] = [r.get("stall_s") for r in stats]
                run["write_s"] = [r.get("write_s") for r in stats]
        finally:
            if ck is not None:
                ck.close()
            shutil.rmtree(workdir, ignore_errors=True)
        out["runs"][name] = run
    base = statistics.mean([out["runs"]["none"]["loop_s"], out["runs"]["none (again)"]["loop_s"]])
    out["baseline_loop_s"] = base
    for r in out["runs"].values():
        r["overhead_pct"] = 100 * (r["loop_s"] / base - 1)
        if "loop_plus_drain_s" in r:
            r["overhead_incl_drain_pct"] = 100 * (r["loop_plus_drain_s"] / base - 1)
    return out


# ------------------------------------------------------------------------- driver


class Budget:
    """Projects each method's time from its runs at the previous (smaller) sizes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()
        self.runs: dict[str, list[tuple[int, float]]] = {}  # method -> [(state bytes, seconds)]

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def projected(self, name: str, nbytes: int) -> float | None:
        """A line through the last two sizes (fixed costs do not scale), else proportional."""
        runs = self.runs.get(name)
        if not runs:
            runs = max(self.runs.values(), key=lambda r: r[-1][1] / max(r[-1][0], 1), default=None)
        if not runs:
            return None
        n1, t1 = runs[-1]
        if len(runs) >= 2 and runs[-2][0] < n1:
            n0, t0 = runs[-2]
            slope = max(0.0, (t1 - t0) / (n1 - n0))
            return max(t1, t1 + slope * (nbytes - n1))
        return t1 * nbytes / max(n1, 1)

    def skip_reason(self, name: str, nbytes: int) -> str | None:
        if self.seconds <= 0:
            return None
        est = self.projected(name, nbytes)
        left = self.left()
        if est is not None and est > left:
            return f"time budget: projected {est:.0f}s, {left:.0f}s left of --budget-s {self.seconds:.0f}"
        return None

    def record(self, name: str, nbytes: int, seconds: float) -> None:
        self.runs.setdefault(name, []).append((nbytes, seconds))


def reps_for(size: float, args: argparse.Namespace) -> int:
    return args.big_reps if size > args.big_gib else args.reps


def run_item(
    name: str,
    size: float,
    state: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: str,
    root: str,
    budget: Budget,
) -> dict[str, Any]:
    nbytes = nbytes_of(state)
    reason = budget.skip_reason(name, nbytes)
    if name == TORCH_SAVE and size > args.torch_save_max_gib:
        reason = f"state above --torch-save-max-gib {args.torch_save_max_gib:g}"
    if "process" in name and device == "cpu" and size != min(args.sizes) and not args.all_methods:
        reason = "cpu smoke run: the process executor runs at the smallest size only (--all-methods)"
    if reason:
        log(f"{size:g} GiB: {name}: skipped, {reason}")
        return {"skipped": reason}
    log(f"{size:g} GiB: {name} ...")
    workdir = tempfile.mkdtemp(prefix=f"s{size:g}-", dir=root)
    t0 = time.perf_counter()
    try:
        res = run_method(name, state, reps_for(size, args), workdir, device)
    except Exception:
        res = {"error": traceback.format_exc()}
        log(res["error"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        release_memory(device)
    res["elapsed_s"] = time.perf_counter() - t0
    budget.record(name, nbytes, res["elapsed_s"])
    return res


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Run every section; ``save(result)`` is called after each one (a partial result)."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu for a smoke run)")
    directory = args.dir or tempfile.gettempdir()
    os.makedirs(directory, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench_gpu-", dir=directory)
    budget = Budget(args.budget_s)
    result: dict[str, Any] = {
        "config": {
            "sizes_gib": args.sizes,
            "reps": args.reps,
            "big_reps": args.big_reps,
            "big_gib": args.big_gib,
            "budget_s": args.budget_s,
            "torch_save_max_gib": args.torch_save_max_gib,
            "torch_threads": torch.get_num_threads(),
        },
        "machine": machine_info(device, directory),
        "notes": [
            "stall = wall time until the call returns; median of --reps (--big-reps above --big-gib) "
            "after one warm-up",
            "durable_median_s = stall + untimed wait for the background write (fsync included)",
            "x_floor = median stall / floor (copy_ per tensor into a pinned buffer)",
            "GBps are 1e9 bytes per second",
            "cold_s: read after posix_fadvise(DONTNEED); on tmpfs (machine.dir_fstype) it is not cold",
        ],
        "sizes": {},
    }
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    # the 0.1 flat keywords (executor=, overlap=, max_inflight=) are what this script uses
    warnings.filterwarnings(
        "ignore", message="AsyncCheckpointer. the flat keywords", category=DeprecationWarning
    )

    def checkpoint() -> None:
        result["elapsed_s"] = time.perf_counter() - budget.t0
        save(result)

    try:
        if not args.no_train:
            try:
                result["train"] = train_section(args, device, root)
            except Exception:
                result["train"] = {"error": traceback.format_exc()}
                log(result["train"]["error"])
            release_memory(device)  # the model and optimizer are gone now
            checkpoint()
        for items in PASSES:
            for size in sorted(args.sizes):
                state = make_state(size, device)  # the same seed: the same bytes in every pass
                r = result["sizes"].setdefault(f"{size:g}", {"methods": {}})
                r.update({"state_bytes": nbytes_of(state), "n_tensors": len(state), "dtype": str(DTYPE)})
                r["reps"] = reps_for(size, args)
                for name in items:
                    out = run_item(name, size, state, args, device, root, budget)
                    if name == FLOOR:
                        r["floor"] = out
                    elif name == RAW:
                        r["raw_read"] = out
                    else:
                        floor = r.get("floor", {}).get(FLOOR_PER, {}).get("median_s")
                        if floor and "median_s" in out:
                            out["x_floor"] = out["median_s"] / floor
                        r["methods"][name] = out
                    checkpoint()
                del state
                release_memory(device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["complete"] = True
    checkpoint()
    return result


# ------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.2f}" if x < 0.01 else f"{x * 1e3:.1f}"


def _problem(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return f"ERROR: {r['error'].strip().splitlines()[-1]}"


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"{m.get('gpu', m['device'])}; torch {m['torch']} (CUDA {m['cuda']}); {m['cpu_count']} CPUs, "
        f"{m.get('host_mem_gib')} GiB RAM; dir {m['dir']} ({m['dir_fstype']}); {result['elapsed_s']:.0f}s"
    ]
    for size, r in result["sizes"].items():
        lines.append(
            f"\n== {size} GiB: {r['n_tensors']} bf16 tensors, {r['state_bytes'] / GIB:.3f} GiB, "
            f"{r['reps']} reps after a warm-up"
        )
        floor = r.get("floor", {})
        if "error" in floor or "skipped" in floor:
            lines.append(f"  floor: {_problem(floor)}")
        for name in (FLOOR_ONE, FLOOR_PER):
            if name in floor:
                f = floor[name]
                lines.append(f"  {name:<40} {_ms(f['median_s']):>10} ms {f['GBps']:7.1f} GB/s")
        lines.append(f"  {'method':<40} {'stall ms':>10} {'warm-up ms':>11} {'durable s':>10} {'x floor':>8}")
        for name, s in r["methods"].items():
            if "skipped" in s or "error" in s:
                lines.append(f"  {name:<40} {_problem(s)}")
            else:
                xf = f"{s['x_floor']:.2f}" if "x_floor" in s else "-"
                lines.append(
                    f"  {name:<40} {_ms(s['median_s']):>10} {_ms(s['warmup_s']):>11} "
                    f"{s['durable_median_s']:>10.2f} {xf:>8}"
                )
        res = r["methods"].get(ackpt_name("thread", False), {}).get("resume")
        raw = r.get("raw_read")
        for name, x in (("resume: asyncckpt.resume", res), (f"resume: {RAW}", raw)):
            if x and "median_s" in x:
                cold = f", cold {x['cold_s']:.2f} s" if "cold_s" in x else ""
                lines.append(f"  {name:<40} {x['median_s']:>10.3f} s  {x['GBps']:7.1f} GB/s warm{cold}")
            elif x:
                lines.append(f"  {name:<40} {_problem(x)}")
        if res:
            lines.append(f"  resume bit-exact probe: {res['bit_exact_probe']}, on device: {res['on_device']}")
    train = result.get("train")
    if train and "error" in train:
        lines.append(f"\ntrain: ERROR {train['error'].strip().splitlines()[-1]}")
    elif train:
        c = train["config"]
        lines.append(
            f"\n== train: {c['layers']} x TransformerEncoderLayer(d={c['d_model']}) bf16, batch {c['batch']}x"
            f"{c['seq']}, {c['steps']} steps, save every {c['every']}; state {c['state_bytes'] / GIB:.2f} GiB"
        )
        for name, run in train["runs"].items():
            drain = run.get("overhead_incl_drain_pct")
            extra = "" if drain is None else f"  (+drain {drain:+.1f}%, {run['saves']} saves)"
            lines.append(
                f"  {name:<28} step {_ms(run['step_s']):>8} ms  overhead {run['overhead_pct']:+6.1f}%{extra}"
            )
    return "\n".join(lines)


def _resume_ok(r: dict[str, Any]) -> bool:
    res = r["methods"].get(ackpt_name("thread", False), {}).get("resume")
    return res is None or (res["bit_exact_probe"] and res["on_device"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default="1,4,16", help="state sizes in GiB, comma-separated")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions after one warm-up (3; cpu 1)")
    p.add_argument("--big-gib", type=float, default=4.0, help="states above this many GiB use --big-reps")
    p.add_argument(
        "--big-reps", type=int, default=1, help="timed repetitions above --big-gib (each 16 GiB save is slow)"
    )
    p.add_argument("--dir", default=None, help="parent directory for temporary files (default: TMPDIR)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--budget-s", type=float, default=240.0, help="skip methods projected to overrun (0: never)"
    )
    p.add_argument("--torch-save-max-gib", type=float, default=4.0)
    p.add_argument("--no-train", action="store_true", help="skip the training-loop section (c)")
    p.add_argument(
        "--all-methods", action="store_true", help="cpu: run the process executor at every size too"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (50; cpu 20)")
    p.add_argument("--every", type=int, default=None, help="save every N steps (10; cpu 5)")
    p.add_argument("--d-model", type=int, default=None, help="default 4096 (cuda), 32 (cpu)")
    p.add_argument("--heads", type=int, default=None, help="default 32 (cuda), 4 (cpu)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's; cpu 1)"
    )
    p.add_argument("--batch", type=int, default=None, help="default 8 (cuda), 2 (cpu)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (cuda), 16 (cpu)")
    args = p.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: not a comma-separated list of numbers: {args.sizes!r}")
    cuda = args.device == "cuda"
    defaults = {"reps": (3, 1), "steps": (50, 20), "every": (10, 5), "d_model": (4096, 32)}
    defaults.update({"heads": (32, 4), "batch": (8, 2), "seq": (2048, 16)})
    for name, (gpu, cpu) in defaults.items():  # cpu: a smoke run of the same code
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)  # a cpu smoke run: no oversubscribed spinning
    if (
        not args.sizes
        or any(s <= 0 for s in args.sizes)
        or min(args.reps, args.big_reps, args.every, args.steps) < 1
    ):
        p.error("--sizes must be positive; --reps, --steps and --every at least 1")

    def save(result: dict[str, Any]) -> None:
        if args.json:  # atomically, so a run killed by a timeout still leaves valid JSON
            with open(args.json + ".part", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(args.json + ".part", args.json)

    result = run(args, save)
    print(format_table(result))
    failed = [
        f"{s} GiB {n}" for s, r in result["sizes"].items() for n, m in r["methods"].items() if "error" in m
    ]
    failed += [
        f"{s} GiB {k}"
        for s, r in result["sizes"].items()
        for k in ("floor", "raw_read")
        if "error" in r.get(k, {})
    ]
    failed += [f"{s} GiB resume" for s, r in result["sizes"].items() if not _resume_ok(r)]
    if "error" in result.get("train", {}):
        failed.append("train")
    if failed:
        log(f"errors: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
