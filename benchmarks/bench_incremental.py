"""Differential checkpoints: bytes written and time to durable, against a plain save.

``python -m benchmarks.bench_incremental [--frozen-gib 1] [--trained-mib 16] [--saves 10]
[--full-mib 512] [--reps 4] [--dir PARENT] [--json out.json]``

Two scenarios, each saved by a thread executor, one fresh checkpointer per setting (its
staging pool allocated before the clock starts), ``keep=KeepLast(2)`` so retention and the
chunk-store sweep run as in training:

- **Frozen base**: ``--frozen-gib`` of bf16 weights that never change (16 tensors) and
  ``--trained-mib`` of bf16 weights that change before every save (a LoRA or a head).
  ``--saves`` saves per setting.  The first differential save is whole; the figure is the
  median of the later ones.  *Changed bytes* is what really changed between two saves.
- **Full training**: ``--full-mib`` of fp32 weights that all change before every save, where
  dedup finds nothing: what the hashing and the one-object-per-part layout cost.
- **The disk's own cost of that layout**: the same ``--full-mib`` written from page-aligned
  memory with ``O_DIRECT`` and fsynced, as one file and as one 4 MiB file per part on 8
  threads, outside asyncckpt (the hardware's limit for either layout).

*Time to durable* runs from ``save_async`` to the commit (from the save's stats: slot wait,
queue wait, and the writer's write and commit); *handle resolved* runs on until the handle
resolves, after retention and the chunk-store sweep; *stall* is ``save_async`` itself; *bytes
written* is the save's own bytes (parts or shard files, not the manifest).
Every setting's last step is resumed and compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from asyncckpt import AsyncCheckpointer, StagingOptions, WriterOptions, resume
from asyncckpt.bench import machine_info
from asyncckpt.policy import KeepLast

MIB = 1 << 20


def frozen_base(frozen_gib: float, trained_mib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = int(frozen_gib * 1024 * MIB / 2 / 16)
    out = {f"base{i}": (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16) for i in range(16)}
    out["trained"] = (torch.randn(int(trained_mib * MIB / 2), generator=g) * 0.02).to(torch.bfloat16)
    return out


def full_state(mib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = int(mib * MIB / 4 / 8)
    return {f"w{i}": torch.randn(n, generator=g) * 0.02 for i in range(8)}


def _direct_write(path: str, view: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0), 0o644)
    try:
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done : done + (32 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_layouts(mib: float, reps: int, parent: str) -> dict[str, Any]:
    """Seconds to write ``mib`` with O_DIRECT + fsync as one file and as 4 MiB files on 8 threads."""
    from concurrent.futures import ThreadPoolExecutor

    part = 4 * MIB
    n = max(1, int(mib * MIB) // part)
    mm = mmap.mmap(-1, n * part)
    mm.write(os.urandom(part) * n)
    view = memoryview(mm)
    one, many = [], []
    try:
        for _ in range(reps):
            d = tempfile.mkdtemp(prefix="bench-layout-", dir=parent)
            os.sync()
            t0 = time.perf_counter()
            _direct_write(os.path.join(d, "one"), view)
            one.append(time.perf_counter() - t0)
            os.sync()
            t0 = time.perf_counter()
            paths = [(os.path.join(d, f"p{i}"), view[i * part : (i + 1) * part]) for i in range(n)]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda pv: _direct_write(*pv), paths))
            many.append(time.perf_counter() - t0)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        del view, mm  # the slices above may still point into it: let the collector close it
    return {
        "bytes": n * part,
        "one_file_s": round(statistics.median(one), 4),
        "parts_8_threads_s": round(statistics.median(many), 4),
        "parts_over_one_file": round(statistics.median(many) / statistics.median(one), 3),
    }


def measure(
    state: dict[str, torch.Tensor],
    change: list[str],
    writer: WriterOptions,
    saves: int,
    parent: str,
) -> dict[str, Any]:
    """``saves`` saves of ``state``, changing the tensors named in ``change`` before each."""
    root = tempfile.mkdtemp(prefix="bench-incremental-", dir=parent)
    stats: list[dict[str, Any]] = []
    durable, stall = [], []
    changed = sum(state[k].numel() * state[k].element_size() for k in change)
    try:
        with AsyncCheckpointer(
            root,
            state,
            writer=writer,
            keep=KeepLast(2),
            staging=StagingOptions(max_inflight=1),
            on_stats=stats.append,
        ) as ck:
            for step in range(1, saves + 1):
                for k in change:
                    state[k].add_(1e-3)  # every element changes (exactly, for the dedup)
                t0 = time.perf_counter()
                h = ck.save_async(step, force=True)
                t1 = time.perf_counter()
                h.result()
                t2 = time.perf_counter()
                stall.append(t1 - t0)
                durable.append(t2 - t0)
            ck.wait()
        fresh = {k: torch.empty_like(v) for k, v in state.items()}
        assert resume(root, fresh) == saves
        for k, v in state.items():
            assert torch.equal(fresh[k].view(torch.uint8), v.view(torch.uint8)), k
        store = os.path.join(root, ".chunks")
        on_disk = (
            sum(os.path.getsize(os.path.join(store, n)) for n in os.listdir(store))
            if os.path.isdir(store)
            else 0
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ordered = sorted(stats, key=lambda s: s["step"])
    written = [s["bytes_written"] for s in ordered]
    # durable = committed: slot wait + queue wait + the writer's write and commit (it starts
    # when the save is submitted, before the copy); the handle resolves later, after
    # retention and the chunk-store sweep have run
    committed = [s["slot_wait_s"] + s["queue_wait_s"] + s["write_s"] for s in ordered]
    later = slice(1, None) if writer.incremental and saves > 1 else slice(None)
    return {
        "incremental": writer.incremental,
        "compression": writer.compression or "none",
        "state_bytes": sum(v.numel() * v.element_size() for v in state.values()),
        "changed_bytes_per_save": changed,
        "bytes_written": written,
        "bytes_written_median": statistics.median(written[later]),
        "written_over_changed": round(statistics.median(written[later]) / max(changed, 1), 4),
        "time_to_durable_s": [round(x, 3) for x in committed],
        "time_to_durable_median_s": round(statistics.median(committed[later]), 4),
        "handle_resolved_s": [round(x, 3) for x in durable],
        "handle_resolved_median_s": round(statistics.median(durable[later]), 4),
        "first_save_s": round(committed[0], 3),
        "stall_median_ms": round(statistics.median(stall) * 1e3, 2),
        "chunk_store_bytes_at_end": on_disk,
    }


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two rounds of each setting as one: every save's figures, medians over both."""
    out = {}
    for k, x in a.items():
        y = b[k]
        later = slice(1, None) if x["incremental"] else slice(None)
        durable = x["time_to_durable_s"][later] + y["time_to_durable_s"][later]
        resolved = x["handle_resolved_s"][later] + y["handle_resolved_s"][later]
        written = x["bytes_written"][later] + y["bytes_written"][later]
        out[k] = dict(x)
        out[k].update(
            rounds=2,
            time_to_durable_s=[x["time_to_durable_s"], y["time_to_durable_s"]],
            bytes_written=[x["bytes_written"], y["bytes_written"]],
            time_to_durable_median_s=round(statistics.median(durable), 4),
            handle_resolved_s=[x["handle_resolved_s"], y["handle_resolved_s"]],
            handle_resolved_median_s=round(statistics.median(resolved), 4),
            bytes_written_median=statistics.median(written),
            written_over_changed=round(statistics.median(written) / max(x["changed_bytes_per_save"], 1), 4),
            stall_median_ms=round(statistics.median([x["stall_median_ms"], y["stall_median_ms"]]), 2),
        )
    return out


