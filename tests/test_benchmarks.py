"""The benchmark runner works end to end (tiny sizes; the figures themselves are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = "floor (copy_ into touched buffers)"


@pytest.mark.multiproc
def test_run_quick_writes_results_and_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    libs = f"torch.save,asyncckpt,asyncckpt (skip),{FLOOR}"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--scenarios", "stall,overhead,gpu",
           "--libs", libs, "--intervals", "2", "--kinds", "sleep", "--json", str(out), "--plots", str(plots), "--dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    stall = res["stall"]["0.015625GiB/100"]
    assert set(stall) == {"torch.save", "asyncckpt", FLOOR}  # skip is an overhead-only setting
    for r in stall.values():
        assert len(r["stall_s"]) == 2 and r["median_durable_s"] >= r["median_stall_s"] > 0
        assert r["peak_pss"] > 0 and r["base_pss"] > 0  # sampled every 20 ms: peaks may be missed
    loop = res["overhead"]["sleep/every2"]
    assert loop["none"]["saves"] == 0 and loop["asyncckpt"]["saves"] == 6
    assert loop["asyncckpt (skip)"]["saves"] + loop["asyncckpt (skip)"]["skipped"] == 6
    assert loop["torch.save"]["stale_max"] <= 1  # synchronous: durable when the call returns
    if not res["gpu"].get("skipped"):
        assert "train" in res["gpu"]
    assert {p.name for p in plots.iterdir()} >= {"bench_stall.png", "bench_overhead.png", "bench_memory.png"}
    assert "stall, 0.015625GiB/100 tensors" in proc.stdout


def test_unknown_library_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--libs", "torch.sav"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown libraries ['torch.sav']" in proc.stderr
