"""Each preset saves at exactly the steps its tool saves at, for the same configuration.

HF Trainer (and Axolotl, which configures it) runs for real: a tiny model, one sample per
step, and a callback recording ``on_save``.  OpenPI, InternLM and H2O LLM Studio are checked
against their save rule as written in their source (cited at each test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt import AsyncCheckpointer, list_checkpoints
from asyncckpt.policy import OnImprovement, axolotl, h2o_llm_studio, hf_trainer, internlm, openpi
from asyncckpt.schedule import Scheduler

transformers = pytest.importorskip("transformers")


def preset_saves(
    options: dict[str, Any], steps: Iterable[int], metrics: Callable[[int], dict] | None = None
) -> list[int]:
    """Steps the checkpointer saves with ``options`` (permanent saves, then close()'s final)."""
    sched = Scheduler(options["schedule"], options["snapshots"])
    try:
        out = [
            s
            for s in steps
            if sched.decide(s, metrics(s) if metrics else {}) is not None and options["enabled"]
        ]
        final = sched.final_step(None)
        return out + ([final[0]] if final is not None and final[0] not in out else [])
    finally:
        sched.close()


# --------------------------------------------------------------------------- HF Trainer, for real


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.w(x).squeeze(-1) - labels).pow(2).mean()}


class _Recorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.saved: list[int] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saved.append(state.global_step)


class _ScriptedEval(transformers.Trainer):
    """``evaluate`` returns a scripted metric per step, so "best" is known in advance."""

    script: dict[int, float] = {}

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        return {"eval_loss": self.script[self.state.global_step]}


def hf_saves(tmp_path: Path, steps_per_epoch: int, epochs: float, script: dict[int, float] | None = None,
             **args: Any) -> list[int]:  # fmt: skip
    """The global steps at which a real ``transformers.Trainer`` saves (one sample per step)."""
    data = [{"x": torch.ones(2), "labels": torch.tensor(0.0)} for _ in range(steps_per_epoch)]
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=epochs, per_device_train_batch_size=1,
        save_only_model=True, report_to=[], disable_tqdm=True, logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, **args,
    )  # fmt: skip
    recorder = _Recorder()
    cls = transformers.Trainer
    if script is not None:
        cls = type("Scripted", (_ScriptedEval,), {"script": script})
    trainer = cls(model=_Tiny(), args=targs, train_dataset=data, eval_dataset=data[:1], callbacks=[recorder])
    trainer.train()
    return recorder.saved


@pytest.mark.parametrize("steps_per_epoch", [8, 15, 37, 100])
def test_axolotl_saves_per_epoch_where_hf_trainer_saves(tmp_path: Path, steps_per_epoch: int) -> None:
    """Axolotl: ``save_steps = 1.0 / (saves_per_epoch * num_epochs)`` when below 1
    (src/axolotl/utils/config/__init__.py), then ``save_strategy="steps"`` with it
    (core/builders/base.py); HF does the rest."""
    saves_per_epoch, epochs = 8, (2 if steps_per_epoch < 20 else 1)
    hf = hf_saves(tmp_path, steps_per_epoch, epochs, save_strategy="steps",
                  save_steps=1.0 / (saves_per_epoch * epochs))  # fmt: skip
    ours = preset_saves(axolotl(steps_per_epoch, saves_per_epoch, num_epochs=epochs),
                        range(1, steps_per_epoch * epochs + 1))  # fmt: skip
    assert ours == hf
    if steps_per_epoch == 15:  # the case: every other step, not every step
        assert hf == list(range(2, 31, 2))


def test_axolotl_one_save_per_epoch_is_hf_epoch_strategy(tmp_path: Path) -> None:
    """``saves_per_epoch * num_epochs == 1`` gives no ``save_steps``: Axolotl's default
    ``save_strategy="epoch"``."""
    hf = hf_saves(tmp_path, 7, 1, save_strategy="epoch")
    assert preset_saves(axolotl(7, 1), range(1, 8)) == hf == [7]


@pytest.mark.parametrize(
    "spe, epochs, strategy, save_steps",
    [(10, 2, "steps", 3), (13, 1, "steps", 0.2), (6, 2.5, "epoch", None), (9, 1, "no", None)],
)
def test_hf_trainer_preset_saves_where_hf_trainer_saves(
    tmp_path: Path, spe: int, epochs: float, strategy: str, save_steps: float | None
) -> None:
    extra = {"save_steps": save_steps} if save_steps is not None else {}
    hf = hf_saves(tmp_path, spe, epochs, save_strategy=strategy, **extra)
    total = math.ceil(epochs * spe)
    preset = hf_trainer(save_steps or 500, save_strategy=strategy, steps_per_epoch=spe, total_steps=total)
    assert preset_saves(preset, range(1, total + 1)) == hf


