"""When to save: the save policy, signal and file triggers, the snapshot cadence, the final step.

:class:`Scheduler` answers one question per ``save_async`` call: skip, a permanent save, or a
snapshot.  The policies it asks are pure; the clock, the triggers and the memory of the last
save live here.  It also remembers the last step it was asked about, so ``close()`` can save
the final step when the policy skipped it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from .layout import Kind
from .options import ScheduleOptions, SnapshotOptions
from .policy import SaveContext
from .save_policy import metric_number
from .triggers import SaveTriggers

__all__ = ["Scheduler", "encode_metrics"]

log = logging.getLogger("asyncckpt")


def encode_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Validate that metrics are a JSON object of plain values; returns a copy."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metrics key {k!r} must be a str")
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise TypeError(f"metrics[{k!r}] = {v!r} is not a JSON value") from None
        out[k] = v
    return out


class Scheduler:
    """Decides, per step, whether and where to save."""

    def __init__(self, opts: ScheduleOptions, snapshots: SnapshotOptions | None) -> None:
        self.opts = opts
        self.snapshot_every = snapshots.every if snapshots is not None else None
        self.triggers = (
            SaveTriggers(opts.on_signal, opts.trigger_file) if (opts.on_signal or opts.trigger_file) else None
        )
        self._start = time.monotonic()
        self._last_saved: tuple[int, float] | None = None  # last permanent save: (step, monotonic)
        # (step, metrics, whether a permanent save was made) of the last decide(consume=True)
        self._last_seen: tuple[int, dict[str, Any], bool] | None = None
        # per numeric metric, (lowest, highest) over the permanent saves so far: what
        # OnImprovement compares against, kept here so that the policy stays pure
        self._saved_range: dict[str, tuple[float, float]] = {}

    @property
    def signal_received(self) -> int | None:
        return None if self.triggers is None else self.triggers.signal_received

    def decide(
        self, step: int, metrics: dict[str, Any], force: bool = False, consume: bool = True
    ) -> Kind | None:
        """Where ``save_async(step)`` saves, or None to skip.

        ``consume=False`` (``should_save``) asks without side effects: a pending trigger is
        left pending and nothing is remembered.
        """
        kind = self._decide(step, metrics, force, consume)
        if consume:
            self._last_seen = (step, metrics, kind is Kind.PERMANENT)
            if kind is Kind.PERMANENT:
                self._last_saved = (step, time.monotonic())
                self._remember(metrics)
        return kind

    def _remember(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            x = metric_number(value)
            if x is not None:
                lo, hi = self._saved_range.get(name, (x, x))
                self._saved_range[name] = (min(lo, x), max(hi, x))

    def _decide(self, step: int, metrics: dict[str, Any], force: bool, consume: bool) -> Kind | None:
        if force or step == self.opts.total_steps:
            return Kind.PERMANENT
        if self.triggers is not None and consume:
            reason = self.triggers.fired()
            if reason is not None:
                log.warning("asyncckpt: saving step %d because of %s", step, reason)
                return Kind.PERMANENT
        policy = self.opts.policy
        ctx = SaveContext(
            step=step,
            now=time.monotonic(),
            last_saved_step=self._last_saved[0] if self._last_saved else None,
            last_saved_time=self._last_saved[1] if self._last_saved else None,
            start_time=self._start,
            metrics=metrics,
            saved_range=dict(self._saved_range),
        )
        if policy is None or policy.should_save(ctx):  # type: ignore[union-attr]
            return Kind.PERMANENT
        if self.snapshot_every is not None and step % self.snapshot_every == 0:
            return Kind.SNAPSHOT
        return None

    def final_step(self, final_step: int | None) -> tuple[int, dict[str, Any]] | None:
        """The step ``close()`` must still save, with its metrics, or None.

        An explicit ``final_step`` wins; otherwise (with ``final=True``) the last step passed
        to ``save_async`` if the policy skipped it.
        """
        last = self._last_seen
        if final_step is not None:
            metrics = last[1] if last is not None and last[0] == final_step else {}
            return final_step, metrics
        if self.opts.final and last is not None and not last[2]:
            return last[0], last[1]
        return None

    def close(self) -> None:
        if self.triggers is not None:
            self.triggers.close()
