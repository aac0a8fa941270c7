"""Hugging Face Transformers: asynchronous saves from a ``TrainerCallback``.

Replace the Trainer's synchronous saves::

    args = TrainingArguments(..., save_strategy="no")      # the Trainer no longer saves
    cb = AsyncCheckpointCallback("ckpt/run7", schedule=500, keep=3)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()

The model, optimizer and LR scheduler are snapshotted after the optimizer step of each step
the save policy selects, and the final step at the end of training.  With ``resume=True``
(default) the newest checkpoint is loaded in place when training begins and
``state.global_step`` is set to its step; the Trainer does not skip already-seen batches
(pass ``resume_from_checkpoint`` to HF for that).  Evaluation metrics reported through
``on_evaluate`` are attached to the next save, so ``KeepBest`` can use them.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..checkpointer import AsyncCheckpointer

__all__ = ["AsyncCheckpointCallback"]


class AsyncCheckpointCallback(TrainerCallback):  # type: ignore[misc]
    """Saves with :class:`~asyncckpt.AsyncCheckpointer` from inside ``Trainer.train``.

    Args:
        root: the checkpoint root (path or fsspec URL).
        resume: load the newest valid checkpoint when training begins.
        **options: any :class:`~asyncckpt.AsyncCheckpointer` option.
    """

    def __init__(self, root: str, *, resume: bool = True, **options: Any) -> None:
        self.root = root
        self.resume = resume
        self.options = options
        self.ckpt: AsyncCheckpointer | None = None
        self.resumed_step: int | None = None
        self._metrics: dict[str, float] = {}
        self.progress: dict[str, Any] = {"global_step": 0, "epoch": 0.0}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:  # fmt: skip
        ckpt_state: dict[str, Any] = {"model": model, "progress": self.progress}
        if optimizer is not None:
            ckpt_state["optim"] = optimizer
        if lr_scheduler is not None:
            ckpt_state["sched"] = lr_scheduler
        self.ckpt = AsyncCheckpointer(self.root, ckpt_state, **self.options)
        if self.resume:
            self.resumed_step = self.ckpt.resume(allow_missing=True)
            if self.resumed_step is not None:
                state.global_step = self.resumed_step

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self._metrics.update({k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is None:
            return
        self.progress.update(global_step=int(state.global_step), epoch=float(state.epoch or 0.0))
        self.ckpt.save_async(int(state.global_step), metrics=dict(self._metrics))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
