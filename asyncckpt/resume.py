"""Find committed checkpoints and load the newest valid one in place."""

from __future__ import annotations

import errno
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from . import distributed, layout, load_plan
from .catalog import normalize_root, read_abandoned, read_manifest, step_dirs
from .chunkstore import parts_of, store_of
from .errors import CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError, StorageError
from .file_layout import PAGE, round_up
from .layout import Kind
from .manifest import Manifest
from .progress import Progress
from .reader import ManifestReader
from .state import flatten_state, tensor_fqns
from .step_files import file_problems, shard_files
from .storage import LocalStorage, Storage, storage_for, wrap_os_error

__all__ = ["resume", "resume_in", "load_checkpoint"]

log = logging.getLogger("asyncckpt")

PROGRESS_MIN_BYTES = 256 << 20  # loads smaller than this finish too fast for a bar


def load_checkpoint(
    storage: Storage,
    step_dir: str,
    manifest: Manifest,
    state: dict[str, Any],
    *,
    strict: bool = True,
    exclude: Sequence[str] = (),
    allow_missing: bool = False,
    cast: bool = False,
    require: Sequence[str] = (),
    pool: Mapping[str, torch.Tensor] | None = None,
    region: tuple[int, int] | None = None,
    paths: dict[str, str] | None = None,
) -> None:
    """Load one validated checkpoint into ``state``, all or nothing (through DCP: it reshards).

    Phase 1 checks the structure and reads every byte into shadow buffers (``pool`` where it
    fits), verifying every checksum; only then phase 2 copies them into the live state.
    ``region`` (address, bytes) is the staging slot behind ``pool``, which the reader may
    overwrite whole: shard files laid out as the slot are read straight into it.
    """
    problem: str | None = None
    try:
        lp = load_plan.plan(
            state, manifest, strict=strict, exclude=exclude, allow_missing=allow_missing,
            cast=cast, require=require, pool=pool,
        )  # fmt: skip
    except StateMismatchError as e:
        problem = str(e)
    if distributed.current() is not None:
        # every rank must enter dcp.load together, or not at all
        problems = [p for p in distributed.all_gather(problem) if p is not None]
        if problems:
            raise StateMismatchError(problems[0])
    elif problem is not None:
        raise StateMismatchError(problem)
    total = sum(c.length for t in manifest.tensors.values() for c in t.chunks)
    bar = Progress(total, f"loading step {manifest.step}") if total >= PROGRESS_MIN_BYTES else None
    if lp.shadows:
        no_dist = not (dist.is_available() and dist.is_initialized())
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.load(
                    lp.shadows,
                    storage_reader=ManifestReader(
                        storage, step_dir, manifest, bar.update if bar else None, region=region, paths=paths
                    ),
                    planner=DefaultLoadPlanner(allow_partial_load=True),
                    no_dist=no_dist,
                )
        except CheckpointException as e:
            raise _unwrap(e) from e
        finally:
            if bar is not None:
                bar.close()
    try:
        lp.apply()
    except Exception as e:  # every byte was verified: this is the state refusing it
        raise StateMismatchError(
            f"step {manifest.step} was read and verified, but applying it failed: {type(e).__name__}: "
            f"{e}; the live state may be partly updated"
        ) from e


def _unwrap(e: CheckpointException) -> BaseException:
    """DCP wraps every rank's error; surface ours (corruption, storage) as themselves."""
    for exc, _trace in e.failures.values():
        if isinstance(exc, (CorruptCheckpointError, StorageError)):
            return exc
    for exc, _trace in e.failures.values():
        return exc
    return e


