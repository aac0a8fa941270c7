"""asyncckpt: take checkpointing off the critical path of PyTorch training.

The trainer hands a snapshot (copied into reused host memory) to a background writer that
streams a DCP checkpoint and commits it atomically; ``resume`` loads the newest complete one.
"""

from .catalog import list_checkpoints
from .checkpointer import AsyncCheckpointer
from .errors import (
    AsyncCheckpointError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    ConfigError,
    CorruptCheckpointError,
    RootBusyError,
    StagingError,
    StateMismatchError,
    StepExistsError,
    StorageError,
    UnsupportedStateError,
    WriteError,
    WriterDiedError,
)
from .handle import CheckpointInfo, SaveHandle
from .options import (
    ScheduleOptions,
    SelectOptions,
    SnapshotOptions,
    StagingOptions,
    StorageOptions,
    WriterOptions,
)
from .resume import resume

__all__ = [
    "AsyncCheckpointer",
    "ScheduleOptions",
    "SnapshotOptions",
    "SelectOptions",
    "StagingOptions",
    "WriterOptions",
    "StorageOptions",
    "SaveHandle",
    "CheckpointInfo",
    "list_checkpoints",
    "resume",
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

__version__ = "0.1.0"
