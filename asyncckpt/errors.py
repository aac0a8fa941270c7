"""The asyncckpt error tree.

Every library error derives from :class:`AsyncCheckpointError` and also from the builtin
exception a caller would naturally catch (``ValueError``, ``OSError``, ...), so code that
predates asyncckpt keeps working.  Messages say what happened, where, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AsyncCheckpointError",
    "ConfigError",
    "StagingError",
    "StorageError",
    "WriteError",
    "WriterDiedError",
    "CheckpointTimeoutError",
    "StepExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "StateMismatchError",
    "RootBusyError",
    "UnsupportedStateError",
]


class AsyncCheckpointError(Exception):
    """Base class of every error raised by asyncckpt."""


class ConfigError(AsyncCheckpointError, ValueError):
    """An option or argument is invalid; raised before any work starts."""


class StagingError(AsyncCheckpointError, RuntimeError):
    """The snapshot could not be copied into host memory."""


class StorageError(AsyncCheckpointError, OSError):
    """A storage operation failed; the original error is the ``__cause__``."""


class WriteError(AsyncCheckpointError, RuntimeError):
    """A background save failed; re-raised on the trainer thread with the cause attached."""


class WriterDiedError(WriteError):
    """The background writer is gone (its process exited or its thread died)."""


class CheckpointTimeoutError(AsyncCheckpointError, TimeoutError):
    """A wait on a save did not finish in the given time."""


class RootBusyError(AsyncCheckpointError, RuntimeError):
    """Another live writer owns the checkpoint root; a root has one writer at a time."""


class UnsupportedStateError(AsyncCheckpointError, TypeError):
    """The state holds something that cannot be checkpointed (the message names it)."""


class StepExistsError(AsyncCheckpointError, FileExistsError):
    """The step is already committed (or in flight); committed steps are never overwritten."""


class CheckpointNotFoundError(AsyncCheckpointError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CorruptCheckpointError(AsyncCheckpointError, ValueError):
    """A checkpoint failed validation: bad manifest, missing file, size or checksum mismatch."""


class StateMismatchError(AsyncCheckpointError, KeyError):
    """The checkpoint and the live state disagree on keys, shapes or dtypes.

    Raised by resume under the default strict loading; the message lists every difference.
    """

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""
