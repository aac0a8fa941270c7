"""The commit protocol: a step becomes visible all at once, with the manifest written last.

POSIX (``AtomicRename``): shards are written into ``.tmp/<step>.<id>`` and fsynced, then
``.metadata`` and ``manifest.json``; the temp directory is fsynced, renamed to its final
name, and the root fsynced.  A crash before the rename leaves only a temp directory, which
is never read.

Object stores: everything goes under the step's own prefix and ``manifest.json`` goes last,
after every other upload was confirmed.  A crash before it leaves a prefix without a
manifest, which readers ignore.

Several ranks: each writes its shards and then a *done record* (its part of the manifest,
written atomically, tagged with the run id the ranks agreed on); rank 0 waits for every
record and writes the joined manifest.  The local-first uploader reuses the same records to
join the ranks' pieces on the remote root.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from . import layout
from .blob import TensorSlot, dcp_metadata
from .checksum import DEFAULT
from .chunkstore import PartWriter, referenced
from .compressed import Compressor
from .errors import CheckpointTimeoutError, StepExistsError
from .file_layout import FileImage
from .handle import CheckpointInfo
from .manifest import Chunk, Manifest, TensorEntry, dtype_name
from .request import SaveOutcome, SaveRequest
from .storage import AtomicRename, Storage, is_file, renames_atomically
from .writer import write_shards, write_small

__all__ = [
    "WriteAborted",
    "write_and_commit",
    "write_manifest",
    "write_done_record",
    "gather_done_records",
    "await_manifest",
]

log = logging.getLogger("asyncckpt")


class WriteAborted(RuntimeError):
    """The writer was told to stop (its trainer died) before this step was committed."""


def _check_abort(should_abort: Callable[[], bool] | None, step: int) -> None:
    if should_abort is not None and should_abort():
        raise WriteAborted(f"save of step {step} aborted before commit: the trainer is gone")


def write_and_commit(
    storage: Storage,
    req: SaveRequest,
    entries: Sequence[TensorSlot],
    files: Sequence[FileImage],
    buffer: torch.Tensor,
    pool: ThreadPoolExecutor | None,
    on_shards_written: Callable[[], None] | None = None,
    should_abort: Callable[[], bool] | None = None,
    pace: Callable[[int], None] | None = None,
    compressor: Compressor | None = None,
    parts: PartWriter | None = None,
    ready: Callable[[int], None] | None = None,
) -> SaveOutcome:
    """Write ``req``'s shards from the slot (``files`` laid out in ``buffer``, tensors at
    ``entries``) and commit the step.

    ``on_shards_written`` runs once the slot's bytes are durable (the slot may be reused);
    ``should_abort`` is polled between phases (a writer process whose trainer died);
    ``pace`` caps the bandwidth of shard writes; ``compressor`` writes compressed shards;
    ``parts`` writes a differential step instead (its parts in the kind root's chunk store);
    ``ready(n)`` blocks until slot bytes ``[0, n)`` are final (the copy may still be running).
    """
    t0 = time.perf_counter()
    final = layout.join(req.root, layout.step_dirname(req.step))
    # several ranks with a local-first tier: each rank commits its own shards as a piece in
    # its own local root; the uploader joins the pieces on the remote root (upload.py)
    piece = req.world_size > 1 and req.remote is not None
    several = req.world_size > 1 and not piece
    own_bytes = 0
    if renames_atomically(storage):
        # ranks share one temp directory per step, named by the run id they agreed on
        name = layout.tmp_dirname(req.step, req.run_id, shared=several)
        tmp = layout.join(layout.tmp_dir(req.root), name)
    else:
        tmp = final
        if is_file(storage, layout.join(final, layout.MANIFEST)):
            raise StepExistsError(f"step {req.step} is already committed at {final}")
    storage.makedirs(tmp)
    if not isinstance(storage, AtomicRename) and req.rank == 0:
        # the prefix is the step's final name: say whose it is, so gc leaves it alone
        write_small(storage, layout.join(tmp, layout.WRITER_MARKER), req.run_id.encode())
    step_parts: dict[str, Any] = {}
    new_bytes = 0
    try:
        if parts is not None:
            tensors_in = [(e.fqn, e.dtype, e.shape, e.offset, e.nbytes) for e in entries]
            chunks, step_parts, new_bytes = parts.write(
                storage, req.root, tensors_in, buffer, req.run_id, req.step, req.epoch, DEFAULT, pace, ready
            )
            written: dict[str, dict[str, int]] = {}
        else:
            chunks, written = write_shards(
                storage,
                tmp,
                files,
                entries,
                buffer,
                req.rank,
                pool,
                pace=pace,
                compressor=compressor,
                ready=ready,
            )
        if on_shards_written is not None:
            on_shards_written()  # the staging slot may be reused from here on
        _check_abort(should_abort, req.step)
        t_written = time.perf_counter()
        for e in entries:
            if e.fqn in req.chunk_offsets:
                chunks[e.fqn].offsets = list(req.chunk_offsets[e.fqn])
        tensors = {
            e.fqn: TensorEntry(
                dtype=dtype_name(e.dtype),
                shape=list(req.global_shapes.get(e.fqn, e.shape)),
                chunks=[chunks[e.fqn]],
            )
            for e in entries
        }
        if several:
            write_done_record(storage, tmp, req.rank, tensors, written, req.run_id)
            if req.rank != 0:
                out = _await_commit(storage, req, final, t0, t_written, written, should_abort)
                if parts is not None:
                    parts.committed(req.root, step_parts)  # rank 0 committed them: the next parent
                return out
            own_bytes = sum(f["size"] for f in written.values())
            tensors, written = gather_done_records(
                storage, tmp, req.step, req.world_size, req.commit_timeout, should_abort, req.run_id
            )
        manifest = Manifest(
            step=req.step,
            world_size=req.world_size,
            created_at=time.time(),
            tensors=tensors,
            files=written,
            state={} if piece else req.tree,  # a piece's tree may name other ranks' tensors
            metrics=req.metrics,
            library_version=req.library_version,
            torch_version=torch.__version__,
            remote=req.remote,
            piece=req.rank if piece else None,
            selection=req.selection,
        )
        write_manifest(storage, tmp, manifest, req.paths, should_abort)
        if not isinstance(storage, AtomicRename) and req.rank == 0:
            _drop_writer_marker(storage, tmp)
        if isinstance(storage, AtomicRename):
            storage.sync_dir(tmp)
            _check_abort(should_abort, req.step)
            storage.rename_dir(tmp, final)
            try:
                storage.sync_dir(req.root)
            except OSError as e:  # the step is committed (visible); only its rename's durability is in doubt
                log.warning("asyncckpt: step %d committed, but fsync of %s failed: %s", req.step, req.root, e)
    except BaseException:
        if not several or req.rank == 0:  # a shared step directory is only ever removed by rank 0
            try:
                storage.remove(tmp)
            except Exception:  # the original error matters more; the sweep at start retries
                pass
        raise
    t1 = time.perf_counter()
    if parts is not None:
        parts.committed(req.root, step_parts)  # the next save's parent
    info = CheckpointInfo.from_manifest(manifest, final, req.kind)
    return SaveOutcome(
        info=info,
        # this rank's own bytes (rank 0 of several ranks commits, but wrote only its shards)
        bytes_written=new_bytes + (own_bytes if several else manifest.total_bytes),
        write_seconds=t1 - t0,
        commit_seconds=t1 - t_written,
        objects=frozenset(referenced(manifest)),  # every rank's parts: the pruner holds them
    )


def _drop_writer_marker(storage: Storage, directory: str) -> None:
    try:  # committed: the marker has done its job (left behind, it is harmless)
        storage.remove(layout.join(directory, layout.WRITER_MARKER))
    except OSError as e:
        log.warning("asyncckpt: could not remove %s: %s", layout.join(directory, layout.WRITER_MARKER), e)


def write_manifest(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    paths: dict[str, tuple[str | int, ...]],
    should_abort: Callable[[], bool] | None = None,
) -> None:
    """DCP's ``.metadata`` (added to the manifest's files), then ``manifest.json``: the commit
    point on an object store, the last file before the rename on POSIX.  A compressed step
    (or differential) step gets no ``.metadata``: stock DCP cannot read its shards, and a
    missing ``.metadata`` says so at once rather than failing inside ``torch.load``."""
    if not any(c.codec or c.parts is not None for t in manifest.tensors.values() for c in t.chunks):
        meta = pickle.dumps(dcp_metadata(manifest.tensors, paths))
        manifest.files[layout.DCP_METADATA] = write_small(
            storage, layout.join(directory, layout.DCP_METADATA), meta
        )
    _check_abort(should_abort, manifest.step)
    write_small(storage, layout.join(directory, layout.MANIFEST), manifest.to_json())


def write_done_record(
    storage: Storage,
    directory: str,
    rank: int,
    tensors: dict[str, TensorEntry],
    files: dict[str, dict[str, int]],
    run_id: str = "",
) -> None:
    """This rank's part of the manifest; written last by the rank, atomically.  ``run_id``
    (agreed by the ranks at construction) keeps a record left by an earlier, crashed run at
    the same step from being mistaken for this run's."""
    doc = {
        "rank": rank,
        "run_id": run_id,
        "files": files,
        "tensors": {
            k: {"dtype": t.dtype, "shape": t.shape, "chunks": [c.to_json() for c in t.chunks]}
            for k, t in tensors.items()
        },
    }
    path = layout.join(directory, layout.done_record(rank))
    data = json.dumps(doc).encode()
    if isinstance(storage, AtomicRename):  # readers must never see half a record
        write_small(storage, path + ".part", data)
        storage.rename_dir(path + ".part", path)
    else:
        write_small(storage, path, data)  # an object PUT is atomic


