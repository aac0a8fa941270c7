"""Pure naming of everything under a checkpoint root. No I/O here."""

from __future__ import annotations

import re
import uuid

STEP_PREFIX = "step_"
STEP_DIGITS = 9
TMP_DIR = ".tmp"
SNAPSHOT_DIR = "snapshots"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS},}})$")
_TMP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS},}})\.[0-9a-f]{{8,32}}$")


def step_dirname(step: int) -> str:
    """Directory name of a committed step, zero-padded so names sort like numbers."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def tmp_dirname(step: int) -> str:
    """A unique in-progress directory name for ``step`` (lives under ``TMP_DIR``)."""
    return f"{step_dirname(step)}.{uuid.uuid4().hex[:16]}"


def parse_step(name: str) -> int | None:
    """The step of a committed directory name, or None if ``name`` is not one."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is one of our in-progress directories (safe to sweep)."""
    return _TMP_RE.match(name) is not None


def shard_filename(rank: int, index: int) -> str:
    """DCP's own shard naming, so stock tooling recognises the files."""
    return f"__{rank}_{index}.distcp"


def join(root: str, *parts: str) -> str:
    """Join with '/', which both POSIX paths and fsspec URLs accept."""
    out = root.rstrip("/")
    for p in parts:
        out = f"{out}/{p}"
    return out
