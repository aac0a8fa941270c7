"""The 0.1 flat keywords of :class:`~asyncckpt.AsyncCheckpointer`, folded into the option
groups of ``options.py`` with a ``DeprecationWarning`` naming the new spelling (removed in 0.3)."""

from __future__ import annotations

import warnings
from typing import Any

from .errors import ConfigError
from .options import (
    ScheduleOptions,
    SelectOptions,
    SnapshotOptions,
    StagingOptions,
    StorageOptions,
    WriterOptions,
)
from .policy import Never

__all__ = ["from_legacy"]

# old keyword -> (group, field in the group); mode and save_dtype are handled apart
_LEGACY: dict[str, tuple[str, str]] = {
    "save_policy": ("schedule", "policy"),
    "total_steps": ("schedule", "total_steps"),
    "save_final": ("schedule", "final"),
    "save_on_signal": ("schedule", "on_signal"),
    "trigger_file": ("schedule", "trigger_file"),
    "snapshot_every": ("snapshots", "every"),
    "snapshot_slots": ("snapshots", "slots"),
    "include": ("select", "include"),
    "exclude": ("select", "exclude"),
    "model_only": ("select", "model_only"),
    "save_dtype": ("select", "dtype"),
    "max_inflight": ("staging", "max_inflight"),
    "on_busy": ("staging", "on_busy"),
    "overlap": ("staging", "overlap"),
    "executor": ("writer", "executor"),
    "write_threads": ("writer", "threads"),
    "restart": ("writer", "restart"),
    "commit_timeout": ("writer", "commit_timeout"),
    "storage_options": ("storage", "fsspec"),
    "local_dir": ("storage", "local_dir"),
}
_GROUPS: dict[str, type] = {
    "schedule": ScheduleOptions,
    "snapshots": SnapshotOptions,
    "select": SelectOptions,
    "staging": StagingOptions,
    "writer": WriterOptions,
    "storage": StorageOptions,
}


def from_legacy(groups: dict[str, Any], legacy: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Fold the 0.1 flat keywords into the option groups, warning once per call.

    Returns the groups (``groups`` updated) and whether the checkpointer is enabled
    (``mode="disabled"``).  A keyword given both ways, or an unknown one, is a ConfigError.
    """
    enabled = True
    unknown = sorted(set(legacy) - set(_LEGACY) - {"mode"})
    if unknown:
        raise TypeError(f"AsyncCheckpointer() got unexpected keyword argument(s) {unknown}")
    if groups.get("storage") is not None and not isinstance(groups["storage"], StorageOptions):
        legacy = {**legacy, "_backend": groups.pop("storage")}  # 0.1: storage= took a backend
    if not legacy:
        return groups, enabled
    fields: dict[str, dict[str, Any]] = {}
    given: dict[str, list[str]] = {}  # group -> the 0.1 keywords that filled it
    hints = []
    for key, value in legacy.items():
        if key == "mode":
            if value not in (None, "disabled", "final_only"):
                raise ConfigError(f"mode must be None, 'disabled' or 'final_only', got {value!r}")
            if value == "disabled":
                enabled = False
                hints.append("mode='disabled' -> enabled=False")
            elif value == "final_only":
                hints.append("mode='final_only' -> schedule=ScheduleOptions(policy=Never())")
            continue
        if key == "_backend":
            fields.setdefault("storage", {})["backend"] = value
            hints.append("storage=<backend> -> storage=StorageOptions(backend=...)")
            continue
        group, name = _LEGACY[key]
        if value is None and name in ("every",):
            continue  # snapshot_every=None: no snapshots
        fields.setdefault(group, {})[name] = value
        given.setdefault(group, []).append(key)
        hints.append(f"{key}= -> {group}={_GROUPS[group].__name__}({name}=...)")
    if legacy.get("mode") == "final_only":  # as in 0.1, it wins over save_policy=
        fields.setdefault("schedule", {})["policy"] = Never()
        given.setdefault("schedule", []).append("mode")
    for group, values in fields.items():
        if groups.get(group) is not None:
            raise ConfigError(
                f"{', '.join(sorted(values))} given both as a 0.1 keyword and in {group}=; use {group}= only"
            )
        if group == "snapshots" and "every" not in values:
            try:  # validated, though without every= there are no snapshots
                SnapshotOptions(every=1, **values)
            except ConfigError as e:
                raise ConfigError(f"{e} (given as the 0.1 keyword(s) {', '.join(given[group])})") from None
            continue
        try:
            groups[group] = _GROUPS[group](**values)
        except ConfigError as e:
            raise ConfigError(
                f"{e} (given as the 0.1 keyword(s) {', '.join(given.get(group, []))})"
            ) from None
    warnings.warn(
        "AsyncCheckpointer: the flat keywords are deprecated and will be removed in 0.3; "
        "use the option groups: " + "; ".join(hints),
        DeprecationWarning,
        stacklevel=3,
    )
    return groups, enabled
