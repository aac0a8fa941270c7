"""Export a committed checkpoint's tensors to safetensors, one output shard at a time.

The tensors are read straight from the shard files with the manifest's chunk table (nothing is
unpickled, every blob is crc-checked as it is read) and written either as one
``model.safetensors`` or, past ``max_shard_size``, as a Hugging Face sharded set
(``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``).  Only the tensors
of the output shard being written are in memory at once.

Every file is written under a temporary name and renamed into place; the index of a sharded set
is written last, so an interrupted export never looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from . import layout
from .blob import read_chunk_into
from .chunkstore import PartSource, store_of
from .errors import ConfigError, CorruptCheckpointError
from .manifest import Manifest, TensorEntry
from .step_files import file_problems
from .storage import Storage

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "DTYPES",
    "DEFAULT_MAX_SHARD_SIZE",
    "ExportItem",
    "ExportPlan",
    "ExportResult",
    "parse_size",
    "plan_export",
    "read_tensor",
    "export_safetensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Hugging Face's default "5GB"
_SHARD_RE = re.compile(r"^model-\d{5,}-of-\d{5,}\.safetensors$")

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes in ``"5GB"`` (10**9, as Hugging Face counts), ``"500MiB"`` (2**20) or ``"1000"``.

    Raises:
        ConfigError: the text is not a positive size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"invalid size {text!r}: it must be at least 1 byte")
    return size


def _safetensors_dtypes() -> set[torch.dtype] | None:
    """The dtypes safetensors can store, or None if this version does not say."""
    try:
        import safetensors.torch as st
    except ImportError as e:  # a declared dependency, but say how to fix it
        raise ConfigError("export needs the safetensors package: pip install safetensors") from e
    types = getattr(st, "_TYPES", None)
    return set(types.values()) if isinstance(types, dict) else None


@dataclass(frozen=True)
class ExportItem:
    """One tensor to export: its checkpoint fqn, output name and output dtype."""

    fqn: str
    name: str
    entry: TensorEntry
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.entry.shape) * self.dtype.itemsize

    @property
    def read_bytes(self) -> int:
        return sum(c.nbytes for c in self.entry.chunks)


@dataclass
class ExportPlan:
    """The tensors to write, grouped into output files in order."""

    shards: list[list[ExportItem]]

    @property
    def items(self) -> list[ExportItem]:
        return [it for shard in self.shards for it in shard]

    @property
    def total_bytes(self) -> int:
        return sum(it.nbytes for it in self.items)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def filenames(self) -> list[str]:
        n = len(self.shards)
        if n <= 1:
            return [SINGLE_FILE]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


@dataclass
class ExportResult:
    """What an export wrote."""

    files: list[str]
    index: str | None
    tensors: int
    total_bytes: int
    removed: list[str] = field(default_factory=list)


def plan_export(
    manifest: Manifest,
    *,
    only: Sequence[str] = (),
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> ExportPlan:
    """Choose, rename and group the tensors to export; reads nothing.

    Args:
        manifest: the checkpoint's validated manifest.
        only: keep tensors whose fqn starts with one of these prefixes (empty keeps all).
        strip_prefix: remove this prefix from output names.  None (the default) strips the
            single ``only`` prefix when there is exactly one and it ends with ``"."``; ``""``
            strips nothing.
        dtype: cast floating-point tensors to this dtype (others keep theirs).
        max_shard_size: bytes per output file before the export is sharded.

    Raises:
        ConfigError: nothing matches, names collide, or a dtype cannot be stored.
    """
    if max_shard_size < 1:
        raise ConfigError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
    prefixes = list(only)
    if strip_prefix is None:
        strip_prefix = prefixes[0] if len(prefixes) == 1 and prefixes[0].endswith(".") else ""
    fqns = [f for f in manifest.tensors if not prefixes or any(f.startswith(p) for p in prefixes)]
    if not fqns:
        tops = sorted({f.split(".", 1)[0] + ("." if "." in f else "") for f in manifest.tensors})
        raise ConfigError(
            f"no tensor matches --only {' '.join(prefixes)}; the checkpoint's top-level prefixes are "
            f"{', '.join(tops) or '(none)'}"
        )
    supported = _safetensors_dtypes()
    items: list[ExportItem] = []
    names: dict[str, str] = {}
    for fqn in fqns:
        entry = manifest.tensors[fqn]
        name = fqn[len(strip_prefix) :] if strip_prefix and fqn.startswith(strip_prefix) else fqn
        if not name:
            raise ConfigError(f"stripping {strip_prefix!r} from {fqn!r} leaves an empty name")
        if name in names:
            raise ConfigError(
                f"{names[name]!r} and {fqn!r} both export as {name!r}; choose another --strip-prefix"
            )
        names[name] = fqn
        out_dtype = entry.torch_dtype
        if dtype is not None and out_dtype.is_floating_point:
            out_dtype = dtype
        if supported is not None and out_dtype not in supported:
            raise ConfigError(
                f"tensor {fqn!r} has dtype {entry.dtype}, which safetensors cannot store; "
                "leave it out with --only"
            )
        items.append(ExportItem(fqn, name, entry, out_dtype))
    shards: list[list[ExportItem]] = [[]]
    size = 0
    if sum(it.nbytes for it in items) > max_shard_size:
        for it in items:  # greedy, in checkpoint order, like transformers' save_pretrained
            if shards[-1] and size + it.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(it)
            size += it.nbytes
    else:
        shards[0] = items
    return ExportPlan(shards)


def read_tensor(
    open_file: Callable[[str], BinaryIO], fqn: str, entry: TensorEntry, where: str
) -> torch.Tensor:
    """A fresh CPU tensor holding ``fqn``, assembled from all of its stored chunks.

    Args:
        open_file: returns an open binary file for a shard name of the step.
        fqn: the tensor's name (for messages).
        entry: its manifest entry.
        where: the step directory (for messages).

    Raises:
        CorruptCheckpointError: a checksum fails, a file is short, or the chunks leave part of
            the tensor unwritten.
    """
    dtype, shape, chunks = entry.torch_dtype, entry.shape, entry.chunks
    out = torch.empty(shape, dtype=dtype)
    if len(chunks) == 1 and chunks[0].sizes == shape:  # the common single-rank case: no copy
        c = chunks[0]
        read_chunk_into(open_file(c.file), c, out, f"{layout.join(where, c.file)} ({fqn})")
        return out
    covered = torch.zeros(shape, dtype=torch.bool)
    for c in sorted(chunks, key=lambda c: (c.file, c.offset)):
        piece = torch.empty(c.sizes, dtype=dtype)
        read_chunk_into(open_file(c.file), c, piece, f"{layout.join(where, c.file)} ({fqn})")
        dst, mask = out, covered
        for dim, (off, size) in enumerate(zip(c.offsets, c.sizes)):
            dst, mask = dst.narrow(dim, off, size), mask.narrow(dim, off, size)
        dst.copy_(piece)
        mask.fill_(True)
    if not bool(covered.all()):
        missing = int((~covered).sum())
        raise CorruptCheckpointError(
            f"{where}: the stored chunks of {fqn} leave {missing} of {covered.numel()} elements "
            "unwritten; the checkpoint is incomplete"
        )
    return out


def _existing_exports(out_dir: str) -> list[str]:
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(n))


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _write_atomic(out_dir: str, name: str, write: Callable[[str], None]) -> str:
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.partial")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; exports are meant to be shared
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return final


def _read_shard(
    storage: Storage, step_dir: str, items: list[ExportItem], progress: Callable[[int], None] | None
) -> dict[str, torch.Tensor]:
    """The tensors of one output file, by output name, in plan order, cast as planned."""
    tensors: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        open_file = chunk_opener(storage, step_dir, stack)

        def first_chunk(it: ExportItem) -> tuple[str, int]:
            return min(((c.file, c.offset) for c in it.entry.chunks), default=("", 0))

        for it in sorted(items, key=first_chunk):  # each shard file is read front to back
            t = read_tensor(open_file, it.fqn, it.entry, step_dir)
            tensors[it.name] = t if t.dtype == it.dtype else t.to(it.dtype)
            del t
            if progress is not None:
                progress(it.read_bytes)
    return {it.name: tensors[it.name] for it in items}


def check_exportable(step_dir: str, manifest: Manifest, out_dir: str) -> None:
    """ConfigError unless ``out_dir`` is local and the step is a whole checkpoint."""
    if "://" in out_dir:
        raise ConfigError(f"export writes to a local directory, got {out_dir!r}")
    if manifest.piece is not None:
        raise ConfigError(
            f"{step_dir} holds only rank {manifest.piece}'s shards of a {manifest.world_size}-rank "
            "checkpoint (one rank's part of a local-first tier); export the remote root's step"
        )


def chunk_opener(storage: Storage, step_dir: str, stack: contextlib.ExitStack) -> Callable[[str], Any]:
    """What :func:`read_tensor` opens a chunk's file with: each shard file once (closed with
    ``stack``), and for a differential chunk (no file) the chunk store."""
    handles: dict[str, Any] = {}

    def open_file(name: str) -> Any:
        if name not in handles:
            handles[name] = stack.enter_context(
                PartSource(storage, store_of(step_dir))
                if not name
                else storage.open_read(layout.join(step_dir, name))
            )
        return handles[name]

    return open_file


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def export_safetensors(
    storage: Storage,
    step_dir: str,
    manifest: Manifest,
    out_dir: str,
    *,
    only: Sequence[str] = (),
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_file: Callable[[str, int, int], None] | None = None,
) -> ExportResult:
    """Write the checkpoint's tensors to ``out_dir`` as safetensors, one output file at a time.

    Args:
        storage: the checkpoint's storage backend.
        step_dir: the committed step directory.
        manifest: its validated manifest.
        out_dir: a local directory (created if needed).
        only, strip_prefix, dtype, max_shard_size: as in :func:`plan_export`.
        overwrite: replace an earlier export in ``out_dir`` (its stale shard files are removed).
        progress: called with the number of checkpoint bytes read, as they are read.
        on_file: called with (path, tensor count, bytes) after each file is written.

    Raises:
        ConfigError: a bad option, or ``out_dir`` already holds an export and not ``overwrite``.
        CorruptCheckpointError: a shard is missing, short or fails its checksum.
    """
    check_exportable(step_dir, manifest, out_dir)
    plan = plan_export(
        manifest, only=only, strip_prefix=strip_prefix, dtype=dtype, max_shard_size=max_shard_size
    )
    needed = {c.file for it in plan.items for c in it.entry.chunks}
    problems = file_problems(storage, step_dir, manifest, needed)
    if problems:
        raise CorruptCheckpointError("; ".join(problems))
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output directory {out_dir} exists and is not a directory")
    old = _existing_exports(out_dir)
    if old and not overwrite:
        raise ConfigError(f"{out_dir} already holds an export ({', '.join(old)}); pass --force to replace it")
    os.makedirs(out_dir, exist_ok=True)
    filenames = plan.filenames()
    written: list[str] = []
    weight_map: dict[str, str] = {}
    for items, fname in zip(plan.shards, filenames):
        tensors = _read_shard(storage, step_dir, items, progress)
        path = _write_atomic(out_dir, fname, functools.partial(_save, tensors))
        del tensors  # bounded memory: one output shard at a time
        written.append(path)
        weight_map.update({it.name: fname for it in items})
        if on_file is not None:
            on_file(path, len(items), sum(it.nbytes for it in items))
    index = None
    if plan.sharded:
        doc = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        data = json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"

        def write_index(p: str) -> None:
            with open(p, "wb") as f:
                f.write(data)

        index = _write_atomic(out_dir, INDEX_FILE, write_index)  # last: the set is complete
    keep = set(filenames) | ({INDEX_FILE} if plan.sharded else set())
    removed = []
    for name in old:
        if name not in keep:
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    return ExportResult(written, index, len(plan.items), plan.total_bytes, removed)