def run(
    frozen_gib: float, trained_mib: float, saves: int, full_mib: float, reps: int, parent: str
) -> dict[str, Any]:
    torch.set_num_threads(2)
    plain, inc = WriterOptions(), WriterOptions(incremental=True)
    inc_during = WriterOptions(incremental=True, write_during_copy=True)  # hashes as the copy lands
    out: dict[str, Any] = {}
    base = frozen_base(frozen_gib, trained_mib)
    # interleaved, plain first in one round and second in the other: the disk's state and the
    # allocator favour whichever runs second otherwise
    fb = {
        "plain": measure(base, ["trained"], plain, min(saves, 3), parent),
        "incremental": measure(base, ["trained"], inc, saves, parent),
        "incremental, write_during_copy": measure(base, ["trained"], inc_during, saves, parent),
    }
    fb = _merge(fb, {
        "incremental, write_during_copy": measure(base, ["trained"], inc_during, saves, parent),
        "incremental": measure(base, ["trained"], inc, saves, parent),
        "plain": measure(base, ["trained"], plain, min(saves, 3), parent),
    })  # fmt: skip
    fb["faster_than_plain_write_during_copy"] = round(
        fb["plain"]["time_to_durable_median_s"]
        / fb["incremental, write_during_copy"]["time_to_durable_median_s"],
        2,
    )
    fb["faster_than_plain"] = round(
        fb["plain"]["time_to_durable_median_s"] / fb["incremental"]["time_to_durable_median_s"], 2
    )
    out["frozen_base"] = fb
    del base
    full = full_state(full_mib)
    names = list(full)
    fs = {
        "plain": measure(full, names, plain, reps, parent),
        "incremental": measure(full, names, inc, reps, parent),
    }
    fs = _merge(fs, {
        "incremental": measure(full, names, inc, reps, parent),
        "plain": measure(full, names, plain, reps, parent),
    })  # fmt: skip
    fs["incremental_over_plain_time"] = round(
        fs["incremental"]["time_to_durable_median_s"] / fs["plain"]["time_to_durable_median_s"], 3
    )
    out["full_training"] = fs
    out["raw_layouts"] = raw_layouts(full_mib, reps, parent)
    return {
        "machine": {**machine_info(), "loadavg_at_end": os.getloadavg()},
        "args": {
            "frozen_gib": frozen_gib,
            "trained_mib": trained_mib,
            "saves": saves,
            "full_mib": full_mib,
            "reps": reps,
        },
        "dir": parent,
        "results": out,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        "| scenario | setting | bytes written / save (MiB) | written / changed | time to durable s | handle resolved s | stall ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for scen, rows in r["results"].items():
        for name, x in rows.items():
            if not isinstance(x, dict):
                continue
            lines.append(
                f"| {scen} | {name} | {x['bytes_written_median'] / MIB:.1f} | {x['written_over_changed']:.3f} | "
                f"{x['time_to_durable_median_s']:.3f} | {x['handle_resolved_median_s']:.3f} | {x['stall_median_ms']:.1f} |"
            )
    fb, fs, raw = r["results"]["frozen_base"], r["results"]["full_training"], r["results"]["raw_layouts"]
    lines.append("")
    lines.append(
        f"frozen base: differential saves are {fb['faster_than_plain']}x faster to durable than plain saves "
        f"({fb['faster_than_plain_write_during_copy']}x with write_during_copy)"
    )
    lines.append(f"full training: differential / plain time to durable = {fs['incremental_over_plain_time']}")
    lines.append(
        f"raw O_DIRECT, {raw['bytes'] / MIB:.0f} MiB: one file {raw['one_file_s']:.3f}s, 4 MiB parts on 8 threads "
        f"{raw['parts_8_threads_s']:.3f}s ({raw['parts_over_one_file']}x)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--frozen-gib", type=float, default=1.0)
    p.add_argument("--trained-mib", type=float, default=16)
    p.add_argument("--saves", type=int, default=10)
    p.add_argument("--full-mib", type=float, default=512)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--dir", default=None, help="parent directory for the checkpoints (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    parent = args.dir or tempfile.gettempdir()
    result = run(args.frozen_gib, args.trained_mib, args.saves, args.full_mib, args.reps, parent)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