def test_hf_trainer_best_saves_where_hf_trainer_saves(tmp_path: Path) -> None:
    """``save_strategy="best"``: evaluation every 2 steps, scripted losses."""
    script = {2: 0.9, 4: 0.7, 6: 0.8, 8: 0.7, 10: 0.5, 12: 0.6, 14: 0.2, 16: 0.2}
    hf = hf_saves(tmp_path, 16, 1, script=script, save_strategy="best", eval_strategy="steps",
                  eval_steps=2, metric_for_best_model="eval_loss")  # fmt: skip
    preset = hf_trainer(metric_for_best_model="eval_loss", save_strategy="best")
    ours = preset_saves(preset, range(1, 17), lambda s: {"eval_loss": script[s]} if s in script else {})
    assert ours == hf == [2, 4, 10, 14]


# --------------------------------------------------------------------------- rules from source


@pytest.mark.parametrize("interval, n", [(10, 100), (7, 50), (5, 5), (1, 4)])
def test_openpi_rule(interval: int, n: int) -> None:
    """openpi scripts/train.py: for step in range(start_step, num_train_steps): ... if (step %
    save_interval == 0 and step > start_step) or step == num_train_steps - 1: save_state(step)."""
    rule = [s for s in range(0, n) if (s % interval == 0 and s > 0) or s == n - 1]
    assert preset_saves(openpi(interval, None, n - 1), range(0, n)) == rule


@pytest.mark.parametrize("every, snap, total", [(20, 5, 47), (3, 2, 12), (10, 1, 25), (4, None, 9)])
def test_internlm_rule(every: int, snap: int | None, total: int) -> None:
    """InternEvo checkpoint manager ``is_now_to_save_ckpt``: a snapshot when ``oss_snapshot_freq
    > 1 and step_count % oss_snapshot_freq == 0``; a normal checkpoint (winning over the
    snapshot) when ``step_count % checkpoint_every == 0 or step_count == total_steps``."""
    opts = internlm(every, snap, total)
    sched = Scheduler(opts["schedule"], opts["snapshots"])
    try:
        ours = {s: sched.decide(s, {}) for s in range(1, total + 1)}
    finally:
        sched.close()
    for s, kind in ours.items():
        normal = s % every == 0 or s == total
        snapshot = snap is not None and snap > 1 and s % snap == 0
        expected = "permanent" if normal else "snapshot" if snapshot else None
        assert (kind.value if kind is not None else None) == expected, s


def test_h2o_llm_studio_rule() -> None:
    """llm_studio/train.py, after each evaluation: "last" saves (overwriting), "best" saves when
    ``objective_op(val_metric, best_val_metric)`` (np.less / np.greater, best starting at
    +-inf), "each_evaluation_epoch" saves every time, "disable" never."""
    evals = {10: 0.5, 20: 0.3, 30: 0.4, 40: 0.3, 50: 0.25}
    loss = lambda s: {"loss": evals[s]}  # noqa: E731
    assert preset_saves(h2o_llm_studio("best"), evals, loss) == [10, 20, 50]
    acc = lambda s: {"acc": evals[s]}  # noqa: E731
    assert preset_saves(h2o_llm_studio("best", "acc", greater_is_better=True), evals, acc) == [10]
    assert preset_saves(h2o_llm_studio("last"), evals, loss) == list(evals)
    assert preset_saves(h2o_llm_studio("each_evaluation_epoch"), evals, loss) == list(evals)
    assert preset_saves(h2o_llm_studio("disable"), evals, loss) == []


# --------------------------------------------------------------------------- end to end


def test_on_improvement_end_to_end(tmp_path: Path) -> None:
    """save_async with metrics through a real checkpointer: only improvements are committed,
    and should_save does not use up an improvement."""
    root = str(tmp_path / "ckpt")
    state = {"w": torch.zeros(8)}
    losses = {1: 0.9, 2: 0.95, 3: 0.6, 4: 0.6, 5: None, 6: 0.59, 7: 0.7}
    with AsyncCheckpointer(root, state, schedule=OnImprovement("eval_loss"), keep=100) as ck:
        for step, loss in losses.items():
            state["w"].add_(1)
            metrics = {} if loss is None else {"eval_loss": loss}
            assert ck.should_save(step, metrics=metrics) == ck.should_save(step, metrics=metrics)
            ck.save_async(step, metrics=metrics)
    # close() saves the last step the policy skipped (final=True): step 7
    assert [c.step for c in list_checkpoints(root)] == [1, 3, 6, 7]
    with AsyncCheckpointer(tmp_path / "h2o", state, **h2o_llm_studio("best", metric="eval_loss")) as ck:
        for step, loss in losses.items():
            ck.save_async(step, metrics={} if loss is None else {"eval_loss": loss})
    assert [(c.step, c.metrics) for c in list_checkpoints(tmp_path / "h2o")] == [(6, {"eval_loss": 0.59})]
