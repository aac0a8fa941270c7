"""asyncckpt: take checkpointing off the critical path of PyTorch training.

The trainer hands a snapshot (copied into reused host memory) to a background writer that
streams a DCP checkpoint and commits it atomically; ``resume`` loads the newest complete one.

Public names are imported on first use (PEP 562), so ``import asyncckpt`` and the ``asyncckpt``
command stay fast and import torch only when something that needs it is touched.
"""

import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing

if _typing.TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
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

# where each public name lives; it is imported from there on first access
_MODULES: dict[str, list[str]] = {
    "checkpointer": ["AsyncCheckpointer"],
    "options": ["ScheduleOptions", "SnapshotOptions", "SelectOptions", "StagingOptions", "WriterOptions",
                "StorageOptions"],
    "handle": ["SaveHandle", "CheckpointInfo"],
    "catalog": ["list_checkpoints"],
    "resume": ["resume"],
    "errors": [n for n in __all__ if n.endswith("Error")],
}  # fmt: skip
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> _typing.Any:
    """Imports a public name's module on first access and caches the name here."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'asyncckpt' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """Keeps ``asyncckpt.resume`` the function.

    Importing the submodule ``asyncckpt.resume`` (as the checkpointer does) makes the import
    system set the package attribute ``resume`` to that module, which would shadow the lazy
    function; an eager ``from .resume import resume`` used to undo it by running last.
    """

    def __setattr__(self, name: str, value: _typing.Any) -> None:
        if isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _HOME:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
