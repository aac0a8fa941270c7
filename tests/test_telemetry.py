"""Per-save stats, the callback hook, the log line and the progress bar."""

from __future__ import annotations

import io

import pytest
import torch

from asyncckpt import AsyncCheckpointer
from asyncckpt.progress import Progress


def test_on_stats_receives_every_committed_save(root: str) -> None:
    seen: list[dict] = []
    state = {"w": torch.randn(1 << 16)}
    with AsyncCheckpointer(root, state, on_stats=seen.append) as ck:
        for step in range(3):
            ck.save_async(step).result()
    assert [r["step"] for r in seen] == [0, 1, 2]
    for r in seen:
        assert r["stall_s"] > 0 and r["write_s"] > 0 and r["bytes_written"] > 4 * (1 << 16)
        assert r["throughput_Bps"] > 0 and "queue_wait_s" in r and r["tier"] == "permanent"


def test_a_failing_callback_never_breaks_saving(root: str, caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: dict) -> None:
        raise ValueError("sink down")

    with AsyncCheckpointer(root, {"w": torch.ones(8)}, on_stats=broken) as ck:
        ck.save_async(1).result()
        ck.save_async(2).result()
    assert sum("on_stats callback raised ValueError" in r.getMessage() for r in caplog.records) == 2


def test_upload_seconds_are_reported(s3, tmp_path) -> None:
    root, opts, _ = s3
    seen: list[dict] = []
    with AsyncCheckpointer(
        root,
        {"w": torch.ones(1000)},
        local_dir=str(tmp_path / "l"),
        storage_options=opts,
        on_stats=seen.append,
    ) as ck:
        h = ck.save_async(1)
        h.uploaded.result(timeout=60)
        ck.wait_uploaded()
    assert [("upload_s" in r) for r in seen] == [False, True]
    assert seen[-1]["upload_s"] > 0 and any("upload_s" in r for r in ck.stats())


def test_progress_bar_draws_on_a_terminal_and_is_silent_otherwise() -> None:
    out = io.StringIO()
    p = Progress(100, "loading", stream=out, force=True)
    p.update(50)
    p.update(50)
    p.close()
    assert "loading" in out.getvalue() and "100.0%" in out.getvalue()
    quiet = io.StringIO()  # not a TTY: nothing at all
    q = Progress(100, "loading", stream=quiet)
    q.update(100)
    q.close()
    assert quiet.getvalue() == ""