def resume(
    root: str | os.PathLike[str],
    state: dict[str, Any],
    *,
    step: int | None = None,
    strict: bool = True,
    exclude: Sequence[str] = (),
    allow_missing: bool = False,
    cast: bool = False,
    require: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
) -> int | None:
    """Load the newest valid committed checkpoint under ``root`` into ``state``, all or nothing.

    Permanent checkpoints and rolling snapshots (``root/snapshots``) are both candidates;
    for the same step the permanent copy wins.

    Every byte is read and checksummed, and every key, shape, dtype and optimizer structure
    checked, before the live state is touched: a resume that fails leaves it exactly as it
    was.  A checkpoint that is incomplete or corrupt (missing manifest, wrong file size,
    checksum mismatch) is skipped with a warning naming the bad file, and the previous one is
    tried.  A selective checkpoint restores what it holds and leaves the rest untouched.
    Nothing is unpickled.

    Args:
        root: the checkpoint root.
        state: the live state (same shape of dict as given to the checkpointer).
        step: load exactly this step instead of the newest; CheckpointNotFoundError if absent.
        strict: fail with StateMismatchError when keys differ (within what the checkpoint's
            selection covers); False tolerates missing and extra keys.  Shapes must always
            match, and dtypes unless ``cast``.
        exclude: fqn patterns to leave untouched (e.g. ``["optim"]``).
        allow_missing: tolerate live keys that the checkpoint lacks.
        cast: convert between float dtypes; a lossy cast is warned about, never silent.
        require: fqn patterns that must be restored (e.g. ``["optim"]``): a checkpoint whose
            selection left them out (weights only) is refused before anything is touched.
        storage_options: fsspec options for a URL root (credentials, endpoint).
        local_dir: the local tier of a local-first setup; its copy of a step is preferred,
            and a missing or empty local dir falls back to ``root``.

    Returns:
        The loaded step, or None when ``root`` holds no checkpoint at all.

    Raises:
        CorruptCheckpointError: checkpoints exist but none of them is loadable.
        StateMismatchError: the newest valid checkpoint does not fit the live state.
    """
    r = normalize_root(root)
    sources = [(storage_for(r, storage_options), r)]
    if local_dir is not None:
        sources.insert(0, (storage_for(normalize_root(local_dir)), normalize_root(local_dir)))
    return resume_in(
        sources, state, step=step, strict=strict, exclude=exclude, allow_missing=allow_missing,
        cast=cast, require=require,
    )  # fmt: skip


def _loadable(storage: Storage, path: str) -> bool:
    try:
        m = read_manifest(storage, path)
        return not file_problems(storage, path, m, shard_files(m))
    except (CorruptCheckpointError, StorageError):
        return False


def _agree(candidates: list[Any]) -> list[Any]:
    """Several ranks: keep only steps every rank can load, so all load the same one.

    Ranks may see storage differently (a lagging local disk, a failed read); the newest
    step that *every* rank validates wins.  This is a collective on the trainer thread.
    """
    seen: dict[tuple[int, bool], Any] = {}
    for key, storage, path in candidates:  # newest first; the first source wins per step
        k = (key[0], key[1])
        if k not in seen and _loadable(storage, path):
            seen[k] = (key, storage, path)
    everyone = distributed.all_gather(sorted(seen))
    common = set(map(tuple, everyone[0])).intersection(*(set(map(tuple, e)) for e in everyone[1:]))
    return [seen[k] for k in sorted(common, reverse=True)]  # type: ignore[index]


def _candidates(sources: Sequence[tuple[Storage, str]], step: int | None) -> list[Any]:
    """(key, storage, path), newest first; then permanent before snapshot; then the earlier
    (local) source.  A rollback's abandoned steps are candidates only when asked for by step."""
    out = []
    for rank, (storage, r) in enumerate(sources):
        abandoned = read_abandoned(storage, r) if step is None else set()
        for s, kind, path in step_dirs(storage, r):
            if s not in abandoned:
                out.append(((s, kind is Kind.PERMANENT, -rank), storage, path))
    out.sort(key=lambda c: c[0], reverse=True)
    return out


