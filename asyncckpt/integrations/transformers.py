"""Hugging Face Transformers: a ``Trainer`` that saves with asyncckpt, and resumes exactly.

:class:`AsyncTrainer` is a drop-in ``Trainer``.  HF still decides *when* to save
(``save_strategy`` "steps" / "epoch" / "best", ``save_steps``, ``control.should_save``);
asyncckpt does the *how*: the model, optimizer, LR scheduler, grad scaler, the
``TrainerState`` (global step, epoch, best metric and checkpoint, log history, stateful
callbacks) and the RNG states become one asyncckpt step under ``asyncckpt_root``
(default ``<output_dir>/asyncckpt``), written in the background::

    args = TrainingArguments("out", save_steps=500, save_total_limit=3, ...)
    trainer = AsyncTrainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    # later, or after a crash: HF's own resume path, pointed at the root (newest step),
    # at one step directory, or True (newest under asyncckpt_root)
    trainer.train(resume_from_checkpoint=True)

Resuming goes through HF's own code: it restores the ``TrainerState``, skips the batches
already seen in the interrupted epoch and reloads the RNG states where HF does.  Each save
records the metrics HF logged at *its own* step (``eval_loss``...), so retention keeps the
true best.  ``save_total_limit`` keeps HF's rule (the newest and the best always survive).

:class:`AsyncCheckpointCallback` (a ``TrainerCallback`` with its own save policy) is kept for
setups that cannot change the Trainer class; it does not restore the data position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .. import layout
from ..catalog import list_checkpoints
from ..checkpointer import AsyncCheckpointer
from ..errors import CheckpointNotFoundError, ConfigError
from ..options import ScheduleOptions
from ..resume import resume
from ..retention_policy import PERMANENT, CheckpointRecord
from ._tree import locate, read_plain

__all__ = ["AsyncTrainer", "AsyncCheckpointMixin", "KeepLastAndBest", "AsyncCheckpointCallback"]

_HF_DIR = re.compile(r"^checkpoint-(\d+)$")
_PARTS = ("model", "optimizer", "scheduler", "scaler", "rng", "trainer_state")


@dataclasses.dataclass(frozen=True)
class KeepLastAndBest:
    """HF's ``save_total_limit`` rotation as a pure retention policy.

    Keeps the ``limit`` newest steps, and always the newest and the best (the first step
    whose own ``metric`` beat every earlier one), ``max(limit, 2)`` steps when they differ.
    ``limit`` None keeps everything.
    """

    limit: int | None
    metric: str | None = None
    greater_is_better: bool = False

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        recs = sorted((r for r in history if r.tier == PERMANENT), key=lambda r: r.step)
        steps = [r.step for r in recs]
        if self.limit is None or self.limit <= 0 or len(steps) <= self.limit:
            return set(steps)
        protected = {steps[-1]}
        if (best := self.best(recs)) is not None:
            protected.add(best)
        keep, remaining = set(steps), len(steps)
        for s in steps:  # as transformers.trainer_utils.rotate_checkpoints: oldest go first
            if remaining <= max(self.limit, len(protected)):
                break
            if s not in protected:
                keep.discard(s)
                remaining -= 1
        return keep

    def best(self, records: Sequence[CheckpointRecord]) -> int | None:
        """The step whose own metric is best; the earlier one on a tie (as HF)."""
        best_step, best = None, None
        for r in sorted(records, key=lambda r: r.step):
            v = r.metrics.get(self.metric) if self.metric else None
            if isinstance(v, (int, float)) and (
                best is None or (v > best if self.greater_is_better else v < best)
            ):
                best_step, best = r.step, v
        return best_step


class _Rng:
    """The RNG states HF saves (python, numpy, torch CPU and CUDA), applied when HF asks."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        name, raw_keys, pos, has_gauss, cached = np.random.get_state()
        keys = np.asarray(raw_keys, dtype=np.int64)
        sd: dict[str, Any] = {
            "python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys), int(pos), int(has_gauss), float(cached)],
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.random.get_rng_state_all()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd

    def apply(self) -> None:
        sd = self.loaded
        if sd is None:
            return
        version, internal, gauss = sd["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = sd["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.random.set_rng_state(sd["cpu"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.random.set_rng_state_all(sd["cuda"])


class _TrainerState:
    """The ``TrainerState`` as HF's own ``trainer_state.json`` text."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(dataclasses.asdict(self.trainer.state), sort_keys=True)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass  # HF reads it from the resume view's trainer_state.json itself


class AsyncCheckpointMixin:
    """Mix into a ``Trainer`` subclass (before it) to save and resume with asyncckpt.

    Args (keywords, removed before ``Trainer.__init__``):
        asyncckpt_root: the checkpoint root; default ``<output_dir>/asyncckpt``.
        asyncckpt_options: other :class:`~asyncckpt.AsyncCheckpointer` options
            (``staging``, ``writer``, ``storage``, ``keep`` added to HF's rotation, ...).
    """

    if TYPE_CHECKING:  # what the Trainer this is mixed into provides
        args: Any
        model: Any
        optimizer: Any
        lr_scheduler: Any
        accelerator: Any
        hp_search_backend: Any
        store_flos: Any
        state: Any
        callback_handler: Any
        control: Any

    def __init__(self, *args: Any, asyncckpt_root: str | None = None,
                 asyncckpt_options: dict[str, Any] | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        opts = dict(asyncckpt_options or {})
        if "schedule" in opts or "save_policy" in opts:
            raise ConfigError(
                "AsyncTrainer: the Trainer decides when to save (save_strategy, save_steps); "
                "leave schedule= out of asyncckpt_options"
            )
        self._extra_keep = opts.pop("keep", None)
        self.asyncckpt_options = opts
        self.asyncckpt_root = os.fspath(asyncckpt_root or os.path.join(self.args.output_dir, "asyncckpt"))
        self.asyncckpt: AsyncCheckpointer | None = None
        self._rng = _Rng()
        self._resume_from: tuple[str, int, str] | None = None  # root, step, view dir
        self._steps: set[int] = set()  # steps saved or committed under the root (best candidates)

    # ------------------------------------------------------------------ saving

    def _checkpointer(self) -> AsyncCheckpointer:
        if self.asyncckpt is None:
            a = self.args
            metric = a.metric_for_best_model
            if metric is not None and not metric.startswith("eval_"):
                metric = f"eval_{metric}"
            keep: list[Any] = [KeepLastAndBest(a.save_total_limit, metric, bool(a.greater_is_better))]
            if self._extra_keep is not None:
                extra = self._extra_keep
                keep += list(extra) if isinstance(extra, (list, tuple)) else [extra]
            state: dict[str, Any] = {"model": self.model, "trainer_state": _TrainerState(self)}  # type: ignore[arg-type]
            if not a.save_only_model:
                state.update(optimizer=self.optimizer, scheduler=self.lr_scheduler, rng=self._rng)
                scaler = getattr(self.accelerator, "scaler", None)
                if scaler is not None:
                    state["scaler"] = scaler
            self._steps = (
                {c.step for c in list_checkpoints(self.asyncckpt_root)}
                if os.path.isdir(self.asyncckpt_root)
                else set()
            )
            self.asyncckpt = AsyncCheckpointer(
                self.asyncckpt_root, state, schedule=ScheduleOptions(final=False), keep=keep,
                **self.asyncckpt_options,
            )  # fmt: skip
        return self.asyncckpt

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Replaces HF's synchronous save: same decisions, written by asyncckpt."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        ck = self._checkpointer()
        step = int(self.state.global_step)
        best = self.state.best_global_step
        if self.args.save_strategy in ("steps", "epoch", "best") and best:
            if best == step or best in self._steps:
                self.state.best_model_checkpoint = layout.step_dir(ck.root, PERMANENT, best)
        if self.args.should_save:  # HF's bookkeeping of stateful callbacks, as in its own save
            for cb in [
                c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)
            ]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
        ck.save_async(step, metrics=self._own_metrics(step), force=True)
        self._steps.add(step)

    def _own_metrics(self, step: int) -> dict[str, float]:
        """What HF logged at this very step (eval_loss, loss, ...), never an older value."""
        out: dict[str, float] = {}
        for entry in self.state.log_history:
            if entry.get("step") == step:
                out.update({k: float(v) for k, v in entry.items()
                            if k not in ("step", "epoch") and isinstance(v, (int, float))})  # fmt: skip
        return out

    # ------------------------------------------------------------------ resuming

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """HF's ``train``; ``resume_from_checkpoint`` also takes an asyncckpt root or step dir."""
        target = self._resolve(resume_from_checkpoint)
        view = None
        if target is not None:
            root, step = target
            view = tempfile.mkdtemp(prefix="asyncckpt-hf-resume-")
            trainer_state = read_plain(root, step, "trainer_state")["json"]
            with open(os.path.join(view, "trainer_state.json"), "w") as f:
                f.write(trainer_state)
            self._resume_from = (root, step, view)
            resume_from_checkpoint = view
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        except BaseException:
            if self.asyncckpt is not None:
                ck, self.asyncckpt = self.asyncckpt, None
                ck.__exit__(RuntimeError, None, None)  # drain; a failed run saves no final state
            raise
        finally:
            self._resume_from = None
            if view is not None:
                shutil.rmtree(view, ignore_errors=True)
        if self.asyncckpt is not None:
            ck, self.asyncckpt = self.asyncckpt, None
            ck.close()
        return out

    def _resolve(self, arg: str | bool | None) -> tuple[str, int] | None:
        if arg is None or arg is False:
            return None
        if arg is True:
            steps = (
                [c.step for c in list_checkpoints(self.asyncckpt_root)]
                if os.path.isdir(self.asyncckpt_root)
                else []
            )
            if not steps:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint under {self.asyncckpt_root} to resume from"
                )
            return self.asyncckpt_root, steps[-1]
        path = os.fspath(arg)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return None  # a checkpoint in HF's own format: HF loads it
        root, step = locate(path)
        if step is None:
            steps = [c.step for c in list_checkpoints(root)] if os.path.isdir(root) else []
            if not steps:
                m = _HF_DIR.match(os.path.basename(path.rstrip("/")))
                hint = (
                    f"resume_from_checkpoint={self.asyncckpt_root!r} (the newest step) or "
                    f"{layout.step_dir(self.asyncckpt_root, PERMANENT, int(m.group(1)))!r}"
                    if m else f"resume_from_checkpoint={self.asyncckpt_root!r} or True"
                )  # fmt: skip
                raise CheckpointNotFoundError(
                    f"{path} is neither an HF checkpoint nor an asyncckpt root with a committed step; "
                    f"AsyncTrainer saves under {self.asyncckpt_root}: pass {hint}"
                )
            step = steps[-1]
        return root, step

    def _ours(self, path: str | None) -> tuple[str, int] | None:
        r = self._resume_from
        return (r[0], r[1]) if r is not None and path == r[2] else None

    def _load_part(self, root: str, step: int, state: dict[str, Any]) -> None:
        resume(root, state, step=step, exclude=[p for p in _PARTS if p not in state])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if (t := self._ours(resume_from_checkpoint)) is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._load_part(*t, {"model": model if model is not None else self.model})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if (t := self._ours(checkpoint)) is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if "optimizer" in _saved_parts(*t):  # absent with save_only_model, as in HF
            self._load_part(*t, {"optimizer": self.optimizer, "scheduler": self.lr_scheduler})

    def _load_scaler(self, checkpoint: str | None) -> None:
        if (t := self._ours(checkpoint)) is None:
            return super()._load_scaler(checkpoint)  # type: ignore[misc]
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in _saved_parts(*t):
            self._load_part(*t, {"scaler": scaler})

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if (t := self._ours(checkpoint)) is None:
            return super()._load_rng_state(checkpoint)  # type: ignore[misc]
        if "rng" in _saved_parts(*t):
            rng = _Rng()
            self._load_part(*t, {"rng": rng})
            rng.apply()

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        root, step = locate(best) if best else (None, None)
        if step is None or root is None:
            return super()._load_best_model()  # type: ignore[misc]
        if self.asyncckpt is not None:
            self.asyncckpt.wait()  # the best step may still be in flight
        self._load_part(root, step, {"model": self.model})


def _saved_parts(root: str, step: int) -> set[str]:
    return set(read_plain(root, step, None))


class AsyncTrainer(AsyncCheckpointMixin, Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` whose checkpoints are written by asyncckpt; see the module doc."""


# ---------------------------------------------------------------------- the callback


class AsyncCheckpointCallback(TrainerCallback):  # type: ignore[misc]
    """Saves with :class:`~asyncckpt.AsyncCheckpointer` from inside ``Trainer.train``.

    For a Trainer class you cannot change; :class:`AsyncTrainer` also resumes exactly.
    Its own save policy (``schedule=``) decides when; use ``save_strategy="no"``.  A step at
    which the Trainer evaluates is saved after the evaluation, with that evaluation's
    metrics; other steps are saved with no evaluation metrics.  With ``resume=True``
    the newest checkpoint is loaded when training begins and ``state.global_step`` is set
    to its step; the data position is not restored.

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
        self.progress: dict[str, Any] = {"global_step": 0, "epoch": 0.0}
        self._pending: int | None = None  # a step whose save waits for its evaluation

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

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is None:
            return
        self.progress.update(global_step=int(state.global_step), epoch=float(state.epoch or 0.0))
        if control.should_evaluate:  # evaluation follows at this step: save with its metrics
            self._pending = int(state.global_step)
        else:
            self.ckpt.save_async(int(state.global_step))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.ckpt is None or self._pending is None or self._pending != state.global_step:
            return
        step, self._pending = self._pending, None
        own = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        self.ckpt.save_async(step, metrics=own)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            if self._pending is not None:
                self.ckpt.save_async(self._pending)
                self._pending = None
            self.ckpt.close()
