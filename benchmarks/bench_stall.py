"""Trainer-visible stall per checkpoint save: asyncckpt vs torch.save vs DCP, against a floor.

The *stall* is the wall time of the one call that blocks the training loop: the whole save for
synchronous methods, the time until ``async_save``/``save_async`` returns for asynchronous ones.
Background work (the write, the commit, an overlapped copy) is waited for between repetitions
and is not counted.  All methods save the same synthetic state (``--tensors`` fp32 tensors of
mixed sizes, ``--size-gib`` in all) in one process, in one run:

1. ``torch.save``                         synchronous, the whole write is the stall
2. ``dcp.save``                           synchronous
3. ``dcp.async_save``                     a fresh host copy is allocated on every call
4. ``dcp.async_save`` + reused stager     one ``DefaultStager`` kept across calls (cached storages)
5. asyncckpt, ``overlap=False``           copy into a pre-allocated, pre-touched host buffer
6. asyncckpt, ``overlap=True``            the copy itself runs on a background thread
7. floor                                  ``dst.copy_(src)`` per tensor into buffers that are
                                          already allocated and touched

Why the floor matters: a snapshot has to copy every byte at least once, so the floor is the best
a copy-based method can do on this machine (memory bandwidth).  ``median / floor`` says how much
a method pays on top of that copy: allocation, page faults, pickling, planning, file I/O.
asyncckpt's first save is reported on its own (its pool is allocated at construction, so even
the first save should sit near the floor) and its median is given with and without it.

Between repetitions (untimed) the script waits for the background work, then calls
``os.sync()`` so every repetition starts with no dirty page cache.  ``torch.save`` does not
fsync, so its stall is the copy into the page cache; the DCP and asyncckpt writes do fsync, but
in the background for the async methods.  Checkpoints are deleted after each method.

The measurement lives in ``asyncckpt.bench`` (what ``asyncckpt bench`` runs, also from an installed
wheel); this script is its command line, and re-exports its helpers for the other benchmarks.

Usage: ``python -m benchmarks.bench_stall [--size-gib 1.0] [--tensors 100] [--reps 5]
[--dir PARENT] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import sys

from asyncckpt.bench import (
    ASYNCCKPT,
    FLOOR,
    METHODS,
    RepFn,
    add_ratios,
    bench_asyncckpt,
    bench_dcp_async,
    bench_dcp_async_reused,
    bench_dcp_save,
    bench_floor,
    bench_torch_save,
    format_table,
    machine_info,
    make_state,
    measure,
    nbytes,
    run,
    run_methods,
    summarize,
)

__all__ = [
    "ASYNCCKPT",
    "FLOOR",
    "METHODS",
    "RepFn",
    "add_ratios",
    "bench_asyncckpt",
    "bench_dcp_async",
    "bench_dcp_async_reused",
    "bench_dcp_save",
    "bench_floor",
    "bench_torch_save",
    "format_table",
    "machine_info",
    "make_state",
    "measure",
    "nbytes",
    "run",
    "run_methods",
    "summarize",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=None, help="state size (default 1.0; --quick 1/16)")
    p.add_argument("--tensors", type=int, default=100, help="number of fp32 tensors (default 100)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per method (default 5; --quick 3)")
    p.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    p.add_argument("--json", default=None, help="write the full results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 3 reps")
    args = p.parse_args(argv)
    size = args.size_gib if args.size_gib is not None else (1 / 16 if args.quick else 1.0)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    result = run(size, args.tensors, reps, args.dir)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if any("error" in m for m in result["methods"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