def _load_one(storage: Storage, path: str, s: int, state: dict[str, Any], **opts: Any) -> None:
    manifest = read_manifest(storage, path)
    if manifest.step != s:
        raise CorruptCheckpointError(f"{path}: manifest says step {manifest.step}, directory says {s}")
    if manifest.piece is not None:
        raise CorruptCheckpointError(
            f"{path} holds only rank {manifest.piece}'s shards of a {manifest.world_size}-rank "
            "checkpoint (one rank's part of a local-first tier); resume from the remote root"
        )
    problems = file_problems(storage, path, manifest, shard_files(manifest))
    if problems:
        raise CorruptCheckpointError("; ".join(problems))
    fds = _pin(storage, path, manifest)
    try:
        paths = {name: f"/proc/self/fd/{fd}" for name, fd in fds.items()}
        # a load of every tensor with no slot to read into: a slab (a partial load, e.g. the
        # weights of a checkpoint larger than memory, keeps a shadow per tensor it wants)
        whole = opts.get("strict", True) and not opts.get("exclude") and manifest.world_size == 1
        if (
            opts.get("pool") is None
            and whole
            and distributed.current() is None
            and _slab_pays(manifest, state)
        ):
            slab, opts["pool"], opts["region"] = _slab(manifest)  # noqa: F841 - the views' memory
        load_checkpoint(storage, path, manifest, state, paths=paths, **opts)
    finally:
        for fd in fds.values():
            os.close(fd)


SLAB_MAX_ORPHANS = 1 / 8  # of a checkpoint's bytes: tensors with no live tensor to copy into


def _slab_pays(manifest: Manifest, state: dict[str, Any]) -> bool:
    """Whether a slab keeps the load's host memory near the checkpoint's size.  A tensor with
    no live counterpart (the state of a fresh optimizer) is handed to its owner as memory of
    its own: from a slab that is a copy, made while the slab is alive, so a resume into a
    fresh Adam would peak at 1.7x the checkpoint; its own shadow is handed over as it is."""
    try:
        flat = flatten_state(state)
    except Exception:  # the plan reports what is wrong with the state
        return False
    # a numpy array is replaced by a new one on load, never written into: no live tensor
    arrays = set().union(*(tensor_fqns(node, ("ndarray",)) for node in flat.tree.values()))
    live = flat.tensors.keys() - arrays
    size = {fqn: sum(c.nbytes for c in t.chunks) for fqn, t in manifest.tensors.items()}
    orphans = sum(n for fqn, n in size.items() if fqn not in live)
    return orphans <= SLAB_MAX_ORPHANS * sum(size.values())


def _slab(manifest: Manifest) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, int]]:
    """Shadow buffers for a load without a staging slot, laid out as the shard files byte for
    byte (one page-aligned slab, the files one after another), so the reader reads each file
    whole into it, as into a checkpointer's slot: fewer and larger reads (on S3, GETs sized
    for the load instead of one per group of blobs; on a local disk, ``O_DIRECT``).  Returns
    the slab (keep it alive while the views are used), the views by fqn, and the region."""
    at, start = 0, {}
    for name in sorted(shard_files(manifest)):
        start[name] = at
        at += round_up(int(manifest.files[name]["size"]), PAGE)
    slab = torch.empty(at + PAGE, dtype=torch.uint8)  # a page more: the files start page-aligned
    base = round_up(slab.data_ptr(), PAGE) - slab.data_ptr()
    views: dict[str, torch.Tensor] = {}
    for fqn, t in manifest.tensors.items():
        c = t.chunks[0] if len(t.chunks) == 1 else None
        if c is None or c.file not in start or c.codec is not None or c.sizes != t.shape or not c.nbytes:
            continue  # resharded, differential, compressed or empty: a shadow of its own
        dtype = t.torch_dtype
        lo = base + start[c.file] + c.data_offset
        if lo % dtype.itemsize or c.nbytes != dtype.itemsize * math.prod(t.shape):
            continue
        views[fqn] = slab[lo : lo + c.nbytes].view(dtype).view(t.shape)
    return slab, views, (slab.data_ptr() + base, at)


