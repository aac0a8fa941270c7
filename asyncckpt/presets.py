"""Presets: the checkpointer options that mirror each training tool's own checkpointing.

Each returns keyword arguments for :class:`~asyncckpt.AsyncCheckpointer`:
``AsyncCheckpointer(root, state, **hf_trainer(save_steps=500, save_total_limit=3))``.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError
from .retention_policy import KeepAll, KeepBest, KeepEvery, KeepLast, RetentionPolicy
from .save_policy import EveryNSteps, Never, OnImprovement, SavePolicy, check_int, check_positive

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
    final: bool = True,
) -> dict[str, Any]:
    """The checkpointer's keyword arguments for a preset (option groups, not flat keywords)."""
    from .options import ScheduleOptions, SnapshotOptions  # options.py imports this module

    if total_steps is not None:
        check_int(owner, "total_steps", total_steps, 1, "pass the number of optimizer steps, or None")
    return {
        "schedule": ScheduleOptions(policy=save_policy, total_steps=total_steps, final=final),
        "keep": keep,
        "snapshots": SnapshotOptions(every=snapshot_every) if snapshot_every is not None else None,
        "enabled": enabled,
    }


def _limit(owner: str, limit: int | None) -> list[RetentionPolicy]:
    if limit is None:
        return [KeepAll()]
    return [KeepLast(check_int(owner, "save_total_limit", limit, 1, "use None to keep every checkpoint"))]


def hf_save_interval(save_steps: float, max_steps: int) -> int:
    """HF Trainer's step interval for ``save_steps``: a float below 1 is a fraction of
    ``max_steps``, rounded up (``TrainerState.compute_steps``)."""
    return math.ceil(max_steps * save_steps) if save_steps < 1 else int(save_steps)


