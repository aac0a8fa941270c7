"""Host staging: buffers allocated once and reused, and the copy into them.

The pool holds ``slots`` flat byte buffers, each laid out as this rank's shard files
(``file_layout``: page-aligned files, 64-byte aligned tensor data, headers already in place).  Buffers are allocated and touched
once, up front, so a save never pays for allocation or page faults: that is the stall the
library exists to remove.  With CUDA tensors the buffers are pinned and the copy runs on a
side stream that first waits on an event recorded on the compute stream.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .blob import TensorSlot, host_alias
from .errors import StagingError
from .file_layout import BLOB_ALIGN, PAGE, FileImage, FileLayout, lay_out
from .options import StagingOptions
from .slot_progress import Copied
from .state import FlatState

__all__ = ["TensorSlot", "StagingPlan", "StagingPool", "Lease", "Stager", "copy_into", "host_alias"]

log = logging.getLogger("asyncckpt")

_CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StagingPlan:
    """The layout of one snapshot in a slot; depends only on the state's structure.

    A slot holds this rank's shard files byte for byte (``file_layout``): ``entries`` say
    where each tensor's bytes go, ``files`` where each file lies.
    """

    entries: tuple[TensorSlot, ...]
    total_bytes: int
    signature: tuple[object, ...]
    needs_pinned: bool
    files: tuple[FileImage, ...] = ()
    layout: FileLayout | None = None

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        signature: tuple[object, ...],
        cast: torch.dtype | None = None,
        files: int = 1,
        data_align: int = BLOB_ALIGN,
    ) -> StagingPlan:
        """Lay out ``tensors`` as ``files`` shard files, tensor data ``data_align``-aligned;
        with ``cast``, wider floating tensors are staged in that dtype."""
        specs = []
        for fqn, t in tensors.items():
            dtype = t.dtype
            if (
                cast is not None
                and t.dtype in _CASTABLE
                and t.dtype.itemsize >= cast.itemsize
                and t.dim() > 0
            ):
                # copy_ converts while staging; the live tensor is untouched.  Scalars (an
                # optimizer's step count) stay exact: 257 in bf16 would be 256
                dtype = cast
            specs.append((fqn, dtype, tuple(t.shape)))
        lay = lay_out(specs, files, data_align)
        pinned = any(t.device.type == "cuda" for t in tensors.values())
        return cls(lay.entries, lay.total_bytes, signature, pinned, lay.files, lay)


class StagingPool:
    """``slots`` host buffers laid out by ``plan``, allocated and pre-faulted once."""

    def __init__(self, plan: StagingPlan, slots: int, *, shared: bool = False) -> None:
        self.plan = plan
        self.slots = slots
        self._buffers: list[torch.Tensor] = []
        self._segments: list[Any] = []  # named shared memory, when a writer process maps it
        size = max(plan.total_bytes, PAGE)
        pin = plan.needs_pinned and torch.cuda.is_available()
        try:
            for _ in range(slots):
                if shared:
                    from multiprocessing import shared_memory

                    seg = shared_memory.SharedMemory(create=True, size=size)
                    self._segments.append(seg)
                    buf = torch.frombuffer(seg.buf, dtype=torch.uint8)
                    if pin:  # page-lock the shared mapping so CUDA copies into it are async
                        torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0)
                else:  # page-aligned, as direct I/O needs (shared memory is already)
                    raw = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=pin)
                    skip = -raw.data_ptr() % PAGE
                    buf = raw[skip : skip + size]
                buf.zero_()  # fault every page in now, not during the first save
                if plan.layout is not None:
                    plan.layout.restore(buf)  # the blobs' prefixes and suffixes, once per slot
                self._buffers.append(buf)
        except (RuntimeError, OSError) as e:
            self.close()
            raise StagingError(
                f"could not allocate {slots} x {plan.total_bytes / 2**30:.2f} GiB of host staging "
                f"memory ({e}); lower max_inflight or free host memory"
            ) from e
        self._views = [self._make_views(b) for b in self._buffers]
        self._free = list(range(slots))
        self._cv = threading.Condition()

    def _make_views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for e in self.plan.entries:
            flat = buf[e.offset : e.offset + e.nbytes]
            views[e.fqn] = flat.view(e.dtype).view(e.shape)
        return views

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers)

    def buffer(self, slot: int) -> torch.Tensor:
        return self._buffers[slot]

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return self._views[slot]

    def acquire(self, block: bool = True, timeout: float | None = None) -> int | None:
        """A free slot, waiting for the writer to release one when ``block``."""
        with self._cv:
            if block:
                self._cv.wait_for(lambda: bool(self._free), timeout=timeout)
            return self._free.pop(0) if self._free else None

    def release(self, slot: int) -> None:
        with self._cv:
            if slot not in self._free:
                self._free.append(slot)
            self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return len(self._free) == self.slots

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: len(self._free) == self.slots, timeout=timeout)

    def restore(self, slot: int) -> None:
        """Put back the slot's headers and zero padding (a resume may have read whole files
        into it); the tensors' bytes are left as they are."""
        if self.plan.layout is not None:
            self.plan.layout.restore(self._buffers[slot])

    def shm_names(self) -> list[str] | None:
        """Names of the shared-memory segments (one per slot), or None for private memory."""
        return [seg.name for seg in self._segments] if self._segments else None

    def close(self) -> None:
        """Free the buffers (unlinking shared memory); the pool is unusable afterwards."""
        if self._segments and self.plan.needs_pinned and torch.cuda.is_available():
            for buf in self._buffers:
                torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self._views = []
        self._buffers = []
        for seg in self._segments:
            try:
                seg.close()
            except BufferError:  # a tensor still points into it; the unlink below still frees it
                pass
            try:
                seg.unlink()
            except FileNotFoundError:
                pass
        self._segments = []


