"""Checks of one step's files against its manifest, without loading it.

:func:`file_problems` is the cheap check a load runs first (every file present, regular and
of the recorded size: one stat, or one HEAD, each); :func:`verify_files` is ``verify``'s full
check, which also reads every blob and its checksum and proves the blobs tile each shard.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from . import layout
from .blob import read_chunk_into
from .checksum import ALGORITHMS, checksum
from .chunkstore import PartSource, store_of
from .errors import CorruptCheckpointError
from .file_layout import BLOB_ALIGN
from .manifest import Chunk, Manifest
from .storage import RangedReads, Storage, probe_file

__all__ = ["shard_files", "file_problems", "verify_files", "PROBE_CONCURRENCY"]

PROBE_CONCURRENCY = 8  # an object store's files are probed this many at a time


def shard_files(manifest: Manifest) -> set[str]:
    """The files a load reads (``.metadata`` is written for stock DCP, never read by us)."""
    return {c.file for t in manifest.tensors.values() for c in t.chunks if c.parts is None}


def file_problems(
    storage: Storage, directory: str, manifest: Manifest, names: set[str] | None = None
) -> list[str]:
    """Cheap structural checks: each file (of ``names``, default all) is regular and sized right."""
    problems = []
    wanted = [(n, i) for n, i in manifest.files.items() if names is None or n in names]
    paths = [layout.join(directory, n) for n, _ in wanted]
    sizes = [i["size"] for _, i in wanted]
    if isinstance(storage, RangedReads) and len(paths) > 1:
        # one request each on an object store: asked all at once, they cost one round trip
        with ThreadPoolExecutor(min(PROBE_CONCURRENCY, len(paths))) as pool:
            stats = list(pool.map(lambda p: probe_file(storage, p), paths))
    else:
        stats = [probe_file(storage, p) for p in paths]
    for path, expected, st in zip(paths, sizes, stats):
        if st is None or st.kind != "file":
            problems.append(f"{path}: missing or not a regular file")
            continue
        size = st.size
        if size != expected:
            problems.append(f"{path}: size {size} != {expected} recorded in the manifest")
    return problems


def verify_files(storage: Storage, directory: str, manifest: Manifest, progress: Any = None) -> list[str]:
    """Full check: sizes, every blob's crc32, and that blobs tile each shard exactly."""
    problems = file_problems(storage, directory, manifest)
    if problems:
        return problems
    per_file: dict[str, list[tuple[Chunk, torch.dtype]]] = {}
    differential: list[tuple[str, Chunk, torch.dtype]] = []
    for fqn, t in manifest.tensors.items():
        for c in t.chunks:
            if c.parts is not None:
                differential.append((fqn, c, t.torch_dtype))
            else:
                per_file.setdefault(c.file, []).append((c, t.torch_dtype))
    parts = PartSource(storage, store_of(directory))
    for fqn, c, dtype in differential:  # every part read, decoded and checked
        try:
            read_chunk_into(parts, c, torch.empty(c.sizes, dtype=dtype), f"{directory} ({fqn})")
        except CorruptCheckpointError as e:
            problems.append(str(e))
        if progress is not None:
            progress(c.length)
    for name, info in manifest.files.items():
        path = layout.join(directory, name)
        chunks = sorted(per_file.get(name, []), key=lambda cd: cd[0].offset)
        algo = next((a for a in ALGORITHMS if a in info), None)
        if algo is not None:  # a small file with a whole-file checksum
            data = storage.read_bytes(path)
            if checksum(algo, data) != info[algo]:
                problems.append(f"{path}: checksum mismatch")
            continue
        pos = 0
        gaps = []
        for c, _ in chunks:
            # blobs follow each other, each on a 64-byte boundary (file_layout's zero padding)
            if not (c.offset == pos or (pos < c.offset < pos + BLOB_ALIGN and c.offset % BLOB_ALIGN == 0)):
                problems.append(f"{path}: bytes {pos}..{c.offset} are not covered by any tensor")
                break
            if c.offset > pos:
                gaps.append((pos, c.offset))
            pos = c.offset + c.length
        else:
            if pos != info["size"]:
                problems.append(f"{path}: bytes {pos}..{info['size']} are not covered by any tensor")
        with storage.open_read(path) as f:
            for lo, hi in gaps:  # no checksum covers the padding: it must be zeros
                f.seek(lo)
                if f.read(hi - lo) != bytes(hi - lo):
                    problems.append(f"{path}: padding bytes {lo}..{hi} are not zero; the file is damaged")
            for c, dtype in chunks:
                try:
                    read_chunk_into(f, c, torch.empty(c.sizes, dtype=dtype), path)
                except CorruptCheckpointError as e:
                    problems.append(str(e))
                if progress is not None:
                    progress(c.length)
    return problems
