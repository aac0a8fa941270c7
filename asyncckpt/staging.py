"""Host staging: buffers allocated once and reused, and the copy into them.

The pool holds ``slots`` flat byte buffers, each big enough for one snapshot of the state's
tensors (64-byte aligned, so every dtype view is aligned).  Buffers are allocated and touched
once, up front, so a save never pays for allocation or page faults: that is the stall the
library exists to remove.  With CUDA tensors the buffers are pinned and the copy runs on a
side stream that first waits on an event recorded on the compute stream.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import StagingError

__all__ = ["TensorSlot", "StagingPlan", "StagingPool", "copy_into", "host_alias"]

ALIGN = 64
_CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a slot buffer."""

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class StagingPlan:
    """The layout of one snapshot in a slot; depends only on the state's structure."""

    entries: tuple[TensorSlot, ...]
    total_bytes: int
    signature: tuple[object, ...]
    needs_pinned: bool

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        signature: tuple[object, ...],
        cast: torch.dtype | None = None,
    ) -> StagingPlan:
        """Lay out ``tensors``; with ``cast``, wider floating tensors are staged in that dtype."""
        entries, off = [], 0
        for fqn, t in tensors.items():
            dtype = t.dtype
            if cast is not None and t.dtype in _CASTABLE and t.dtype.itemsize >= cast.itemsize:
                dtype = cast  # copy_ converts while staging; the live tensor is untouched
            nbytes = t.numel() * dtype.itemsize
            entries.append(TensorSlot(fqn, dtype, tuple(t.shape), off, nbytes))
            off += (nbytes + ALIGN - 1) // ALIGN * ALIGN
        pinned = any(t.device.type == "cuda" for t in tensors.values())
        return cls(tuple(entries), off, signature, pinned)


def host_alias(buffer: torch.Tensor, entry: TensorSlot) -> torch.Tensor:
    """A tensor over ``entry``'s bytes whose storage is exactly those bytes.

    ``torch.save`` of a view would write the whole underlying storage; this alias has a
    storage of its own (not owning the memory), so only the tensor's bytes are written and
    nothing is copied.  ``buffer`` must outlive the alias.
    """
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    raw = (ctypes.c_char * entry.nbytes).from_address(buffer.data_ptr() + entry.offset)
    flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(entry.dtype).view(entry.shape)


class StagingPool:
    """``slots`` host buffers laid out by ``plan``, allocated and pre-faulted once."""

    def __init__(self, plan: StagingPlan, slots: int, *, shared: bool = False) -> None:
        self.plan = plan
        self.slots = slots
        self._buffers: list[torch.Tensor] = []
        self._segments: list[Any] = []  # named shared memory, when a writer process maps it
        size = max(plan.total_bytes, ALIGN)
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
                else:
                    buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
                buf.zero_()  # fault every page in now, not during the first save
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


def copy_into(
    views: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    stream: torch.cuda.Stream | None = None,
) -> torch.cuda.Event | None:
    """Copy every live tensor into its slot view.

    CUDA copies are queued first on ``stream`` (ordered after the work already queued on
    the current stream), then CPU tensors are copied on this thread while the GPU works.
    Returns an event that completes with the last CUDA copy, or None if there was none.
    """
    done = None
    with torch.no_grad():
        cuda = [(k, t) for k, t in tensors.items() if t.device.type == "cuda"]
        if cuda:
            assert stream is not None
            ready = torch.cuda.current_stream().record_event()
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                for k, t in cuda:
                    views[k].copy_(t, non_blocking=True)
                done = stream.record_event()
        for k, t in tensors.items():
            if t.device.type == "cpu":
                views[k].copy_(t)
            elif t.device.type != "cuda":
                views[k].copy_(t)  # other accelerators: a plain blocking copy
    return done
