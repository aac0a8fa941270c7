"""Many actors on one live root.

A trainer process saves continuously with ``keep=2`` and snapshots (every 3 steps, 2 slots),
each step's state a pure function of the step, and records every step whose ``result()``
returned.  Meanwhile actor processes, forked at seeded random moments, resume the root
(checked bit for bit), run ``asyncckpt verify --all``, ``ls``, ``gc --min-age 0``, and try a
second ``AsyncCheckpointer`` on it (which must raise ``RootBusyError`` and change nothing).

Afterwards: every confirmed step retention keeps (the last 2 permanent, the newest 2
snapshots) loads bit-exactly by step, nothing else is left, no reader ever failed or loaded a
step that was not confirmed, nothing hung, the trainer saw no error.  Counts are printed
(``-s``) and appended to ``ASYNCCKPT_RELIABILITY_REPORT``.

Knobs: ASYNCCKPT_ACTORS (actor threads, 3), ASYNCCKPT_ACTORS_SECONDS (10),
ASYNCCKPT_ACTORS_S3_SECONDS (10), ASYNCCKPT_FUZZ_SEED; with ASYNCCKPT_SLOW=1 the long
variants: ASYNCCKPT_ACTORS_SLOW (6), ASYNCCKPT_ACTORS_SECONDS_SLOW (60),
ASYNCCKPT_ACTORS_RUNS_SLOW (5), ASYNCCKPT_ACTORS_S3_RUNS_SLOW (3).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from asyncckpt import list_checkpoints, resume
from asyncckpt.catalog import list_leftovers
from asyncckpt.cli import main

from ._actors import KEEP, SLOTS, ActorsResult, ActorsRun, ActorZygote
from ._support import knob, make_state, report, s3_env, seed, slow_enabled, state_mismatch

pytestmark = pytest.mark.multiproc

needs_slow_env = pytest.mark.skipif(not slow_enabled(), reason="long randomized run: set ASYNCCKPT_SLOW=1")


@pytest.fixture
def bucket(moto_endpoint):
    """A fresh bucket on the session's moto server: (s3:// root, storage options)."""
    import requests

    from asyncckpt.storage import FsspecStorage

    opts = {
        "key": "ACTORSKEYID0001",
        "secret": "actors-secret-5b1e",
        "client_kwargs": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    name = f"actors{uuid.uuid4().hex[:10]}"
    FsspecStorage("s3://", opts).fs.call_s3("create_bucket", Bucket=name)
    yield f"s3://{name}/run", opts
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)


