"""Compressed checkpoints: ratio, time to durable and resume time, compressed vs not.

``python -m benchmarks.bench_compression [--mib 256] [--reps 3] [--dir PARENT] [--json out.json]``

Two states of about ``--mib`` MiB each:
- ``bf16 weights``: bfloat16 tensors drawn from N(0, 0.02) (16 tensors);
- ``fp32 Adam moments``: the ``exp_avg`` and ``exp_avg_sq`` of a 4-layer MLP after 8 real
  AdamW steps (the parameters themselves are left out, so the figure is the moments').

Each is saved with ``WriterOptions(compression=None | "lz4" | "zstd")`` by a thread
executor, one fresh checkpointer per setting (its pool allocated before the clock starts).
*Time to durable* runs from ``save_async`` to the committed handle (shards and manifest
fsynced, renamed); *stall* is ``save_async`` itself; *resume* is a full checked load into
fresh tensors.  Medians of ``--reps`` saves; every resume is compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from asyncckpt import AsyncCheckpointer, StagingOptions, WriterOptions, resume

MIB = 1 << 20
SETTINGS: list[str | None] = [None, "lz4", "zstd"]


def bf16_weights(mib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = int(mib * MIB / 2 / 16)
    return {f"w{i}": (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16) for i in range(16)}


def adam_moments(mib: float, steps: int = 8) -> dict[str, torch.Tensor]:
    """exp_avg and exp_avg_sq (fp32) of a 4 x Linear(w, w) MLP after ``steps`` AdamW steps."""
    torch.manual_seed(0)
    width = max(64, int(math.sqrt(mib * MIB / 4 / 2 / 4)) // 64 * 64)  # m + v together ~ mib
    layers: list[torch.nn.Module] = []
    for i in range(4):
        layers += [torch.nn.Linear(width, width)] + ([torch.nn.GELU()] if i < 3 else [])
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(torch.randn(32, width)), torch.randn(32, width))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {}
    for i, p in enumerate(model.parameters()):
        out[f"m{i}"] = opt.state[p]["exp_avg"]
        out[f"v{i}"] = opt.state[p]["exp_avg_sq"]
    return out


def measure(
    state: dict[str, torch.Tensor], compression: str | None, reps: int, parent: str
) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="bench-compress-", dir=parent)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    writer = WriterOptions(compression=compression, compression_threads=2)
    durable, stall, stored = [], [], []
    try:
        with AsyncCheckpointer(root, state, writer=writer, staging=StagingOptions(max_inflight=1)) as ck:
            for rep in range(reps):
                t0 = time.perf_counter()
                h = ck.save_async(rep + 1)
                t1 = time.perf_counter()
                info = h.result()
                t2 = time.perf_counter()
                stall.append(t1 - t0)
                durable.append(t2 - t0)
                stored.append(info.bytes)
        loads = []
        for _ in range(reps):
            fresh = {k: torch.empty_like(v) for k, v in state.items()}
            t0 = time.perf_counter()
            assert resume(root, fresh) == reps
            loads.append(time.perf_counter() - t0)
            for k, v in state.items():
                assert torch.equal(fresh[k].view(torch.uint8), v.view(torch.uint8)), k
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "compression": compression or "none",
        "raw_bytes": raw,
        "stored_bytes": stored[-1],
        "ratio": round(raw / stored[-1], 4),
        "time_to_durable_s": [round(x, 3) for x in durable],
        "time_to_durable_median_s": round(statistics.median(durable), 3),
        "raw_gb_per_s_to_durable": round(raw / statistics.median(durable) / 1e9, 3),
        "stall_median_ms": round(statistics.median(stall) * 1e3, 2),
        "resume_s": [round(x, 3) for x in loads],
        "resume_median_s": round(statistics.median(loads), 3),
    }


def run(mib: float, reps: int, parent: str) -> dict[str, Any]:
    torch.set_num_threads(2)
    data = {
        "bf16 weights N(0,0.02)": bf16_weights(mib),
        "fp32 Adam moments (8 AdamW steps)": adam_moments(mib),
    }
    results: dict[str, Any] = {}
    for name, state in data.items():
        results[name] = [measure(state, c, reps, parent) for c in SETTINGS]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_at_end": os.getloadavg(),
        },
        "mib": mib,
        "reps": reps,
        "dir": parent,
        "results": results,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        "| data | compression | ratio | stored MiB | time to durable s | raw GB/s | stall ms | resume s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in r["results"].items():
        for x in rows:
            lines.append(
                f"| {name} | {x['compression']} | {x['ratio']:.3f} | {x['stored_bytes'] / MIB:.1f} | "
                f"{x['time_to_durable_median_s']:.2f} | {x['raw_gb_per_s_to_durable']:.2f} | "
                f"{x['stall_median_ms']:.1f} | {x['resume_median_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mib", type=float, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="parent directory for the checkpoints (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    parent = args.dir or tempfile.gettempdir()
    result = run(args.mib, args.reps, parent)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