def _poll(cond: Callable[[], Any], timeout: float, should_abort: Callable[[], bool] | None, step: int) -> Any:
    """Call ``cond`` with backoff until it returns something truthy; None on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        got = cond()
        if got:
            return got
        _check_abort(should_abort, step)
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


def gather_done_records(
    storage: Storage,
    directory: str,
    step: int,
    world_size: int,
    timeout: float,
    should_abort: Callable[[], bool] | None = None,
    run_id: str = "",
) -> tuple[dict[str, TensorEntry], dict[str, dict[str, int]]]:
    """Coordinator: wait for every rank's done record of this run and merge them."""
    records: dict[int, dict[str, Any]] = {}

    def collect() -> bool:
        for r in range(world_size):
            if r in records:
                continue
            path = layout.join(directory, layout.done_record(r))
            if is_file(storage, path):
                try:
                    record = json.loads(storage.read_bytes(path))
                except (ValueError, OSError):
                    continue  # not fully visible yet
                if record.get("run_id", "") == run_id:  # else a crashed run's: wait for ours
                    records[r] = record
        return len(records) == world_size

    if not _poll(collect, timeout, should_abort, step):
        missing = sorted(set(range(world_size)) - set(records))
        raise CheckpointTimeoutError(
            f"step {step}: ranks {missing} did not finish writing within {timeout:g}s "
            "(crashed or stuck); the step is not committed. Check those ranks' logs, or raise "
            "commit_timeout for slow storage"
        )
    tensors: dict[str, TensorEntry] = {}
    files: dict[str, dict[str, int]] = {}
    for r in sorted(records):
        files.update(records[r]["files"])
        for fqn, t in records[r]["tensors"].items():
            entry = tensors.setdefault(fqn, TensorEntry(dtype=t["dtype"], shape=list(t["shape"]), chunks=[]))
            entry.chunks += [Chunk.from_json(c) for c in t["chunks"]]
    for entry in tensors.values():
        entry.chunks.sort(key=lambda c: c.offsets)
    return tensors, files


