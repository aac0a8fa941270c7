"""PyTorch Lightning: asynchronous saves from a ``Callback``.

Use it instead of ``ModelCheckpoint`` (or next to one with ``save_top_k=0``)::

    cb = AsyncCheckpointCallback("ckpt/run7", schedule=500, keep=3)
    trainer = pl.Trainer(callbacks=[cb], enable_checkpointing=False)
    trainer.fit(model)

It saves the LightningModule, every optimizer and LR scheduler, and the global step, after
the optimizer step of each batch the save policy selects, and the final step when training
ends.  With ``resume=True`` (default) it loads the newest checkpoint when training starts;
``cb.resumed_step`` tells which, and ``trainer.fit_loop`` is advanced so step counting
(and step-based policies) continue from there.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ..checkpointer import AsyncCheckpointer

__all__ = ["AsyncCheckpointCallback"]


class AsyncCheckpointCallback(pl.Callback):  # type: ignore[misc]
    """Saves with :class:`~asyncckpt.AsyncCheckpointer` from inside ``trainer.fit``.

    Args:
        root: the checkpoint root (path or fsspec URL).
        resume: load the newest valid checkpoint when training starts.
        **options: any :class:`~asyncckpt.AsyncCheckpointer` option (``schedule``,
            ``keep``, ``writer``, ``storage``, ...).
    """

    def __init__(self, root: str, *, resume: bool = True, **options: Any) -> None:
        super().__init__()
        self.root = root
        self.resume = resume
        self.options = options
        self.ckpt: AsyncCheckpointer | None = None
        self.resumed_step: int | None = None
        self.progress: dict[str, int] = {"global_step": 0}

    def _state(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        scheds = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        return {
            "model": pl_module,
            "optimizers": list(trainer.optimizers),
            "schedulers": scheds,
            "progress": self.progress,
        }

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.ckpt = AsyncCheckpointer(self.root, self._state(trainer, pl_module), **self.options)
        if self.resume:
            self.resumed_step = self.ckpt.resume()
            if self.resumed_step is not None:
                # fast-forward Lightning's step counter, so step-based logic continues
                progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
                progress.optimizer.step.total.completed = self.resumed_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.ckpt is None:
            return
        step = int(trainer.global_step)
        if step == self.resumed_step:
            return
        self.progress["global_step"] = step
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        }
        self.ckpt.save_async(step, metrics=metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.close()  # saves the final step if the policy skipped it

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.ckpt is not None:
            # as leaving a `with` block by an exception: drain, but don't save the failed step
            self.ckpt.__exit__(type(exception), exception, exception.__traceback__)
