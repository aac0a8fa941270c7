"""PyTorch Lightning: a ``CheckpointIO`` plugin that saves Lightning's checkpoints in the background.

Lightning keeps deciding *when* to save and *what to keep* (``ModelCheckpoint``: ``save_top_k``,
``monitor``, ``every_n_train_steps``, ``train_time_interval``, ``save_last``); asyncckpt does the
*how*::

    io = AsyncCheckpointIO("ckpt/run7")
    trainer = pl.Trainer(plugins=[io], callbacks=[ModelCheckpoint(dirpath="ckpt/run7/lightning",
                                                                 monitor="val_loss", save_top_k=2)])
    trainer.fit(model, ckpt_path="last")      # or a path ModelCheckpoint wrote, or the root

Lightning's whole checkpoint dict (weights, optimizers, schedulers, loops with their data
position, callbacks, hyper-parameters) becomes one asyncckpt step, numbered by its
``global_step``; plain values are stored as JSON, never pickled.  At the path Lightning names
(``.../epoch=0-step=40.ckpt``) the plugin writes a small JSON *pointer* naming the root and the
step, so ``ModelCheckpoint`` sees its files, ``ckpt_path="last"``/``"best"`` resolve, and
``remove_checkpoint`` releases the step: retention deletes a step once no live path names it
(at the next commit; the newest commit always stays, as everywhere in asyncckpt).
``load_checkpoint`` takes a pointer, a root (its newest step) or a step directory.

:class:`AsyncCheckpointCallback`, the 0.1 adapter, is deprecated in favour of the plugin.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import CheckpointIO
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.plugins import CheckpointIO  # type: ignore[no-redef]

import fsspec
import torch

from ..catalog import list_checkpoints
from ..checkpointer import AsyncCheckpointer
from ..errors import ConfigError, StepExistsError, UnsupportedStateError
from ..options import ScheduleOptions
from ..retention_policy import CheckpointRecord, RetentionPolicy
from ._tree import locate, read_tree

__all__ = ["AsyncCheckpointIO", "AsyncCheckpointCallback"]

log = logging.getLogger("asyncckpt")

POINTER_FORMAT = "asyncckpt-pointer"
_KEY = "lightning"  # the one top-level state key: Lightning's own keys may hold dots


class AsyncCheckpointIO(CheckpointIO):  # type: ignore[misc]
    """Saves Lightning's checkpoint dicts with :class:`~asyncckpt.AsyncCheckpointer`.

    Args:
        root: the asyncckpt root (path or fsspec URL) that holds the steps.
        keep: extra retention on top of Lightning's (a step survives while a live
            checkpoint path names it *or* a policy keeps it); None: Lightning alone decides.
        **options: other :class:`~asyncckpt.AsyncCheckpointer` options (``staging``,
            ``writer``, ``storage``, ``select``, ``on_stats``, ...).  ``schedule`` is not
            accepted: Lightning decides when to save.

    Raises:
        ConfigError: ``schedule`` (or the 0.1 ``save_policy``) was given.
    """

    def __init__(self, root: str | os.PathLike[str], *, keep: Any = None, **options: Any) -> None:
        super().__init__()
        for bad in ("schedule", "save_policy", "mode"):
            if bad in options:
                raise ConfigError(
                    f"AsyncCheckpointIO: {bad}= is not accepted; Lightning decides when to save "
                    "(ModelCheckpoint every_n_train_steps, train_time_interval, monitor, save_last)"
                )
        self.root = os.fspath(root)
        self.keep = keep
        self.options = options
        self._ckpt: AsyncCheckpointer | None = None
        self._lock = threading.Lock()
        self._paths: dict[str, int] = {}  # live pointer path -> step
        self._saved: set[int] = set()  # steps saved by this plugin's checkpointer
        self._older: set[int] = set()  # steps committed before this checkpointer started
        self._released: set[int] = set()  # older steps whose last pointer was removed

    # ------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Snapshot ``checkpoint`` and write it in the background as step ``global_step``."""
        if storage_options is not None:
            raise TypeError(
                "AsyncCheckpointIO.save_checkpoint got storage_options; pass fsspec options as "
                "AsyncCheckpointIO(root, storage=StorageOptions(fsspec=...))"
            )
        path = os.fspath(path)
        step = int(checkpoint.get("global_step", 0))
        state = {_KEY: _scalars_out(checkpoint)}
        ck = self._checkpointer(state)
        ck.state = state
        with self._lock:
            self._paths[path] = step  # before the save: the commit's prune must see it named
            self._released.discard(step)
        if step not in self._saved:
            try:
                ck.save_async(step, metrics=_monitored(checkpoint), force=True)
                self._saved.add(step)
            except StepExistsError:  # committed by an earlier run: this path names that step
                log.info("step=%d already committed under %s; %s points to it", step, self.root, path)
            except UnsupportedStateError as e:
                with self._lock:
                    self._paths.pop(path, None)
                raise UnsupportedStateError(
                    f"AsyncCheckpointIO: Lightning's checkpoint {str(e).replace('state[' + repr(_KEY) + ']', '')}"
                    " asyncckpt stores plain values as JSON and never pickles; convert it in "
                    "on_save_checkpoint, or leave it out of save_hyperparameters(ignore=[...])"
                ) from e
        _write_pointer(path, ck.root, step)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        """Lightning's checkpoint dict from a pointer file, a root (newest step) or a step dir."""
        if self._ckpt is not None:
            self._ckpt.wait()  # a step in flight may be the one asked for
        root, step = resolve(os.fspath(path))
        _, tree = read_tree(root, step)
        if not isinstance(tree.get(_KEY), dict):
            raise ConfigError(
                f"{path}: this asyncckpt checkpoint was not written by AsyncCheckpointIO (it has no "
                f"{_KEY!r} entry); load it with asyncckpt.resume() into your own state"
            )
        return _scalars_in(tree[_KEY])

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer; its step is deleted at the next commit once no path names it."""
        path = os.fspath(path)
        with self._lock:
            step = self._paths.pop(path, None)
            if step is None:
                step = _read_pointer(path, missing_ok=True)
            if step is not None and step not in self._paths.values():
                self._released.add(step)
        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            fs.rm(p)

    def teardown(self) -> None:
        """Drain every save in flight and stop the writer (end of ``fit``)."""
        if self._ckpt is not None:
            ck, self._ckpt = self._ckpt, None
            ck.close()

    # ------------------------------------------------------------------ internals

    def _checkpointer(self, state: dict[str, Any]) -> AsyncCheckpointer:
        if self._ckpt is None:
            self._older = {c.step for c in list_checkpoints(self.root)} if _exists(self.root) else set()
            self._saved = set()
            keep = [_KeepNamed(self), *_policies(self.keep)]
            self._ckpt = AsyncCheckpointer(
                self.root, state, schedule=ScheduleOptions(final=False), keep=keep, **self.options
            )
        return self._ckpt

    def _named(self) -> set[int]:
        with self._lock:
            return set(self._paths.values()) | (self._older - self._released)


class _KeepNamed:
    """Keeps the steps a live Lightning checkpoint path names, and older steps not released."""

    def __init__(self, io: AsyncCheckpointIO) -> None:
        self._io = io

    def keep(self, history: Sequence[CheckpointRecord], now: float) -> set[int]:
        return self._io._named()


def _policies(keep: Any) -> list[Any]:
    if keep is None:
        return []
    items = list(keep) if isinstance(keep, (list, tuple)) else [keep]
    for k in items:
        if not isinstance(k, RetentionPolicy):
            raise ConfigError(f"AsyncCheckpointIO: keep= takes retention policies, got {k!r}")
    return items


_SCALAR = "__asyncckpt_scalar__"


def _scalars_out(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Callback states with their 0-dim tensors as tagged JSON values.

    ``ModelCheckpoint`` keys its scores by file path (``best_k_models``), so as tensors their
    names would change at every save and force a new staging buffer each time; as JSON they
    cost nothing and come back as the same tensors (a float32 or int value is exact in JSON).
    """
    if not isinstance(checkpoint.get("callbacks"), dict):
        return checkpoint
    return {**checkpoint, "callbacks": _tag(checkpoint["callbacks"])}