def _await_commit(
    storage: Storage,
    req: SaveRequest,
    final: str,
    t0: float,
    t_written: float,
    files: dict[str, dict[str, int]],
    should_abort: Callable[[], bool] | None,
) -> SaveOutcome:
    """A non-coordinating rank: its part is durable; wait for rank 0's manifest."""
    m = await_manifest(storage, final, req.step, req.commit_timeout, should_abort)
    t1 = time.perf_counter()
    info = CheckpointInfo.from_manifest(m, final, req.kind)
    mine = sum(f["size"] for f in files.values())
    return SaveOutcome(info=info, bytes_written=mine, write_seconds=t1 - t0, commit_seconds=t1 - t_written)


def await_manifest(
    storage: Storage, final: str, step: int, timeout: float, should_abort: Callable[[], bool] | None = None
) -> Manifest:
    """A rank other than 0: wait for rank 0's manifest of ``step`` at ``final``."""
    manifest_path = layout.join(final, layout.MANIFEST)
    if not _poll(lambda: is_file(storage, manifest_path), timeout, should_abort, step):
        raise CheckpointTimeoutError(
            f"step {step}: rank 0 did not commit within {timeout:g}s (crashed or "
            "stuck); this rank's shards are written but the step is not committed"
        )
    return Manifest.from_json(storage.read_bytes(manifest_path), manifest_path)
