"""The local-first tier: commit to fast local disk, upload to the remote root in the background.

A committed local step is copied file by file to the remote root's step prefix (a
differential step's new parts first, into the remote chunk store), with ``manifest.json``
last, exactly like a direct remote commit; readers of the remote root
therefore never see a partial upload.  When the upload is confirmed, a ``.uploaded`` marker
is written into the local step directory.  The local manifest names its remote target, so
``list_checkpoints`` can tell "pending" from "uploaded" even in a later process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .chunkstore import referenced, store_of
from .commit import await_manifest, gather_done_records, write_done_record, write_manifest
from .errors import AsyncCheckpointError, StepExistsError, StorageError
from .handle import CheckpointInfo
from .layout import Kind
from .manifest import Manifest
from .options import WriterOptions
from .priority import Pacer, writer_priority
from .storage import AtomicRename, Storage, is_file, retrying
from .writer import write_small

__all__ = ["Uploader", "upload_step", "upload_piece"]

log = logging.getLogger("asyncckpt")

_CHUNK = 64 << 20


Pace = Callable[[int], None] | None  # the writer's bandwidth cap (priority.Pacer), or None


def _copy_file(src: Storage, src_path: str, dst: Storage, dst_path: str, pace: Pace = None) -> int:
    """Stream one file; retried as a whole on transient errors.  Returns its size."""

    def attempt() -> int:
        out = dst.open_write(dst_path)
        n = 0
        try:
            with src.open_read(src_path) as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    n += len(chunk)
                    if pace is not None:
                        pace(len(chunk))
            dst.finish_write(out, dst_path, n)
        except Exception as e:  # a failed completion too: no multipart upload is left open
            dst.abort_write(out)
            if isinstance(e, OSError | AsyncCheckpointError):
                raise
            raise StorageError(0, f"upload failed: {type(e).__name__}: {e}", dst_path) from e
        except BaseException:
            dst.abort_write(out)
            raise
        return n

    return retrying(dst, attempt)


def upload_step(
    local: Storage, local_dir: str, remote: Storage, remote_dir: str, owner: str = "", pace: Pace = None
) -> int:
    """Copy a committed step; the manifest goes last.  Returns the bytes uploaded.

    While it is under way the remote step holds ``.writer`` with ``owner``'s token, so
    ``gc`` on the remote root leaves it alone while this writer lives.
    """
    skip = (layout.MANIFEST, layout.UPLOADED_MARKER, layout.WRITER_MARKER)
    names = [n for n in local.listdir(local_dir) if n not in skip]
    remote.makedirs(remote_dir)  # a shared POSIX remote (object stores need none)
    marker = layout.join(remote_dir, layout.WRITER_MARKER)
    write_small(remote, marker, owner.encode())
    total = _upload_parts(local, local_dir, remote, remote_dir, pace)
    for name in names:
        total += _copy_file(local, layout.join(local_dir, name), remote, layout.join(remote_dir, name), pace)
    total += _copy_file(
        local, layout.join(local_dir, layout.MANIFEST), remote, layout.join(remote_dir, layout.MANIFEST), pace
    )
    remote.remove(marker)
    _mark_uploaded(local, local_dir)
    return total


def _upload_parts(local: Storage, local_dir: str, remote: Storage, remote_dir: str, pace: Pace) -> int:
    """A differential step: copy the parts it references that the remote chunk store lacks
    (usually only the ones this step wrote), before its manifest.  A part the remote has is
    referenced by the newest remote step, so the remote's sweep cannot take it meanwhile; one
    uploaded here is referenced by no remote step yet, and the remote's sweep deletes only
    parts it saw referenced (``Pruner(known_only=True)``).  Returns the bytes uploaded."""
    path = layout.join(local_dir, layout.MANIFEST)
    names = sorted(referenced(Manifest.from_json(local.read_bytes(path), path)))
    if not names:
        return 0
    src, dst = store_of(local_dir), store_of(remote_dir)
    remote.makedirs(dst)

    def one(name: str) -> int:
        if remote.stat(layout.join(dst, name)) is not None:
            return 0
        return _copy_file(local, layout.join(src, name), remote, layout.join(dst, name), pace)

    with concurrent.futures.ThreadPoolExecutor(8, "asyncckpt-upload-parts") as pool:
        return sum(pool.map(one, names))


def _mark_uploaded(local: Storage, local_dir: str) -> None:
    marker = layout.join(local_dir, layout.UPLOADED_MARKER)
    f = local.open_write(marker)
    local.finish_write(f, marker, 0)


def upload_piece(
    local: Storage,
    local_dir: str,
    remote: Storage,
    remote_dir: str,
    tree: dict[str, Any],
    paths: dict[str, tuple[str | int, ...]],
    run_id: str,
    timeout: float,
    pace: Pace = None,
) -> tuple[int, CheckpointInfo]:
    """Several ranks: upload this rank's piece of a step, then its done record; rank 0 waits
    for every rank's record and writes the manifest (the commit), the others wait for it.
    Returns the bytes this rank uploaded and the committed remote step."""
    path = layout.join(local_dir, layout.MANIFEST)
    m = Manifest.from_json(local.read_bytes(path), path)
    rank = m.piece
    assert rank is not None
    own = {n: f for n, f in m.files.items() if n not in (layout.MANIFEST, layout.DCP_METADATA)}
    if is_file(remote, layout.join(remote_dir, layout.MANIFEST)):
        raise StepExistsError(f"step {m.step} is already committed at {remote_dir}")
    remote.makedirs(remote_dir)
    if isinstance(remote, AtomicRename):  # a POSIX remote: a crashed run's files here would block ours
        for name in [*own, layout.done_record(rank), layout.done_record(rank) + ".part"]:
            remote.remove(layout.join(remote_dir, name))  # a file: unlinked
    total = 0
    for name in own:
        total += _copy_file(local, layout.join(local_dir, name), remote, layout.join(remote_dir, name), pace)
    write_done_record(remote, remote_dir, rank, m.tensors, own, run_id)  # write_small retries it
    if rank == 0:
        tensors, files = gather_done_records(remote, remote_dir, m.step, m.world_size, timeout, run_id=run_id)
        joined = dataclasses.replace(
            m, tensors=tensors, files=files, state=tree, remote=None, piece=None, created_at=time.time()
        )
        write_manifest(remote, remote_dir, joined, paths)
    else:
        joined = await_manifest(remote, remote_dir, m.step, timeout)
    return total, CheckpointInfo.from_manifest(joined, remote_dir, Kind.PERMANENT)


@dataclass
class _Upload:
    info: CheckpointInfo
    future: concurrent.futures.Future[tuple[CheckpointInfo, float]] = field(
        default_factory=concurrent.futures.Future
    )
    # several ranks: the joined manifest's state tree and DCP paths (a piece has neither),
    # and the run id the ranks agreed on
    join: tuple[dict[str, Any], dict[str, tuple[str | int, ...]], str] | None = None


class Uploader:
    """One background thread uploading committed local steps in order.

    :meth:`submit` returns a future of (remote step info, seconds); nothing is called back.
    """

    def __init__(
        self,
        local: Storage,
        remote: Storage,
        remote_root: str,
        writer: WriterOptions,
        owner: str = "",
    ) -> None:
        """The uploads keep ``writer``'s bandwidth cap (a pacer of their own) and priorities:
        CPU ``nice`` only if asked, since this is a thread in the trainer's process, where a
        lowered thread holding the GIL would hold up the trainer."""
        self.local, self.remote, self.remote_root, self.owner = local, remote, remote_root, owner
        self.commit_timeout = writer.commit_timeout
        self.pace = Pacer(writer.max_bandwidth) if writer.max_bandwidth else None
        self._lower = writer_priority(writer.nice or 0, writer.io_priority)  # the trainer's, lowered
        self._pending: dict[int, _Upload] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Upload | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="asyncckpt-upload", daemon=True)
        self._thread.start()

    def submit(
        self,
        info: CheckpointInfo,
        join: tuple[dict[str, Any], dict[str, tuple[str | int, ...]], str] | None = None,
    ) -> concurrent.futures.Future[tuple[CheckpointInfo, float]]:
        """Upload committed local step ``info``; ``join``: a rank's piece of a step of several ranks."""
        up = _Upload(info, join=join)
        with self._lock:
            self._pending[info.step] = up
        self._queue.put(up)
        return up.future

    def uploading(self) -> set[int]:
        """Steps submitted and not yet uploaded (or failed)."""
        with self._lock:
            return set(self._pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every submitted upload; False on timeout."""
        with self._lock:
            futures = [u.future for u in self._pending.values()]
        _, not_done = concurrent.futures.wait(futures, timeout=timeout)
        return not not_done

    def close(self, wait: bool = True) -> None:
        self._queue.put(None)
        self._thread.join(None if wait else 5)

    def _loop(self) -> None:
        self._lower()  # this thread; its parts pool inherits it
        while (up := self._queue.get()) is not None:
            step = up.info.step
            remote_dir = layout.join(self.remote_root, layout.step_dirname(step))
            t0 = time.perf_counter()
            try:
                if up.join is not None:
                    nbytes, remote_info = upload_piece(
                        self.local,
                        up.info.path,
                        self.remote,
                        remote_dir,
                        *up.join,
                        self.commit_timeout,
                        self.pace,
                    )
                    _mark_uploaded(self.local, up.info.path)
                else:
                    nbytes = upload_step(
                        self.local, up.info.path, self.remote, remote_dir, self.owner, self.pace
                    )
                    remote_info = dataclasses.replace(up.info, path=remote_dir, upload="uploaded")
            except BaseException as e:
                log.error("asyncckpt: uploading step %d to %s failed: %s", step, remote_dir, e)
                with self._lock:
                    self._pending.pop(step, None)
                up.future.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            log.info("step=%d uploaded %.1fMiB in %.2fs to %s", step, nbytes / 2**20, seconds, remote_dir)
            with self._lock:
                self._pending.pop(step, None)
            up.future.set_result((remote_info, seconds))