def _check_end(root: str, numel: int, opts: dict[str, Any] | None, confirmed: list[tuple[int, str]],
               res: ActorsResult, run_no: int) -> None:  # fmt: skip
    """After the trainer closed: what retention keeps is there and loads; nothing else is."""
    c = res.counts
    perm = [s for s, tier in confirmed if tier == "permanent"]
    snaps = [s for s, tier in confirmed if tier == "snapshot"]
    c["confirmed_permanent"] += len(perm)
    c["confirmed_snapshots"] += len(snaps)
    expected = {("permanent", s) for s in perm[-KEEP:]} | {("snapshot", s) for s in snaps[-SLOTS:]}
    listed = {(i.tier, i.step) for i in list_checkpoints(root, storage_options=opts)}
    for tier, s in sorted(expected):
        fresh = make_state(numel)
        try:
            got = resume(root, fresh, step=s, storage_options=opts)
            bad = None if got == s else f"resume(step={s}) returned {got}"
            bad = bad or state_mismatch(fresh, s)
        except Exception as e:
            bad = f"{type(e).__name__}: {e}"
        c["survivors_checked"] += 1
        if bad is not None or (tier, s) not in listed:
            c["losses"] += 1
            res.fail(f"run {run_no}: confirmed {tier} step {s} that retention keeps: {bad or 'not listed'}")
    extra = sorted(listed - expected)
    c["not_pruned"] += len(extra)
    if extra:
        res.fail(f"run {run_no}: retention left {extra} (expected only {sorted(expected)})")
    c["loaded_distinct_steps"] += len(res.loaded)
    never = sorted(res.loaded - {s for s, _ in confirmed})
    if never:
        c["unconfirmed_loads"] += len(never)
        res.fail(f"run {run_no}: readers loaded steps that were never confirmed: {never}")
    left = list_leftovers(root, storage_options=opts)
    c["leftovers_after_close"] += len(left)
    if left:
        res.fail(f"run {run_no}: the closed trainer left {left}")
    argv = ["verify", root, "--all"]
    if opts is not None:
        argv = ["--storage-options", json.dumps(opts), *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    if rc != 0 or "FAILED" in out.getvalue():
        res.fail(f"run {run_no}: verify --all after close exited {rc}: {out.getvalue()[-800:]}")


def _fuzz(tmp_path, name: str, runs: int, seconds: float, actors: int, rng: random.Random,
          s3_root: str | None = None, opts: dict[str, Any] | None = None,
          executors: tuple[str, ...] = ("thread",)) -> None:  # fmt: skip
    res = ActorsResult()
    numel = 1 << 12 if s3_root else 1 << 16
    t0 = time.monotonic()
    executors_used: Counter = Counter()
    with ActorZygote(env_extra=s3_env(opts) if opts else None, log_path=str(tmp_path / "zygote.log")) as z:
        for run_no in range(runs):
            work = tmp_path / f"run{run_no}"
            work.mkdir()
            root = f"{s3_root}{run_no}" if s3_root else str(work / "ckpt")
            executor = executors[run_no % len(executors)]
            executors_used[executor] += 1
            run = ActorsRun(
                zygote=z, root=root, work=str(work), numel=numel, seconds=seconds, actors=actors,
                rng=rng, result=res, s3=s3_root is not None, storage_options=opts, executor=executor,
                run_no=run_no,
            )  # fmt: skip
            confirmed = run.run()
            _check_end(root, numel, opts, confirmed, res, run_no)
    summary = {
        "runs": runs,
        "actors": actors,
        "seconds_per_run": seconds,
        "wall_s": round(time.monotonic() - t0, 1),
        "executors": dict(executors_used),
        "operations": sum(res.ops.values()),
        "failures": len(res.failures),
        **res.summary(),
    }
    for k in ("losses", "hangs", "trainer_errors", "unconfirmed_loads", "not_pruned"):
        summary.setdefault(k, 0)
    report(name, summary)
    ops = " ".join(f"{k}={v}" for k, v in sorted(res.ops.items()))
    print(
        f"[actors] {name}: {runs} run(s), {actors} actors, {summary['operations']} ops ({ops}), "
        f"{summary['confirmed_permanent'] + summary['confirmed_snapshots']} confirmed saves, "
        f"{summary['losses']} losses, {summary['hangs']} hangs, {len(res.failures)} failures",
        flush=True,
    )
    assert res.failures == [], "\n".join(res.failures[:20])
    assert all(res.ops[k] > 0 for k in ("resume", "verify", "ls", "gc", "construct")), res.ops


def test_actors_fuzz_local(tmp_path) -> None:
    """10 s (ASYNCCKPT_ACTORS_SECONDS) of 3 actors against a trainer on a local root."""
    _fuzz(tmp_path, "actors_fuzz_local", 1, knob("ASYNCCKPT_ACTORS_SECONDS", 10),
          knob("ASYNCCKPT_ACTORS", 3), random.Random(seed() + 30))  # fmt: skip


@pytest.mark.s3
def test_actors_fuzz_s3(tmp_path, bucket) -> None:
    """10 s (ASYNCCKPT_ACTORS_S3_SECONDS) of 3 actors against a trainer on s3:// (moto)."""
    root, opts = bucket
    _fuzz(tmp_path, "actors_fuzz_s3", 1, knob("ASYNCCKPT_ACTORS_S3_SECONDS", 10),
          knob("ASYNCCKPT_ACTORS", 3), random.Random(seed() + 31), s3_root=root, opts=opts)  # fmt: skip


@pytest.mark.slow
@needs_slow_env
@pytest.mark.timeout(7200)
def test_actors_fuzz_local_long(tmp_path) -> None:
    """5 runs (ASYNCCKPT_ACTORS_RUNS_SLOW) of 60 s, 6 actors; every other trainer writes
    through a writer process."""
    _fuzz(tmp_path, "actors_fuzz_local_long", knob("ASYNCCKPT_ACTORS_RUNS_SLOW", 5),
          knob("ASYNCCKPT_ACTORS_SECONDS_SLOW", 60), knob("ASYNCCKPT_ACTORS_SLOW", 6),
          random.Random(seed() + 40), executors=("thread", "process"))  # fmt: skip


@pytest.mark.slow
@needs_slow_env
@pytest.mark.s3
@pytest.mark.timeout(7200)
def test_actors_fuzz_s3_long(tmp_path, bucket) -> None:
    """3 runs (ASYNCCKPT_ACTORS_S3_RUNS_SLOW) of 60 s, 6 actors, on s3:// (moto)."""
    root, opts = bucket
    _fuzz(tmp_path, "actors_fuzz_s3_long", knob("ASYNCCKPT_ACTORS_S3_RUNS_SLOW", 3),
          knob("ASYNCCKPT_ACTORS_SECONDS_SLOW", 60), knob("ASYNCCKPT_ACTORS_SLOW", 6),
          random.Random(seed() + 41), s3_root=root, opts=opts)  # fmt: skip
