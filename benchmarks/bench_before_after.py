"""Stall of ``save_async`` with two checkouts of asyncckpt, in one run, as a ratio.

Each repetition runs in a fresh child that imports asyncckpt from the given checkout
(``PYTHONPATH``), builds the same synthetic state, waits for the constructor's pool
allocation, then times ``save_async`` (the stall) over several saves, waiting for each commit
untimed in between.  Children of the two checkouts alternate, so drift in the machine (page
cache, the other core) lands on both.

Usage: ``python -m benchmarks.bench_before_after --old /tmp/old --new . [--size-mib 512]
[--reps 3] [--json out.json]``; ``git worktree add /tmp/old HEAD~1`` makes an old checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, tempfile, time, warnings
import torch
warnings.simplefilter("ignore")
from asyncckpt import AsyncCheckpointer
size, n, saves, executor, overlap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
g = torch.Generator().manual_seed(0)
per = size // n // 4
state = {"w": {f"t{i}": torch.randn(per, generator=g) for i in range(n)}}
root = tempfile.mkdtemp(dir=sys.argv[6])
ck = AsyncCheckpointer(root, state, executor=executor, overlap=overlap, keep=1)
stalls = []
for step in range(saves):
    t = time.perf_counter()
    h = ck.save_async(step)
    stalls.append(time.perf_counter() - t)
    h.result()
ck.close()
print(json.dumps({"stalls": stalls, "module": __import__("asyncckpt").__file__}))
"""


def _run(checkout: str, args: argparse.Namespace, executor: str, overlap: bool) -> list[float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.size_mib << 20), str(args.tensors), str(args.saves),
         executor, "1" if overlap else "0", args.dir],
        env=env, capture_output=True, text=True, check=True, cwd=args.dir,
    )  # fmt: skip
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    expected = os.path.join(os.path.abspath(checkout), "asyncckpt", "__init__.py")
    if os.path.realpath(doc["module"]) != os.path.realpath(expected):
        raise RuntimeError(f"child imported {doc['module']}, not {expected}")
    return doc["stalls"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="checkout of the baseline")
    p.add_argument("--new", default=".", help="checkout under test (default: .)")
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--tensors", type=int, default=100)
    p.add_argument("--saves", type=int, default=6, help="saves per child; the first is reported apart")
    p.add_argument("--reps", type=int, default=3, help="children per checkout and configuration")
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    for executor, overlap in (("thread", False), ("thread", True), ("process", False)):
        name = f"{executor}{', overlap' if overlap else ''}"
        samples: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(a.reps):
            for which in ("old", "new"):
                stalls = _run(getattr(a, which), a, executor, overlap)
                samples[which] += stalls[1:]
        old, new = statistics.median(samples["old"]), statistics.median(samples["new"])
        results[name] = {"old_ms": old * 1e3, "new_ms": new * 1e3, "new_over_old": new / old}
        print(f"{name:<18} old {old * 1e3:8.2f} ms   new {new * 1e3:8.2f} ms   new/old {new / old:5.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size_mib": a.size_mib, "tensors": a.tensors, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