def _tag(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.device.type == "cpu" and not v.is_complex():
        return {_SCALAR: v.item(), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, dict):
        return {k: _tag(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_tag(x) for x in v)
    return v


def _scalars_in(checkpoint: dict[str, Any]) -> dict[str, Any]:
    def untag(v: Any) -> Any:
        if isinstance(v, dict):
            if _SCALAR in v and len(v) == 2 and "dtype" in v:
                return torch.tensor(v[_SCALAR], dtype=getattr(torch, v["dtype"]))
            return {k: untag(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(untag(x) for x in v)
        return v

    if isinstance(checkpoint.get("callbacks"), dict):
        checkpoint["callbacks"] = untag(checkpoint["callbacks"])
    return checkpoint


def _monitored(checkpoint: dict[str, Any]) -> dict[str, float]:
    """The score each ModelCheckpoint computed for *this* save, by its monitor name."""
    out: dict[str, float] = {}
    for cb_state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(cb_state, dict) and isinstance(cb_state.get("monitor"), str):
            score = cb_state.get("current_score")
            if score is not None:
                out[cb_state["monitor"]] = float(score)
    return out


def _exists(root: str) -> bool:
    fs, p = fsspec.core.url_to_fs(root)
    return bool(fs.exists(p))


def _write_pointer(path: str, root: str, step: int) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    parent = os.path.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    doc = {"format": POINTER_FORMAT, "root": root, "step": step}
    with fs.open(p, "w") as f:
        json.dump(doc, f)


def _read_pointer(path: str, missing_ok: bool = False) -> int | None:
    return _pointer(path, missing_ok)[1]


def _pointer(path: str, missing_ok: bool = False) -> tuple[str | None, int | None]:
    fs, p = fsspec.core.url_to_fs(path)
    if missing_ok and not fs.exists(p):
        return None, None
    with fs.open(p, "rb") as f:
        head = f.read(4096)
    try:
        doc = json.loads(head)
        if doc.get("format") != POINTER_FORMAT:
            raise ValueError
        return str(doc["root"]), int(doc["step"])
    except (ValueError, KeyError, TypeError, AttributeError):
        if missing_ok:
            return None, None
        raise ConfigError(
            f"{path} is not an asyncckpt checkpoint pointer (a torch.save checkpoint?); load it "
            "without AsyncCheckpointIO, or pass an asyncckpt root or step directory"
        ) from None


def resolve(path: str) -> tuple[str, int | None]:
    """``(root, step)`` for a pointer file, a root (step None: newest) or a step directory."""
    fs, p = fsspec.core.url_to_fs(path)
    if fs.isfile(p):
        root, step = _pointer(path)
        assert root is not None
        return root, step
    return locate(path)


# ---------------------------------------------------------------------- the 0.1 callback


class AsyncCheckpointCallback(pl.Callback):  # type: ignore[misc]
    """Deprecated: use :class:`AsyncCheckpointIO` with ``ModelCheckpoint``.

    Saves the LightningModule, optimizers, LR schedulers and the global step with
    :class:`~asyncckpt.AsyncCheckpointer` (its own save policy decides when).  A step's save
    is issued once it is known whether validation runs at that step, so the metrics recorded
    with it are that step's own: validation metrics only when validation ran at that step.
    Resume restores weights and the step counter but not the data position or loops; use
    the plugin and ``fit(ckpt_path=...)`` for exact resume.

    Args:
        root: the checkpoint root (path or fsspec URL).
        resume: load the newest valid checkpoint when training starts.
        **options: any :class:`~asyncckpt.AsyncCheckpointer` option.
    """

    def __init__(self, root: str, *, resume: bool = True, **options: Any) -> None:
        super().__init__()
        warnings.warn(
            "asyncckpt.integrations.lightning.AsyncCheckpointCallback is deprecated: use "
            "Trainer(plugins=[AsyncCheckpointIO(root)]) with ModelCheckpoint, which also resumes "
            "exactly through fit(ckpt_path=...)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.root = root
        self.resume = resume
        self.options = options
        self.ckpt: AsyncCheckpointer | None = None
        self.resumed_step: int | None = None
        self.progress: dict[str, int] = {"global_step": 0}
        self._pending: int | None = None  # a finished step whose save waits for validation
        self._before_val: dict[str, float] = {}
        self._val_keys: set[str] = set()  # metrics that validation reports

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
        step = int(trainer.global_step)
        if self.ckpt is None or step == self.resumed_step:
            return
        self._flush(trainer, validated=False)
        self._pending = step  # validation may still run at this step: save once we know

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._flush(trainer, validated=False)  # no validation ran after the last step

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._before_val = _scalars(trainer.callback_metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        after = _scalars(trainer.callback_metrics)
        self._val_keys |= {k for k, v in after.items() if self._before_val.get(k) != v}
        if not trainer.sanity_checking:
            self._flush(trainer, validated=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer, validated=False)

    def _flush(self, trainer: Any, validated: bool) -> None:
        if self.ckpt is None or self._pending is None:
            return
        step, self._pending = self._pending, None
        metrics = _scalars(trainer.callback_metrics)
        if not validated:  # leave out what a validation at an earlier step reported
            metrics = {k: v for k, v in metrics.items() if k not in self._val_keys}
        self.progress["global_step"] = step
        self.ckpt.save_async(step, metrics=metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer, validated=False)
        if self.ckpt is not None:
            self.ckpt.close()  # saves the final step if the policy skipped it

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.ckpt is not None:
            # as leaving a `with` block by an exception: drain, but don't save the failed step
            self.ckpt.__exit__(type(exception), exception, exception.__traceback__)


def _scalars(metrics: Any) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