def hf_trainer(
    save_steps: float = 500,
    save_total_limit: int | None = None,
    metric_for_best_model: str | None = None,
    greater_is_better: bool | None = None,
    total_steps: int | None = None,
    *,
    save_strategy: str = "steps",
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Options mirroring Hugging Face ``TrainingArguments`` checkpointing.

    ``total_steps`` is HF's ``max_steps`` (the number of optimizer steps).  ``save_strategy``:

    - ``"steps"``: every ``save_steps`` steps (``global_step % save_steps == 0``); a float
      below 1 is a fraction of ``total_steps``, rounded up, as HF does (needs ``total_steps``).
      The final step is saved too, as HF's end-of-training save does.
    - ``"epoch"``: at the end of every epoch of ``steps_per_epoch`` steps and at the final step.
    - ``"best"``: when ``metric_for_best_model`` improves on every earlier save
      (:class:`OnImprovement`); nothing else, not even the final step.
    - ``"no"``: nothing.

    ``save_total_limit`` keeps the last N (None keeps all); with ``metric_for_best_model`` the
    best checkpoint is kept as well.  HF moves the best inside its N, so it holds at most N;
    here the best comes in addition to the last N (at most N + 1).  Checkpoints saved without
    the metric are rotated normally.  ``greater_is_better`` defaults as in HF: False for a
    metric whose name ends in ``"loss"``, True otherwise.
    """
    owner = "hf_trainer"
    mode = "min"
    if metric_for_best_model is not None:
        if greater_is_better is None:
            greater_is_better = not metric_for_best_model.endswith("loss")
        mode = "max" if greater_is_better else "min"
    keep = _limit(owner, save_total_limit)
    if metric_for_best_model is not None and save_total_limit is not None and save_strategy != "best":
        keep.append(KeepBest(1, metric_for_best_model, mode, keep_missing=False))
    if save_strategy == "steps":
        if isinstance(save_steps, float) and 0 < save_steps < 1:
            if total_steps is None:
                raise ConfigError(
                    f"hf_trainer: save_steps={save_steps} is a fraction of the run; pass total_steps "
                    "(HF's max_steps) too, or an int save_steps"
                )
            check_int(owner, "total_steps", total_steps, 1, "pass the number of optimizer steps")
            interval = hf_save_interval(save_steps, total_steps)
        else:  # HF accepts a whole float such as 500.0 as an int
            whole = (
                int(save_steps) if isinstance(save_steps, float) and save_steps.is_integer() else save_steps
            )
            interval = check_int(owner, "save_steps", whole, 1, "e.g. save_steps=500, or 0.1 of the run")
        return _options(owner, EveryNSteps(interval), keep, total_steps)
    if save_strategy == "epoch":
        fix = "pass steps_per_epoch (optimizer steps per epoch) with save_strategy='epoch'"
        epoch = EveryNSteps(check_int(owner, "steps_per_epoch", steps_per_epoch, 1, fix))
        return _options(owner, epoch, keep, total_steps)
    if save_strategy == "best":
        if metric_for_best_model is None:
            raise ConfigError(
                "hf_trainer: save_strategy='best' needs metric_for_best_model, e.g. 'eval_loss'"
            )
        return _options(owner, OnImprovement(metric_for_best_model, mode), keep, None, final=False)
    if save_strategy == "no":
        return _options(owner, Never(), keep, None, final=False)
    raise ConfigError(
        f"hf_trainer: save_strategy must be 'steps', 'epoch', 'best' or 'no', got {save_strategy!r}"
    )


def axolotl(
    steps_per_epoch: int,
    saves_per_epoch: int,
    save_total_limit: int | None = None,
    total_steps: int | None = None,
    num_epochs: float = 1,
) -> dict[str, Any]:
    """Options mirroring Axolotl's ``saves_per_epoch``, ``num_epochs`` and ``save_total_limit``.

    Axolotl turns ``saves_per_epoch`` into HF's fractional ``save_steps = 1 / (saves_per_epoch
    * num_epochs)``, which HF Trainer turns into one interval over the whole run,
    ``ceil(max_steps * save_steps)``, plus the final step.  So the saves are not per epoch:
    15 steps per epoch, 8 saves per epoch, 1 epoch saves at 2, 4, ..., 14 and 15.  When that
    fraction is not below 1 Axolotl sets no ``save_steps`` and HF saves at every epoch end.

    ``total_steps`` is HF's ``max_steps``; by default ``ceil(num_epochs * steps_per_epoch)``.
    ``save_total_limit`` keeps the last N (None keeps all; Axolotl's own default is 4).
    """
    owner = "axolotl"
    check_int(owner, "steps_per_epoch", steps_per_epoch, 1, "pass the optimizer steps per epoch")
    check_int(owner, "saves_per_epoch", saves_per_epoch, 1, "e.g. saves_per_epoch=4")
    epochs = check_positive(owner, "num_epochs", num_epochs, "e.g. num_epochs=3")
    if total_steps is None:
        total_steps = math.ceil(epochs * steps_per_epoch)  # HF: ceil(num_train_epochs * steps per epoch)
    check_int(owner, "total_steps", total_steps, 1, "pass HF's max_steps, or None")
    save_steps = 1.0 / (saves_per_epoch * num_epochs)  # axolotl/utils/config/__init__.py
    every = hf_save_interval(save_steps, total_steps) if save_steps < 1.0 else steps_per_epoch
    return _options(owner, EveryNSteps(every), _limit(owner, save_total_limit), total_steps)


def openpi(save_interval: int, keep_period: int | None, total_steps: int) -> dict[str, Any]:
    """Options mirroring OpenPI's ``save_interval`` / ``keep_period`` (Orbax ``max_to_keep=1``).

    Pass OpenPI's ``step`` (the loop index its checkpoints are named by) to ``save_async`` and
    ``total_steps = num_train_steps - 1``, the last one.  Saves every ``save_interval`` steps
    but not step 0, and the last step (``scripts/train.py``: ``step % save_interval == 0 and
    step > start_step or step == num_train_steps - 1``).  Keeps the newest checkpoint and,
    forever, every step divisible by ``keep_period`` (None: only the newest).
    """
    interval = check_int("openpi", "save_interval", save_interval, 1, "e.g. save_interval=1000")
    save = EveryNSteps(interval, offset=interval)
    keep: list[RetentionPolicy] = [KeepLast(1)]
    if keep_period is not None:
        keep.append(KeepEvery(check_int("openpi", "keep_period", keep_period, 1, "e.g. 5000, or None")))
    return _options(
        "openpi", save, keep, check_int("openpi", "total_steps", total_steps, 1, "pass num_train_steps - 1")
    )


def internlm(checkpoint_every: int, snapshot_every: int | None, total_steps: int) -> dict[str, Any]:
    """Options mirroring InternLM's ``checkpoint_every`` and ``oss_snapshot_freq``.

    Permanent checkpoints every ``checkpoint_every`` steps and at the final step, all kept;
    crash-recovery snapshots every ``snapshot_every`` steps, rotating through two slots.  As in
    InternLM, a snapshot frequency of 1 (or None) means no snapshots, and a step that is due
    both ways gets the permanent checkpoint.
    """
    save = EveryNSteps(check_int("internlm", "checkpoint_every", checkpoint_every, 1, "e.g. 1000"))
    if snapshot_every is not None:
        check_int("internlm", "snapshot_every", snapshot_every, 1, "e.g. 100, or None for no snapshots")
        if snapshot_every == 1:  # InternLM: `oss_snapshot_freq > 1 and step % freq == 0`
            snapshot_every = None
    total = check_int("internlm", "total_steps", total_steps, 1, "pass the total number of steps")
    return _options("internlm", save, [KeepAll()], total, snapshot_every=snapshot_every)


def h2o_llm_studio(
    mode: str,
    metric: str = "loss",
    greater_is_better: bool = False,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Options mirroring H2O LLM Studio's ``save_checkpoint`` setting.

    H2O considers a save after each evaluation; call ``save_async`` there, with the metric.

    - ``"last"``: saves every call, keeps only the newest; ``total_steps`` guarantees the final one.
    - ``"each_evaluation_epoch"``: saves every call and keeps them all.
    - ``"best"``: saves only when ``metric`` improves on the best so far (strictly, as H2O's
      ``objective_op``), so the one kept, the newest, is the best.  A call without the metric
      saves nothing, and neither does ``close()``.
    - ``"disabled"`` (or H2O's spelling ``"disable"``): ``enabled=False``, nothing is saved.
    """
    owner = "h2o_llm_studio"
    if mode == "last":
        return _options(owner, None, [KeepLast(1)], total_steps)
    if mode == "each_evaluation_epoch":
        return _options(owner, None, [KeepAll()], total_steps)
    if mode == "best":
        best = OnImprovement(metric, "max" if greater_is_better else "min")
        return _options(owner, best, [KeepLast(1)], None, final=False)
    if mode in ("disabled", "disable"):
        return _options(owner, None, [], None, enabled=False)
    raise ConfigError(
        f"h2o_llm_studio: mode must be 'last', 'each_evaluation_epoch', 'best' or 'disabled', got {mode!r}"
    )
