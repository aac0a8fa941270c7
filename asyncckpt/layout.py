"""Every name under a checkpoint root, and nothing else: pure naming, no I/O.

```
ROOT/
  step_000001200/          a committed step: manifest.json (written last), .metadata, shards
    .uploaded              local-first tier: the remote copy is committed
  snapshots/step_.../      the rolling snapshot tier, same layout
  .tmp/step_....<id>/      a save in progress (or a step being deleted)
  .owners/<token>.json     the live writer's owner record, renewed while it runs
  .protected.d/step_...    steps retention never deletes (and the 0.1 list .protected.json)
  .abandoned.d/step_...    steps of a line of training that a rollback abandoned
  rank00003/               several ranks with a local-first tier: one rank's pieces
  .chunks/                 differential checkpoints: the parts steps reference (chunkstore.py)
  snapshots/.chunks/       ... and those of the snapshot tier
```
"""

from __future__ import annotations

import enum
import re
import uuid

STEP_PREFIX = "step_"
STEP_DIGITS = 9
TMP_DIR = ".tmp"
SNAPSHOT_DIR = "snapshots"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
UPLOADED_MARKER = ".uploaded"
PROTECTED_FILE = ".protected.json"
DONE_SUFFIX = ".done.json"
OWNERS_DIR = ".owners"  # one record per live writer (ownership.py)
WRITER_MARKER = ".writer"  # object stores: the owner token of a step prefix being written
ABANDONED_DIR = ".abandoned.d"  # one marker per step of a line that a rollback abandoned
PROTECTED_DIR = ".protected.d"  # one marker per protected step
CHUNKS_DIR = ".chunks"  # differential checkpoints: one object per stored part (chunkstore.py)

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS},}})$")
_TMP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS},}})\.[0-9a-f]{{8,32}}$")


class Kind(str, enum.Enum):
    """Which tier of a root a checkpoint belongs to.

    ``PERMANENT`` checkpoints are subject to retention policies; ``SNAPSHOT`` ones rotate
    through a few slots under ``snapshots/``.  Compares equal to its string value.
    """

    PERMANENT = "permanent"
    SNAPSHOT = "snapshot"

    def __str__(self) -> str:
        return self.value


KINDS = (Kind.PERMANENT, Kind.SNAPSHOT)


def join(root: str, *parts: str) -> str:
    """Join with '/', which both POSIX paths and fsspec URLs accept."""
    out = root.rstrip("/")
    for p in parts:
        out = f"{out}/{p}"
    return out


def parent(path: str) -> tuple[str, str]:
    """(directory, last name) of a path or URL."""
    head, _, name = path.rstrip("/").rpartition("/")
    return head, name


def kind_root(root: str, kind: Kind | str) -> str:
    """The directory that holds the step directories of ``kind``."""
    return root if Kind(kind) is Kind.PERMANENT else join(root, SNAPSHOT_DIR)


def chunk_store(kind_root_path: str) -> str:
    """Where the parts of the differential steps under a kind root are stored."""
    return join(kind_root_path, CHUNKS_DIR)


def step_dirname(step: int) -> str:
    """Directory name of a committed step, zero-padded so names sort like numbers."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def step_dir(root: str, kind: Kind | str, step: int) -> str:
    """Where step ``step`` of ``kind`` is committed."""
    return join(kind_root(root, kind), step_dirname(step))


def tmp_dir(base: str) -> str:
    """The in-progress area under ``base`` (a kind root)."""
    return join(base, TMP_DIR)


def tmp_dirname(step: int, owner: str | None = None, shared: bool = False) -> str:
    """An in-progress directory name for ``step``, carrying its owner's token (16 hex).

    Unique per call (the token plus 16 random hex digits), unless ``shared``: ranks that
    write one step together name it by the token they agreed on.
    """
    owner = owner or uuid.uuid4().hex[:16]
    return (
        f"{step_dirname(step)}.{owner}" if shared else f"{step_dirname(step)}.{owner}{uuid.uuid4().hex[:16]}"
    )


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


def done_record(rank: int) -> str:
    """File name of rank ``rank``'s done record in a step shared by several ranks."""
    return f"__{rank}{DONE_SUFFIX}"


def rank_dir(rank: int) -> str:
    """Sub-directory of a local-first tier that holds one rank's pieces."""
    return f"rank{rank:05d}"
