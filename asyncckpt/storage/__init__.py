"""Storage behind one small protocol, addressed by ``str`` paths.

Every stage that touches bytes at rest (writer, commit, upload, reader, catalog, pruner) talks
to a :class:`Storage`: ten methods, each documented below.  What only some backends can do is
an optional capability, a ``runtime_checkable`` protocol checked with ``isinstance``:

- :class:`AtomicRename`: POSIX; a step commits by renaming its finished temp directory.
  Without it (object stores), a step commits when its ``manifest.json`` is written last.
- :class:`BufferWrites`: a whole file from memory in one call: ``O_DIRECT`` on local
  disks that take it, parallel multipart parts on S3.
- :class:`BufferReads`: a byte range straight into memory: ``pread`` (``O_DIRECT`` when
  aligned) on local disks, one ranged GET copied in as it arrives on S3; a resume reads
  whole shard files straight into the staging slot, several pieces in flight.
- :class:`FileProbes`: S3; a question about one file is one HEAD, where ``stat`` of a
  missing key must also list its prefix.
- :class:`RangedReads`: object stores; loads issue concurrent ranged GETs.
- :class:`MultipartUploads`: S3; ``gc`` lists and aborts uploads killed writers left open.
- :class:`RootCheck`: fail at construction when a bucket is missing.

Backends: :class:`LocalStorage` (POSIX, fsync and atomic rename) and :class:`FsspecStorage`
(any fsspec URL: ``s3://``, ``memory://``, ...).  ``tests/test_storage_conformance.py`` runs
the same suite against both.
"""

from __future__ import annotations

from typing import Any

from .base import (
    AtomicRename,
    BufferReads,
    BufferWrites,
    DirectStreams,
    FileProbes,
    MultipartUploads,
    RangedReads,
    RootCheck,
    Stat,
    Storage,
    exists,
    is_file,
    probe_file,
    renames_atomically,
    retrying,
    write_fully,
    write_stream,
)
from .fsspec import FsspecStorage
from .local import LocalStorage, wrap_os_error
from .redact import redact

__all__ = [
    "Storage",
    "Stat",
    "AtomicRename",
    "BufferWrites",
    "DirectStreams",
    "BufferReads",
    "RangedReads",
    "FileProbes",
    "MultipartUploads",
    "RootCheck",
    "LocalStorage",
    "FsspecStorage",
    "storage_for",
    "retrying",
    "write_fully",
    "write_stream",
    "exists",
    "is_file",
    "probe_file",
    "renames_atomically",
    "wrap_os_error",
    "redact",
    "is_url",
]


def is_url(root: str) -> bool:
    """Whether ``root`` names an fsspec URL (``file://`` counts as a local path)."""
    return "://" in root and not root.startswith("file://")


def storage_for(
    root: str, storage_options: dict[str, Any] | None = None, *, direct_io: bool | None = None
) -> Storage:
    """The storage backend for ``root``: local paths, or any fsspec URL.

    ``direct_io`` (local disks): None probes once whether the filesystem takes ``O_DIRECT``;
    False never uses it; True requires it.
    """
    if is_url(root):
        return FsspecStorage(root, storage_options)
    return LocalStorage(direct_io=direct_io)
