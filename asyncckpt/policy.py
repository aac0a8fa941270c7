"""When to save and what to keep: pure functions of step, time and history.

Nothing here does I/O or reads a clock (the checkpointer owns both).  A save policy decides one
:class:`SaveContext`; a retention policy names the steps it keeps out of a history of
:class:`CheckpointRecord`; :func:`plan_deletions` unions them and enforces the invariants.
Steps are the values passed to ``save_async``: counts of completed optimizer steps.

This module is the public namespace; the code lives in ``save_policy.py``,
``retention_policy.py`` and ``presets.py``.
"""

from __future__ import annotations

from .presets import axolotl, h2o_llm_studio, hf_trainer, internlm, openpi
from .retention_policy import (
    CheckpointRecord,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepEveryNHours,
    KeepLast,
    KeepSteps,
    RetentionPolicy,
    plan_deletions,
)
from .save_policy import (
    AnyOf,
    AtSteps,
    Custom,
    EveryNSeconds,
    EveryNSteps,
    Never,
    OnImprovement,
    PerEpoch,
    SaveContext,
    SavePolicy,
    Schedule,
)

__all__ = [
    "SaveContext",
    "SavePolicy",
    "EveryNSteps",
    "EveryNSeconds",
    "PerEpoch",
    "AtSteps",
    "Schedule",
    "OnImprovement",
    "Custom",
    "AnyOf",
    "Never",
    "CheckpointRecord",
    "RetentionPolicy",
    "KeepLast",
    "KeepEvery",
    "KeepEveryNHours",
    "KeepBest",
    "KeepSteps",
    "KeepAll",
    "plan_deletions",
    "hf_trainer",
    "axolotl",
    "openpi",
    "internlm",
    "h2o_llm_studio",
]