CUDA_MARK_BYTES = 32 << 20  # with marks asked for: one event per this many bytes of CUDA copies


def copy_into(
    views: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    stream: torch.cuda.Stream | None = None,
    on_copied: Callable[[list[str]], None] | None = None,
    cuda_marks: list[tuple[list[str], torch.cuda.Event]] | None = None,
) -> torch.cuda.Event | None:
    """Copy every live tensor into its slot view.

    CUDA copies are queued first on ``stream`` (ordered after the work already queued on
    the current stream), then CPU tensors are copied on this thread while the GPU works,
    ``on_copied`` told after each.  Returns an event that completes with the last CUDA
    copy, or None if there was none.  ``cuda_marks`` (a list) receives (tensors, event)
    for each run of about ``CUDA_MARK_BYTES`` of CUDA copies: waiting on them in order tells
    how far the copy has got (``Stager._copy``, for a writer that starts during the copy).
    """
    done = None
    with torch.no_grad():
        cuda = [(k, t) for k, t in tensors.items() if t.device.type == "cuda"]
        if cuda:
            assert stream is not None
            ready = torch.cuda.current_stream().record_event()
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                group: list[str] = []
                pending = 0
                for k, t in cuda:
                    views[k].copy_(t, non_blocking=True)
                    if cuda_marks is not None:
                        group.append(k)
                        pending += t.numel() * t.element_size()
                        if pending >= CUDA_MARK_BYTES:
                            cuda_marks.append((group, stream.record_event()))
                            group, pending = [], 0
                done = stream.record_event()
                if cuda_marks is not None and group:
                    cuda_marks.append((group, done))
        for k, t in tensors.items():
            if t.device.type != "cuda":
                views[k].copy_(t)  # CPU, or another accelerator: a plain blocking copy
                if on_copied is not None:
                    on_copied([k])
    return done


# --------------------------------------------------------------------------- the stager


@dataclass
class Lease:
    """One slot of a pool, holding one snapshot until the writer releases it.

    Attributes:
        staged: resolves once the snapshot is in the slot (at once without overlap).
        slot_wait_s: seconds spent waiting for a free slot.
        staging_s: seconds the copy took, once staged.
    """

    pool: StagingPool
    slot: int
    generation: int
    staged: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)
    copied: Copied | None = None  # how far the copy has got: a thread writer starts before it ends
    slot_wait_s: float = 0.0
    staging_s: float = 0.0
    _released: bool = False

    @property
    def buffer(self) -> torch.Tensor:
        return self.pool.buffer(self.slot)

    def release(self) -> None:
        """Give the slot back (idempotent); the writer calls this once the bytes are durable."""
        if not self._released:
            self._released = True
            self.pool.release(self.slot)


