"""The benchmark suite: asyncckpt against the alternatives, in one run, with plots.

``python -m benchmarks.run`` (or ``make bench``) runs every scenario and writes a JSON result
and PNG plots.  Every library runs in a fresh child process, one at a time, so each starts
from the same memory and its peak memory is its own; the parent samples the child's process
tree (proportional set size, so shared memory is not counted twice) every 20 ms.

Scenarios (``--scenarios``, comma-separated):

stall       the trainer-visible stall of one save, median over ``--reps``, for state sizes
            0.25, 1 and 4 GiB (capped at 1/6 of RAM) of 100 fp32 tensors, and at 1 GiB also
            few large (8) and many small (2000) tensors.  Also timed: from the call until the
            checkpoint is durable (write throughput), and the peak extra host (and GPU)
            memory over the state's size.
overhead    a training loop with a fixed step (``sleep``: a GPU-bound step, the host idles;
            ``cpu``: matmuls on every core) that saves every N steps.  Overhead is the loop's
            time over the loop without checkpoints.  Short intervals make the write slower
            than the interval: each library then blocks, queues or skips, and the staleness
            (steps since the newest durable checkpoint, sampled every step) says what that
            costs in recoverable progress.
throughput  ``benchmarks.bench_write`` (raw disk, asyncckpt and DCP writes and loads) and
            ``benchmarks.bench_s3`` (moto S3 on 127.0.0.1) as child runs, merged.
gpu         with CUDA only: the stall scenario on GPU tensors against the pinned-copy floor,
            and the step time of a small transformer saved every 50 steps.  Skipped (and
            said so) without CUDA.

Alternatives (``benchmarks/libraries.py``): torch.save, dcp.save, dcp.async_save in thread and
process mode and with a reused stager, Lightning's AsyncCheckpointIO, torchsnapshot (the
last two when installed: ``pip install -e '.[bench]'``).

Usage: ``python -m benchmarks.run [--quick] [--scenarios stall,overhead,throughput,gpu]
[--libs NAME,...] [--json benchmarks/results/run.json] [--plots docs/img]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import torch

from benchmarks.bench_stall import machine_info, make_state
from benchmarks.libraries import ALTERNATIVES, ASYNCCKPT, ASYNCCKPT_BUSY, FLOOR, LIBRARIES, available

GIB = 1 << 30
MARK = "RESULT "


# --------------------------------------------------------------------------- memory sampling


def _pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_pss(pid: int) -> int:
    return sum(_pss(p) for p in _tree(pid))


def run_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; add the peak PSS of its process tree."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], tree_pss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    done.set()
    sampler.join()
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(err.strip().splitlines()[-8:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len(MARK) :])
    result["peak_pss"] = peak[0]
    return result


# --------------------------------------------------------------------------- child side


def _own_pss() -> int:
    return _pss(os.getpid())


def child_stall(spec: dict[str, Any], root: str) -> dict[str, Any]:
    device = spec.get("device", "cpu")
    state = {k: t.to(device) for k, t in make_state(spec["size_gib"], spec["tensors"]).items()}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gpu_base = torch.cuda.memory_allocated() if device == "cuda" else 0
    base = _own_pss()
    saver = LIBRARIES[spec["lib"]](state, root)
    stalls, durable = [], []
    try:
        for rep in range(spec["reps"]):
            os.sync()
            t0 = time.perf_counter()
            saver.save(rep)
            t1 = time.perf_counter()
            saver.wait()
            t2 = time.perf_counter()
            stalls.append(t1 - t0)
            durable.append(t2 - t0)
            saver.discard(rep)
    finally:
        saver.close()
    gpu_extra = torch.cuda.max_memory_allocated() - gpu_base if device == "cuda" else None
    return {"stall_s": stalls, "durable_s": durable, "base_pss": base, "gpu_peak_extra": gpu_extra}


def cpu_work(iters: int) -> None:
    a = torch.ones(384, 384)
    for _ in range(iters):
        a = torch.mm(a, a).mul_(1.0 / 384)


def calibrate_cpu(step_s: float) -> int:
    """Matmul iterations that take ``step_s`` on this machine, idle."""
    cpu_work(20)
    t0 = time.perf_counter()
    cpu_work(200)
    per = (time.perf_counter() - t0) / 200
    return max(1, round(step_s / per))


def child_overhead(spec: dict[str, Any], root: str) -> dict[str, Any]:
    state = make_state(spec["size_gib"], spec["tensors"])
    saver = None if spec["lib"] == "none" else LIBRARIES[spec["lib"]](state, root)
    every, steps = spec["every"], spec["steps"]
    work = spec["work"]

    def step_fn() -> None:
        if spec["kind"] == "sleep":
            time.sleep(spec["step_s"])
        else:
            cpu_work(work)

    saves = skipped = 0
    stale: list[int] = []
    step_fn()  # warm
    if saver is not None:  # one-time costs (a writer process, a first allocation) are not the loop's
        saver.save(0)
        saver.wait()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        step_fn()
        if saver is not None and (step + 1) % every == 0:
            if saver.save(step):
                saves += 1
            else:
                skipped += 1
        if saver is not None:
            newest = saver.durable()
            stale.append(step - (newest if newest is not None else 0))
    loop_s = time.perf_counter() - t0
    if saver is not None:
        saver.close()
    return {
        "loop_s": loop_s,
        "saves": saves,
        "skipped": skipped,
        "stale_mean": statistics.fmean(stale) if stale else 0.0,
        "stale_max": max(stale) if stale else 0,
        "behaviour": getattr(saver, "behaviour", "-"),
    }


def child_train(spec: dict[str, Any], root: str) -> dict[str, Any]:
    """Step time of a small transformer on ``device``, with and without asyncckpt."""
    device = spec.get("device", "cuda")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(spec["width"], 8, 4 * spec["width"], batch_first=True)
    model = torch.nn.TransformerEncoder(layer, spec["layers"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(spec["batch"], spec["seq"], spec["width"], device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()

    for _ in range(3):  # optimizer state exists before the checkpointer plans
        step()
    ck = None
    if spec["lib"] != "none":
        from asyncckpt import AsyncCheckpointer

        overlap = spec["lib"] == "asyncckpt (overlap)"
        ck = AsyncCheckpointer(root, state={"model": model, "optim": opt}, keep=2, overlap=overlap)
    times = []
    for i in range(spec["steps"]):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if ck is not None and (i + 1) % spec["every"] == 0:
            ck.save_async(i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if ck is not None:
        ck.close()
    params = sum(p.numel() for p in model.parameters())
    return {"step_s": times, "params": params, "mean_step_s": statistics.fmean(times[5:])}


CHILDREN = {"stall": child_stall, "overhead": child_overhead, "train": child_train}


def child_main(spec: dict[str, Any]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    root = tempfile.mkdtemp(prefix="bench-run-", dir=spec.get("dir"))
    try:
        out = CHILDREN[spec["scenario"]](spec, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(MARK + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- parent side


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pick_libs(names: list[str], only: list[str] | None) -> list[str]:
    chosen = [n for n in names if only is None or n in only]
    for n in chosen:
        if (why := available(n)) is not None:
            log(f"{n}: skipped, {why}")
    return [n for n in chosen if available(n) is None]


def stall_scenario(args: argparse.Namespace, device: str = "cpu") -> dict[str, Any]:
    libs = pick_libs([*ALTERNATIVES, *ASYNCCKPT, FLOOR], args.libs)
    mem_gib = (machine_info()["mem_total_gib"] or 16) / 5  # the state, a copy, and room to spare
    cases = [(s, 100) for s in args.sizes if s <= mem_gib]
    cases += [(args.shape_size, n) for n in (8, 2000)] if args.shape_size else []
    for s in args.sizes:
        if s > mem_gib:
            log(f"stall: {s:g} GiB skipped, more than 1/5 of this machine's memory")
    out: dict[str, Any] = {}
    for size, tensors in cases:
        key = f"{size:g}GiB/{tensors}"
        out[key] = {}
        for lib in libs:
            reps = args.reps if size <= 1 else max(2, args.reps - 2)
            log(f"stall {key} {lib} ...")
            spec = dict(scenario="stall", lib=lib, size_gib=size, tensors=tensors, reps=reps, device=device)
            r = run_child({**spec, "dir": args.dir})
            if "error" not in r:
                state_bytes = int(size * GIB) // 4 * 4
                r.update(
                    state_bytes=state_bytes,
                    median_stall_s=statistics.median(r["stall_s"]),
                    median_durable_s=statistics.median(r["durable_s"]),
                    peak_extra_host=max(0, r["peak_pss"] - r["base_pss"]),
                )
            else:
                log(f"  {r['error']}")
            out[key][lib] = r
    return out


def overhead_scenario(args: argparse.Namespace) -> dict[str, Any]:
    libs = pick_libs([*ALTERNATIVES, *ASYNCCKPT, *ASYNCCKPT_BUSY], args.libs)
    work = calibrate_cpu(args.step_s)
    out: dict[str, Any] = {
        "config": {
            "size_gib": args.overhead_size,
            "step_s": args.step_s,
            "steps": args.steps,
            "cpu_work_iters": work,
            "reps": args.overhead_reps,
        }
    }
    for kind in args.kinds:
        for every in args.intervals:
            key = f"{kind}/every{every}"
            out[key] = {}
            for lib in ["none", *libs]:
                if lib == "none" and every != args.intervals[0]:
                    out[key][lib] = out[f"{kind}/every{args.intervals[0]}"]["none"]
                    continue
                log(f"overhead {key} {lib} ...")
                runs = []
                for _ in range(args.overhead_reps):
                    spec = dict(
                        scenario="overhead",
                        lib=lib,
                        size_gib=args.overhead_size,
                        tensors=64,
                        every=every,
                        steps=args.steps,
                        kind=kind,
                        step_s=args.step_s,
                        work=work,
                        dir=args.dir,
                    )
                    runs.append(run_child(spec))
                errors = [r for r in runs if "error" in r]
                if errors:
                    log(f"  {errors[0]['error']}")
                    out[key][lib] = errors[0]
                    continue
                best = sorted(runs, key=lambda r: r["loop_s"])[len(runs) // 2]  # median (of 2: slower)
                best["loop_s_all"] = [r["loop_s"] for r in runs]
                out[key][lib] = best
            base = out[key]["none"].get("loop_s")
            for r in out[key].values():
                if base and "loop_s" in r:
                    r["overhead"] = r["loop_s"] / base - 1
    return out


def throughput_scenario(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, extra in (("bench_write", ["--size-gib", str(args.shape_size)]), ("bench_s3", [])):
        path = os.path.join(tempfile.mkdtemp(prefix="bench-tp-"), f"{name}.json")
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", path, *extra]
        if args.quick:
            cmd.append("--quick")
        log(f"throughput: {' '.join(cmd[2:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
        else:
            out[name] = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return out


def gpu_scenario(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available() and args.gpu_device == "cuda":
        log("gpu: skipped, no CUDA on this machine")
        return {"skipped": "no CUDA on this machine"}
    dev = args.gpu_device
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    out["stall"] = stall_scenario(args, device=dev)
    out["train"] = {}
    for lib in ("none", "asyncckpt", "asyncckpt (overlap)"):
        log(f"gpu train {lib} ...")
        spec = dict(
            scenario="train",
            lib=lib,
            device=dev,
            width=args.train_width,
            layers=args.train_layers,
            batch=8,
            seq=256,
            steps=args.train_steps,
            every=50,
            dir=args.dir,
        )
        out["train"][lib] = run_child(spec)
    base = out["train"]["none"].get("mean_step_s")
    for r in out["train"].values():
        if base and "mean_step_s" in r:
            r["step_impact"] = r["mean_step_s"] / base - 1
    return out


# --------------------------------------------------------------------------- report


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def format_report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, libs in res.get("stall", {}).items():
        floor = libs.get(FLOOR, {}).get("median_stall_s")
        ours = libs.get("asyncckpt", {}).get("median_stall_s")
        lines.append(
            f"\nstall, {key} tensors          stall ms  x floor  vs asyncckpt  durable GB/s  extra mem x"
        )
        for lib, r in libs.items():
            if "error" in r:
                lines.append(f"  {lib:<34} ERROR {r['error'].splitlines()[-1][:60]}")
                continue
            s = r["median_stall_s"]
            lines.append(
                f"  {lib:<34} {_ms(s):>8} {s / floor if floor else 0:8.2f} {s / ours if ours else 0:12.1f}"
                f" {r['state_bytes'] / r['median_durable_s'] / 1e9:13.2f} {r['peak_extra_host'] / r['state_bytes']:12.2f}"
            )
    ov = res.get("overhead", {})
    for key, libs in ov.items():
        if key == "config":
            continue
        lines.append(f"\noverhead, {key}                  overhead  saves skipped  stale mean/max  behaviour")
        for lib, r in libs.items():
            if "error" in r:
                lines.append(f"  {lib:<34} ERROR {r['error'].splitlines()[-1][:60]}")
                continue
            lines.append(
                f"  {lib:<34} {r.get('overhead', 0) * 100:7.1f}% {r['saves']:6d} {r['skipped']:7d}"
                f" {r['stale_mean']:8.1f}/{r['stale_max']:<5d} {r['behaviour']}"
            )
    gpu = res.get("gpu", {})
    if "train" in gpu:
        lines.append(f"\ngpu ({gpu['device']}) train step impact, save every 50 steps:")
        for lib, r in gpu["train"].items():
            if "mean_step_s" in r:
                lines.append(
                    f"  {lib:<34} {r['mean_step_s'] * 1e3:8.2f} ms  {r.get('step_impact', 0) * 100:+.2f}%"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--scenarios", default="stall,overhead,throughput,gpu")
    p.add_argument("--libs", default=None, help="comma-separated library names (default: all that install)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny states, few steps")
    p.add_argument("--reps", type=int, default=None, help="stall repetitions (default 5; --quick 2)")
    p.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plots", default=None, help="render PNG plots into this directory")
    p.add_argument("--sizes", default=None, help="stall: state sizes in GiB (default 0.25,1,4)")
    p.add_argument("--shape-size", type=float, default=None,
                   help="stall: size of the 8 vs 2000 tensors cases (default 1; 0 skips them)")  # fmt: skip
    p.add_argument("--intervals", default=None, help="overhead: save every N steps (default 2,10)")
    p.add_argument("--kinds", default="sleep,cpu", help="overhead: step kinds (default sleep,cpu)")
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # "cpu" exercises the code
    args = p.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    q = args.quick
    args.libs = None if args.libs is None else [s.strip() for s in args.libs.split(",")]
    unknown = [n for n in args.libs or [] if n not in LIBRARIES]
    if unknown:
        p.error(f"unknown libraries {unknown}; choose from {list(LIBRARIES)}")
    args.reps = args.reps or (2 if q else 5)
    default_sizes = [1 / 64, 1 / 16] if q else [0.25, 1.0, 4.0]
    args.sizes = [float(x) for x in args.sizes.split(",")] if args.sizes else default_sizes
    if args.shape_size is None:
        args.shape_size = 1 / 16 if q else 1.0
    args.overhead_size = 1 / 32 if q else 0.125
    args.step_s, args.steps = (0.02, 12) if q else (0.05, 60)
    args.intervals = (
        [int(x) for x in args.intervals.split(",")] if args.intervals else [2, 6] if q else [2, 10]
    )
    args.kinds = [k.strip() for k in args.kinds.split(",")]
    args.overhead_reps = 1 if q else 2
    args.train_width, args.train_layers, args.train_steps = (64, 1, 12) if q else (1024, 8, 300)
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    run_fns = {
        "stall": stall_scenario,
        "overhead": overhead_scenario,
        "throughput": throughput_scenario,
        "gpu": gpu_scenario,
    }
    bad = [s for s in scenarios if s not in run_fns]
    if bad:
        p.error(f"unknown scenarios {bad}; choose from {list(run_fns)}")
    res: dict[str, Any] = {"machine": machine_info(), "quick": q, "started": time.strftime("%Y-%m-%d %H:%M")}
    failed = False
    for s in scenarios:
        t0 = time.perf_counter()
        try:
            res[s] = run_fns[s](args)
        except Exception:
            res[s] = {"error": traceback.format_exc()}
            log(res[s]["error"])
            failed = True
        log(f"{s} took {time.perf_counter() - t0:.0f}s")
        if args.json:  # after every scenario: a long run that dies keeps what it measured
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    print(format_report(res))
    if args.plots:
        from benchmarks.plots import render

        for path in render(res, args.plots):
            log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