PIN_MAX = 256  # shard files a reader holds open at once


def _pin(storage: Storage, path: str, manifest: Manifest) -> dict[str, int]:
    """Open every shard file (and chunk-store part) of a step on a local disk now (Linux): an
    open descriptor keeps reading the files even if retention deletes the step meanwhile (it
    renames the directory first, then the sweep removes the parts), so a reader beside a
    fast-pruning trainer loses a step only in the moment between listing and opening, not
    during the whole read."""
    names = shard_files(manifest)
    parts = parts_of(manifest)
    if (
        not isinstance(storage, LocalStorage)  # descriptors: local files only
        or not os.path.isdir("/proc/self/fd")
        or len(names) + len(parts) > PIN_MAX
    ):
        return {}  # (thousands of files, from many ranks, would exhaust the descriptor limit)
    store = store_of(path)
    wanted = [(n, layout.join(path, n), manifest.files[n]["size"]) for n in sorted(names)]
    wanted += [(n, layout.join(store, n), size) for n, size in sorted(parts.items())]  # shared parts too
    fds: dict[str, int] = {}
    try:
        for name, full, size in wanted:
            fds[name] = fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if os.fstat(fd).st_size != size:
                raise CorruptCheckpointError(f"{full}: size changed since the manifest was read")
    except BaseException as e:
        for fd in fds.values():
            os.close(fd)
        if isinstance(e, OSError):
            raise wrap_os_error("open for reading", full, e) from e
        raise
    return fds


RELIST_ROUNDS = 10  # a reader whose candidates were all deleted under it lists again


def resume_in(
    sources: Sequence[tuple[Storage, str]],
    state: dict[str, Any],
    *,
    step: int | None = None,
    **opts: Any,
) -> int | None:
    """``resume`` over ``(storage, root)`` sources; for the same step, earlier sources win.
    ``opts`` are :func:`load_checkpoint`'s (strict, exclude, allow_missing, cast, require, pool,
    region).

    A candidate deleted while it is read (retention in a running trainer) is skipped without
    a warning, and the listing is taken again if nothing else was loadable.  A storage error
    that is not a definite "not found" ends the resume as a ``StorageError``: it says
    nothing about the checkpoints, so nothing falls back.
    """
    r = " and ".join(root for _, root in sources)
    failures: list[str] = []
    for _ in range(RELIST_ROUNDS):
        candidates = _candidates(sources, step)
        if distributed.current() is not None:
            candidates = _agree(candidates)
        if step is not None:
            candidates = [c for c in candidates if c[0][0] == step]
            if not candidates:
                where = ", ".join(root for _, root in sources)
                raise CheckpointNotFoundError(f"no checkpoint for step {step} under {where}")
        if not candidates:
            return None
        vanished = False
        for (s, _, _), storage, path in candidates:
            try:
                _load_one(storage, path, s, state, **opts)
            except (CorruptCheckpointError, StorageError) as e:
                if storage.stat(path) is None:  # deleted under us (retention): not damage
                    log.info("asyncckpt: step %d was deleted while resuming; trying the next one", s)
                    vanished = True
                    continue
                if isinstance(e, StorageError) and e.errno != errno.ENOENT:
                    raise StorageError(
                        e.errno, f"resuming from {r} failed: {e.strerror or e}; the checkpoints may be "
                        "fine: retry when the storage answers", path,
                    ) from e  # fmt: skip
                warnings.warn(
                    f"asyncckpt: skipping step {s}: {str(e).rstrip('.')}. Falling back to an older checkpoint.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                failures.append(f"step {s}: {e}")
                continue
            log.info("resumed from step %d (%s)", s, path)
            return s
        if not vanished:
            break
    raise CorruptCheckpointError(
        f"no loadable checkpoint under {r}; every candidate failed: "
        + " | ".join(failures)
        + ". The live state was not changed. `asyncckpt verify` shows each step's problems; move "
        "the damaged step directories away to start fresh."
    )