class Stager:
    """Copies the state into a reused pool of host buffers, on the trainer thread.

    The pool is sized for the state's structure and re-allocated only when it changes.  With
    ``overlap``, the copy runs on a helper thread and a global optimizer step pre-hook waits
    for it (on CUDA-only state the GPU waits, not the CPU).
    """

    def __init__(
        self,
        opts: StagingOptions,
        *,
        shared: bool,
        dtype: torch.dtype | None,
        files: int = 1,
        data_align: int = BLOB_ALIGN,
        cuda_progress: bool = False,
    ) -> None:
        self.opts = opts
        # a writer reads lease.copied during the copy (write_during_copy): CUDA copies are
        # then marked in runs as they complete, not only at the end
        self.cuda_progress = cuda_progress
        self.files = files  # shard files per rank: the slot is laid out as these files
        self.data_align = data_align  # PAGE for differential saves: each part is written directly
        self.shared = shared  # a writer process maps the buffers: named shared memory
        self.dtype = dtype
        self.pool: StagingPool | None = None
        self.generation = 0
        self._stream: torch.cuda.Stream | None = None
        self._helper = ThreadPoolExecutor(1, "asyncckpt-stage") if opts.overlap else None
        self._last: tuple[Lease, torch.cuda.Event | None, bool] | None = None
        self._hook = register_optimizer_step_pre_hook(self._before_optimizer_step) if opts.overlap else None

    def ensure(self, flat: FlatState) -> StagingPool:
        """The pool for ``flat``'s structure, allocated (and faulted in) if it is new."""
        sig = flat.signature()
        if self.pool is not None and self.pool.plan.signature == sig:
            return self.pool
        if self.pool is not None:
            log.info(
                "asyncckpt: the state's tensors changed (%d tensors now); waiting for saves in "
                "flight, then re-allocating the staging buffers",
                len(flat.tensors),
            )
            self.pool.wait_idle()
            self.pool.close()
            self.pool = None
        plan = StagingPlan.from_tensors(
            flat.tensors, sig, cast=self.dtype, files=self.files, data_align=self.data_align
        )
        self.pool = StagingPool(plan, self.opts.max_inflight, shared=self.shared)
        self.generation += 1
        if self._stream is None and plan.needs_pinned and torch.cuda.is_available():
            self._stream = torch.cuda.Stream()
        return self.pool

    def stage(
        self, flat: FlatState, step: int, on_acquired: Callable[[Lease], None] | None = None
    ) -> Lease | None:
        """Copy ``flat`` into a free slot; None when every slot is busy and ``on_busy="skip"``.

        ``on_acquired(lease)`` runs once the slot is taken, before the copy starts (a writer
        handed the lease then may write whatever ``lease.copied`` says is in)."""
        pool = self.ensure(flat)
        t = time.perf_counter()
        slot = pool.acquire(block=self.opts.on_busy == "wait")
        if slot is None:
            return None
        copied = Copied(pool.plan.entries, pool.plan.total_bytes)
        lease = Lease(pool, slot, self.generation, slot_wait_s=time.perf_counter() - t, copied=copied)
        try:
            if on_acquired is not None:
                on_acquired(lease)
            if self.opts.overlap:
                self._copy_overlapped(flat, lease, step)
            else:
                self._copy(flat, lease, step)
        except BaseException as e:
            copied.fail(e)
            if not lease.staged.done():
                lease.staged.set_exception(e)
            lease.release()
            raise
        return lease

    def _copy(self, flat: FlatState, lease: Lease, step: int) -> None:
        t = time.perf_counter()
        copied = lease.copied
        marks: list[tuple[list[str], torch.cuda.Event]] | None = (
            [] if copied is not None and self.cuda_progress else None
        )
        try:
            event = copy_into(
                lease.pool.views(lease.slot),
                flat.tensors,
                self._stream,
                on_copied=copied.landed if copied is not None else None,
                cuda_marks=marks,
            )
            for fqns, mark in marks or ():  # the writer may write what the GPU has copied
                mark.synchronize()
                assert copied is not None
                copied.landed(fqns)
            if event is not None:
                event.synchronize()
        except Exception as e:
            raise StagingError(f"copying the state for step {step} into host memory failed: {e}") from e
        lease.staging_s = time.perf_counter() - t
        if copied is not None:
            copied.complete()
        lease.staged.set_result(None)

    def _copy_overlapped(self, flat: FlatState, lease: Lease, step: int) -> None:
        t = time.perf_counter()
        views = lease.pool.views(lease.slot)
        cuda = {k: v for k, v in flat.tensors.items() if v.device.type == "cuda"}
        cpu = {k: v for k, v in flat.tensors.items() if v.device.type != "cuda"}
        event = copy_into(views, cuda, self._stream) if cuda else None
        self._last = (lease, event, bool(cpu))

        def run() -> None:
            try:
                copy_into(views, cpu)
                if event is not None:
                    event.synchronize()
            except Exception as e:
                err = StagingError(f"copying the state for step {step} into host memory failed: {e}")
                if lease.copied is not None:
                    lease.copied.fail(err)
                lease.staged.set_exception(err)
                return
            lease.staging_s = time.perf_counter() - t
            if lease.copied is not None:
                lease.copied.complete()
            lease.staged.set_result(None)

        assert self._helper is not None
        self._helper.submit(run)

    def _before_optimizer_step(self, *_: Any) -> None:
        # A global hook: any optimizer stepping over these parameters mutates them, whether
        # or not it is part of the checkpointed state.
        last = self._last
        if last is None or last[0].staged.done():
            return
        lease, event, has_cpu = last
        if event is not None and not has_cpu:
            torch.cuda.current_stream().wait_event(event)  # GPU-side wait; the CPU runs on
        else:
            lease.staged.exception()  # waits; an error surfaces through the save's handle

    def close(self) -> None:
        """Stop the helper, remove the hook and free the buffers (after the writer is done)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._helper is not None:
            self._helper.shutdown(wait=True)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
