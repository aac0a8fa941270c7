"""Python work a save leaves on threads that share the trainer's GIL.

A writer thread, the finalize thread and a resume all run Python next to the training loop; a
Python-heavy step waits for the GIL while they hold it.  This measures the two pieces that grow
with the number of tensors, each against the way it was done before, in the same run:

1. **Encoding a manifest** (the writer thread's commit): ``Manifest.to_json``, one indented
   encoding pass, against the former two passes (the body encoded and checksummed, then the whole
   document encoded again).
2. **Reading a manifest** (the finalize thread's retention, a resume, ``ls``):
   ``Manifest.from_json``, which checks the self-checksum from the bytes read, against the former
   check, a canonical re-encoding of the parsed document (``manifest._self_checksum``).

Also, per save of a real checkpointer with ``keep=1`` on a local root: the finalize thread's CPU
time (``time.thread_time``) in retention, which before read and checked every new manifest.
Manifests come from real saves of ``--tensors`` small tensors; best of ``--reps``.

Usage: ``python -m benchmarks.bench_gil [--tensors 64 1000] [--reps 20] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

import torch

from asyncckpt import AsyncCheckpointer, layout
from asyncckpt.manifest import Manifest, _self_checksum
from asyncckpt.manifest_parse import Parser
from asyncckpt.pruner import Pruner
from benchmarks.bench_stall import machine_info


def best_ms(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def two_pass(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    crc = zlib.crc32(json.dumps(body, indent=1, allow_nan=True).encode())
    return json.dumps({**body, "checksum": crc}, indent=1, allow_nan=True).encode()


def re_encoding_check(data: bytes) -> None:
    doc = json.loads(data)
    if _self_checksum(doc) != doc["checksum"]:
        raise AssertionError("checksum")


def retention_cpu_ms(n_tensors: int, saves: int = 8) -> float:
    """Median thread CPU of ``Pruner.apply`` per save, keep=1, on a local temp root."""
    spent: list[float] = []
    real = Pruner.apply

    def timed(self: Pruner, *a: Any, **k: Any) -> Any:
        c = time.thread_time()
        try:
            return real(self, *a, **k)
        finally:
            spent.append((time.thread_time() - c) * 1e3)

    state = {f"layer{i}.weight": torch.zeros(16, 16) for i in range(n_tensors)}
    Pruner.apply = timed  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as d, AsyncCheckpointer(d, {"model": state}, keep=1) as ck:
            for s in range(saves):
                ck.save_async(s).result()
    finally:
        Pruner.apply = real  # type: ignore[method-assign]
    return sorted(spent[1:])[len(spent[1:]) // 2]


def run(tensors: list[int], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine_info(), "reps": reps, "results": []}
    for n in tensors:
        state = {f"layer{i}.weight": torch.zeros(4, 4) for i in range(n)}
        with tempfile.TemporaryDirectory() as d:
            with AsyncCheckpointer(d, {"model": state}) as ck:
                ck.save_async(1).result()
            with open(os.path.join(d, layout.step_dirname(1), layout.MANIFEST), "rb") as f:
                data = f.read()
        m = Manifest.from_json(data, "bench")
        doc = json.loads(data)
        assert m.to_json() == two_pass(doc) == data
        r = {
            "tensors": n,
            "manifest_kib": len(data) / 1024,
            "encode_ms": best_ms(m.to_json, reps),
            "encode_two_pass_ms": best_ms(lambda d=doc: two_pass(d), reps),
            "check_ms": best_ms(lambda b=data: Parser("bench").manifest(b), reps),
            "check_re_encoding_ms": best_ms(lambda b=data: re_encoding_check(b), reps),
            "retention_cpu_ms_per_save": retention_cpu_ms(n),
        }
        r["encode_speedup"] = r["encode_two_pass_ms"] / r["encode_ms"]
        out["results"].append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, nargs="+", default=[64, 1000])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = run(a.tensors, a.reps)
    print(
        "| tensors | manifest | encode: one pass | two passes (before) | read: parse + check | check by re-encoding alone (before, on top of the parse) | retention CPU per save |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["results"]:
        print(
            f"| {r['tensors']} | {r['manifest_kib']:.0f} KiB | {r['encode_ms']:.1f} ms | {r['encode_two_pass_ms']:.1f} ms "
            f"({r['encode_speedup']:.2f}×) | {r['check_ms']:.1f} ms | {r['check_re_encoding_ms']:.1f} ms | "
            f"{r['retention_cpu_ms_per_save']:.2f} ms |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
