"""Interpreter exit with saves in flight: drained, failures visible, never a hang.

50 child runs (3 at a time, each under a 60 s watchdog) over six ways of leaving the
interpreter, on both executors, forked from the zygote and as fresh interpreters:
- ``drain``: no close(); the atexit hook commits every save; exit 0.
- ``crash``: an unhandled exception with saves in flight; the saves still commit; exit 1.
- ``with_error``: an exception inside ``with AsyncCheckpointer``; drained; exit 1.
- ``sys_exit``: ``sys.exit(3)`` with saves in flight; drained; exit 3.
- ``fail_final``: the final save fails and close() raises WriteError; exit 1.
- ``fail_atexit``: the final save fails and nobody calls close(): the atexit hook logs the
  error (an atexit hook cannot change the exit status, so this exits 0).
In the ``fail_*`` runs the earlier saves commit and only the final one fails.
With the process executor, the writer process is gone after the trainer exits.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from asyncckpt import list_checkpoints
from asyncckpt.catalog import list_leftovers

from ._procs import Spawner, Zygote
from ._support import knob, pid_alive, report, slow_enabled

pytestmark = pytest.mark.multiproc

NUMEL = 1 << 17  # ~1.1 MiB per save, three in flight at exit
SAVES = 3
WATCHDOG_S = 60
SCENARIOS = ("drain", "crash", "with_error", "sys_exit", "fail_final", "fail_atexit")
EXPECT: dict[str, tuple[int, list[int]]] = {  # exit code, committed steps
    "drain": (0, [1, 2, 3]),
    "crash": (1, [1, 2, 3]),
    "with_error": (1, [1, 2, 3]),
    "sys_exit": (3, [1, 2, 3]),
    "fail_final": (1, [1, 2]),
    "fail_atexit": (0, [1, 2]),
}


def _runs(n: int) -> list[dict[str, Any]]:
    """Mostly forked thread-executor runs; every 7th a fresh interpreter; 4 process executors."""
    runs = []
    for i in range(n):
        scenario = SCENARIOS[i % len(SCENARIOS)]
        runs.append({"scenario": scenario, "executor": "thread", "spawn": i % 7 == 6})
    for i, scenario in enumerate(("drain", "crash", "fail_final", "with_error")[: max(0, min(4, n // 12))]):
        runs[len(runs) - 1 - i * 2] = {"scenario": scenario, "executor": "process", "spawn": i % 2 == 1}
    return runs


def _one(run: dict[str, Any], i: int, tmp_path, zygote: Zygote, spawner: Spawner) -> dict[str, Any]:
    root = str(tmp_path / f"run{i}")
    log = str(tmp_path / f"run{i}.log")
    cfg = {"mode": "exit", "root": root, "numel": NUMEL, "saves": SAVES, "stdout": log,
           "scenario": run["scenario"], "executor": run["executor"]}  # fmt: skip
    t0 = time.monotonic()
    child = (spawner if run["spawn"] else zygote).start(cfg)
    code = child.wait(WATCHDOG_S)
    out: dict[str, Any] = {"run": i, **run, "seconds": round(time.monotonic() - t0, 2)}
    if code is None:
        child.kill()
        child.wait(10)
        return {**out, "hang": True, "problems": [f"hung for {WATCHDOG_S}s"]}
    events = child.drain()
    sabotage = os.path.join(root, ".tmp")
    if os.path.isfile(sabotage):  # the process-executor fail_* runs put a file there
        os.remove(sabotage)
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    problems = []
    want_code, want_steps = EXPECT[run["scenario"]]
    if code != want_code:
        problems.append(f"exit code {code}, expected {want_code}")
    if "EXITING" not in events:
        problems.append(f"never reached the exit point: {events}")
    steps = [c.step for c in list_checkpoints(root)] if os.path.isdir(root) else []
    if steps != want_steps:
        problems.append(f"committed {steps}, expected {want_steps}")
    if list_leftovers(root) if os.path.isdir(root) else []:
        problems.append(f"leftovers {list_leftovers(root)}")
    if run["scenario"] == "fail_final" and "WriteError" not in text:
        problems.append("close() did not raise WriteError")
    if run["scenario"] == "fail_atexit" and "failed while draining at interpreter exit" not in text:
        problems.append("the failed save at exit was not logged")
    for ev in events:
        if ev.startswith("WRITER "):
            pid, deadline = int(ev.split()[1]), time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                problems.append(f"writer process {pid} outlived its trainer")
    if problems:
        problems.append(f"log tail: {text[-1500:]}")
    return {**out, "hang": False, "code": code, "problems": problems}


def _exit_runs(tmp_path, n: int) -> list[dict[str, Any]]:
    with Zygote(log_path=str(tmp_path / "zygote.log")) as zygote, Spawner() as spawner:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_one, run, i, tmp_path, zygote, spawner) for i, run in enumerate(_runs(n))]
            return [f.result() for f in futs]


def _check(results: list[dict[str, Any]], name: str) -> None:
    by = Counter(f"{r['scenario']}/{r['executor']}{'/fresh' if r['spawn'] else ''}" for r in results)
    report(name, {
        "runs": len(results),
        "hangs": sum(r["hang"] for r in results),
        "failed": sum(bool(r["problems"]) for r in results),
        "max_seconds": max(r["seconds"] for r in results),
        "mean_seconds": round(sum(r["seconds"] for r in results) / len(results), 2),
        "runs_by_scenario": dict(sorted(by.items())),
    })  # fmt: skip
    bad = [r for r in results if r["problems"]]
    assert bad == [], "\n\n".join(
        f"{r['run']} {r['scenario']}/{r['executor']}: {r['problems']}" for r in bad[:5]
    )


def test_exit_with_saves_in_flight_fifty_runs(tmp_path) -> None:
    _check(_exit_runs(tmp_path, knob("ASYNCCKPT_EXIT_RUNS", 50)), "exit_runs")


@pytest.mark.slow
@pytest.mark.skipif(not slow_enabled(), reason="long randomized run: set ASYNCCKPT_SLOW=1")
@pytest.mark.timeout(7200)
def test_exit_with_saves_in_flight_long(tmp_path) -> None:
    _check(_exit_runs(tmp_path, knob("ASYNCCKPT_EXIT_RUNS_SLOW", 500)), "exit_runs_long")
