"""The main job runs end to end: crash mid-save, bit-exact resume, finished training."""

from __future__ import annotations

import os
import subprocess
import sys

from asyncckpt import list_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_crashes_resumes_bit_exact_and_finishes(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "demo", "--dir", str(tmp_path), "--steps", "30", "--every", "10", "--kill-at", "20"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIGKILL while it is in flight" in out.stdout
    assert "bit-exact" in out.stdout and "identical to the killed run" in out.stdout
    assert [c.step for c in list_checkpoints(tmp_path / "run")][-1] == 30
    assert "synchronous torch.save" in out.stdout


def test_cli_help_and_unknown_command() -> None:
    env = dict(os.environ, PYTHONPATH=REPO)
    ok = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "--help"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and "demo" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "frobnicate"], capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
