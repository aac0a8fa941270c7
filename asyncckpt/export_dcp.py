"""Export a committed step as a plain DCP checkpoint that stock ``dcp.load`` reads.

Compressed and differential steps are asyncckpt's own format; this writes the same bytes a
plain save would have written: one ``__0_0.distcp`` of ``torch.save`` blobs (the tensors'
raw bytes between a prefix and a suffix built from one real ``torch.save`` per dtype and
shape) and the ``.metadata`` pickle with the planner paths of the saved state, so
``dcp.load({"model": model.state_dict(), ...}, checkpoint_id=OUT)`` works as on any DCP
checkpoint.  Tensors are read (checksums checked) and written one at a time, so memory holds
one tensor, never the checkpoint.  The shard is written under a temporary name; ``.metadata``
goes last, so an interrupted export is never loadable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import layout
from .blob import blob_template, dcp_metadata
from .errors import ConfigError, CorruptCheckpointError
from .manifest import Chunk, Manifest, TensorEntry
from .step_files import file_problems, shard_files
from .storage import Storage

__all__ = ["DcpExport", "export_dcp", "planner_paths"]

SHARD = layout.shard_filename(0, 0)


@dataclass
class DcpExport:
    """What :func:`export_dcp` wrote."""

    directory: str
    tensors: int
    total_bytes: int


def planner_paths(tree: dict[str, Any]) -> dict[str, tuple[str | int, ...]]:
    """Each tensor's path in the saved state (``("model", "layer", 0, "weight")``), from the
    manifest's tree: what DCP's planner records, so stock loads find every tensor."""
    out: dict[str, tuple[str | int, ...]] = {}

    def walk(node: dict[str, Any], path: tuple[str | int, ...]) -> None:
        kind = node["t"]
        if kind in ("tensor", "ndarray"):
            out[node["fqn"]] = path
        elif kind == "object":
            walk(node["sd"], path)
        elif kind == "dict":
            for k, child in node["items"]:
                walk(child, (*path, k))
        elif kind in ("list", "tuple"):
            for i, child in enumerate(node["items"]):
                walk(child, (*path, i))

    for key, node in tree.items():
        walk(node, (key,))
    return out


def export_dcp(
    storage: Storage,
    step_dir: str,
    manifest: Manifest,
    out_dir: str,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> DcpExport:
    """Write step ``step_dir`` (its validated ``manifest``) to local ``out_dir`` as plain DCP.

    Raises:
        ConfigError: ``out_dir`` is remote, is a piece of a local-first tier, or already holds
            a checkpoint and not ``overwrite``.
        CorruptCheckpointError: a shard or part is missing, short or fails its checksum.
    """
    from .export import check_exportable, chunk_opener, read_tensor

    check_exportable(step_dir, manifest, out_dir)
    problems = file_problems(storage, step_dir, manifest, shard_files(manifest))
    if problems:
        raise CorruptCheckpointError("; ".join(problems))
    out_dir = os.path.abspath(out_dir)
    meta_path, shard_path = os.path.join(out_dir, layout.DCP_METADATA), os.path.join(out_dir, SHARD)
    if os.path.exists(meta_path) and not overwrite:
        raise ConfigError(f"{out_dir} already holds a DCP checkpoint; pass --force to replace it")
    os.makedirs(out_dir, exist_ok=True)
    tmp = shard_path + ".partial"
    entries: dict[str, TensorEntry] = {}
    total = 0
    try:
        with contextlib.ExitStack() as stack:
            open_file = chunk_opener(storage, step_dir, stack)

            with open(tmp, "wb") as f:
                pos = 0
                for fqn, entry in manifest.tensors.items():
                    t = read_tensor(open_file, fqn, entry, step_dir)
                    tpl = blob_template(t)
                    f.write(tpl.prefix)
                    if t.numel():  # the tensor's own memory (read_tensor's result is contiguous)
                        f.write((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr()))
                    f.write(tpl.suffix)
                    length = len(tpl.prefix) + t.numel() * t.element_size() + len(tpl.suffix)
                    entries[fqn] = TensorEntry(
                        dtype=entry.dtype, shape=list(entry.shape),
                        chunks=[Chunk([0] * t.dim(), list(t.shape), SHARD, pos, length,
                                      pos + len(tpl.prefix), t.numel() * t.element_size(), 0)],
                    )  # fmt: skip
                    pos += length
                    total += t.numel() * t.element_size()
                    if progress is not None:
                        progress(t.numel() * t.element_size())
                    del t
                f.flush()
                os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.remove(meta_path)  # an older export stops being loadable before its shard changes
        os.replace(tmp, shard_path)
        meta = pickle.dumps(dcp_metadata(entries, planner_paths(manifest.state)))
        with open(meta_path + ".partial", "wb") as f:
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_path + ".partial", meta_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return DcpExport(out_dir, len(entries), total)
