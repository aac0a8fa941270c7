"""Presets: the checkpointer options that mirror each training tool's own checkpointing.

Each returns keyword arguments for :class:`~asyncckpt.AsyncCheckpointer`:
``AsyncCheckpointer(root, state, **hf_trainer(save_steps=500, save_total_limit=3))``.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .retention_policy import KeepAll, KeepBest, KeepEvery, KeepLast, RetentionPolicy
from .save_policy import EveryNSteps, PerEpoch, SavePolicy, check_int

__all__ = ["hf_trainer", "axolotl", "openpi", "internlm", "h2o_llm_studio"]

# --------------------------------------------------------------------------- presets


def _options(
    owner: str,
    save_policy: SavePolicy | None,
    keep: list[RetentionPolicy],
    total_steps: int | None,
    *,
    enabled: bool = True,
    snapshot_every: int | None = None,
) -> dict[str, Any]:
    """The checkpointer's keyword arguments for a preset (option groups, not flat keywords)."""
    from .options import ScheduleOptions, SnapshotOptions  # options.py imports this module

    if total_steps is not None:
        check_int(owner, "total_steps", total_steps, 1, "pass the number of optimizer steps, or None")
    return {
        "schedule": ScheduleOptions(policy=save_policy, total_steps=total_steps),
        "keep": keep,
        "snapshots": SnapshotOptions(every=snapshot_every) if snapshot_every is not None else None,
        "enabled": enabled,
    }


def _limit(owner: str, limit: int | None) -> list[RetentionPolicy]:
    if limit is None:
        return [KeepAll()]
    return [KeepLast(check_int(owner, "save_total_limit", limit, 1, "use None to keep every checkpoint"))]


def hf_trainer(
    save_steps: int,
    save_total_limit: int | None = None,
    metric_for_best_model: str | None = None,
    greater_is_better: bool = False,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring Hugging Face ``TrainingArguments`` checkpointing.

    ``save_strategy="steps"`` with ``save_steps``; ``save_total_limit`` keeps the last N
    (None keeps all); with ``metric_for_best_model`` the best checkpoint is kept as well.
    HF moves the best inside its N, so it holds at most N; here the best comes in addition to the
    last N (at most N + 1).  Checkpoints saved without the metric are rotated normally.
    ``total_steps`` adds the final step, as HF's end-of-training save does.  Unlike HF,
    ``greater_is_better`` defaults to False for every metric: pass True for accuracy-like ones.
    """
    save = EveryNSteps(check_int("hf_trainer", "save_steps", save_steps, 1, "e.g. save_steps=500"))
    keep = _limit("hf_trainer", save_total_limit)
    if metric_for_best_model is not None and save_total_limit is not None:
        mode = "max" if greater_is_better else "min"
        keep.append(KeepBest(1, metric_for_best_model, mode, keep_missing=False))
    return _options("hf_trainer", save, keep, total_steps)


def axolotl(
    steps_per_epoch: int,
    saves_per_epoch: int,
    save_total_limit: int | None = None,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring Axolotl's ``saves_per_epoch`` and ``save_total_limit``.

    Saves ``saves_per_epoch`` times per epoch, evenly spaced, plus every epoch end (see
    :class:`PerEpoch`); keeps the last ``save_total_limit`` (None keeps all).
    """
    save = PerEpoch(steps_per_epoch, saves_per_epoch)
    return _options("axolotl", save, _limit("axolotl", save_total_limit), total_steps)


def openpi(save_interval: int, keep_period: int | None, total_steps: int) -> dict[str, Any]:
    """Options mirroring OpenPI's ``save_interval`` / ``keep_period`` (Orbax ``max_to_keep=1``).

    Saves every ``save_interval`` steps and the final step; keeps the newest checkpoint and,
    forever, every step divisible by ``keep_period`` (None: only the newest).
    """
    save = EveryNSteps(check_int("openpi", "save_interval", save_interval, 1, "e.g. save_interval=1000"))
    keep: list[RetentionPolicy] = [KeepLast(1)]
    if keep_period is not None:
        keep.append(KeepEvery(check_int("openpi", "keep_period", keep_period, 1, "e.g. 5000, or None")))
    return _options(
        "openpi", save, keep, check_int("openpi", "total_steps", total_steps, 1, "pass num_train_steps")
    )


def internlm(checkpoint_every: int, snapshot_every: int | None, total_steps: int) -> dict[str, Any]:
    """Options mirroring InternLM's ``checkpoint_every`` and ``oss_snapshot_freq``.

    Permanent checkpoints every ``checkpoint_every`` steps and at the final step, all kept;
    crash-recovery snapshots every ``snapshot_every`` steps, rotating through two slots
    (None: no snapshots).
    """
    save = EveryNSteps(check_int("internlm", "checkpoint_every", checkpoint_every, 1, "e.g. 1000"))
    if snapshot_every is not None:
        check_int("internlm", "snapshot_every", snapshot_every, 1, "e.g. 100, or None for no snapshots")
    total = check_int("internlm", "total_steps", total_steps, 1, "pass the total number of steps")
    return _options("internlm", save, [KeepAll()], total, snapshot_every=snapshot_every)


def h2o_llm_studio(
    mode: str,
    metric: str = "loss",
    greater_is_better: bool = False,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring H2O LLM Studio's ``save_checkpoint`` setting.

    H2O saves after each evaluation, so ``save_policy`` is None: every ``save_async`` the
    trainer makes (after its evaluation, with the metric) is saved.

    - ``"last"``: keeps only the newest checkpoint; ``total_steps`` guarantees the final one.
    - ``"best"``: keeps the checkpoint with the best ``metric``.  H2O keeps the best alone; here
      the newest is kept too, because retention never deletes the newest (crash resume needs it),
      so at most two remain.  Checkpoints without the metric are not kept for it.
    - ``"disabled"`` (or H2O's spelling ``"disable"``): ``enabled=False``, nothing is saved.
    """
    if mode == "last":
        return _options("h2o_llm_studio", None, [KeepLast(1)], total_steps)
    if mode == "best":
        best = KeepBest(1, metric, "max" if greater_is_better else "min", keep_missing=False)
        return _options("h2o_llm_studio", None, [best, KeepLast(1)], total_steps)
    if mode in ("disabled", "disable"):
        return _options("h2o_llm_studio", None, [], None, enabled=False)
    raise ConfigError(f"h2o_llm_studio: mode must be 'last', 'best' or 'disabled', got {mode!r}")
