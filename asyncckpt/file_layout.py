"""A snapshot laid out as its shard files: every byte of every file at its final place.

A staging slot is the concatenation of this rank's shard files, each starting on a page
boundary: for every tensor, the ``torch.save`` prefix, the raw bytes (where the trainer copies
the tensor) and the suffix, blobs 64-byte aligned, zero padding up to the next page after
each file.  Prefixes and suffixes depend only on dtype and shape, so they are written into
every slot once, when the pool is allocated; a save copies only the tensors' bytes.  The
writer then writes each file as a few large page-aligned writes straight from the slot
(``O_DIRECT`` where the filesystem takes it), with no pickling and no extra copy, and the
checksum of each blob is one pass over a contiguous range of memory.

The files stay stock-DCP-loadable: DCP reads each blob by its (offset, length); the few
zero bytes between blobs belong to none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .blob import BlobTemplate, TensorSlot, blob_template, host_alias

__all__ = ["PAGE", "BLOB_ALIGN", "BlobPlace", "FileImage", "FileLayout", "lay_out", "round_up"]

PAGE = 4096  # file images start on page boundaries: O_DIRECT's memory and offset alignment
BLOB_ALIGN = 64  # blobs start 64-byte aligned; torch.save aligns the data within a blob to 64


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class BlobPlace:
    """One tensor's blob inside a file: offsets relative to the file's start."""

    fqn: str
    start: int
    length: int
    data_offset: int


@dataclass(frozen=True)
class FileImage:
    """One shard file as it lies in a slot.

    Attributes:
        index: the file's number among this rank's shard files (``layout.shard_filename``).
        start: the slot offset of the file's first byte (a multiple of :data:`PAGE`).
        size: the file's length in bytes.
        blobs: the blobs in file order.
    """

    index: int
    start: int
    size: int
    blobs: tuple[BlobPlace, ...]

    @property
    def padded(self) -> int:
        """The file's length rounded up to a page: what a direct write covers."""
        return round_up(self.size, PAGE)


@dataclass(frozen=True)
class FileLayout:
    """Where every tensor's bytes, and every file's bytes, lie in a slot."""

    entries: tuple[TensorSlot, ...]  # tensor data, in the state's order
    files: tuple[FileImage, ...]
    total_bytes: int
    templates: dict[str, BlobTemplate]  # by fqn; written into each slot once

    def restore(self, buffer: torch.Tensor) -> None:
        """Write every blob's prefix and suffix into slot ``buffer``, and zero the gaps and
        the page padding: every byte of the slot but the tensors' own."""

        def put(at: int, data: bytes) -> None:
            if data:
                buffer[at : at + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

        nbytes = {e.fqn: e.nbytes for e in self.entries}
        for f in self.files:
            pos = 0
            for b in f.blobs:
                t = self.templates[b.fqn]
                buffer[f.start + pos : f.start + b.start].zero_()
                put(f.start + b.start, t.prefix)
                put(f.start + b.data_offset + nbytes[b.fqn], t.suffix)
                pos = b.start + b.length
            buffer[f.start + f.size : f.start + f.padded].zero_()


def split(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Greedy size balancing of tensors into at most ``n`` files, each in the state's order."""
    order = list(sizes)
    bins: list[list[str]] = [[] for _ in range(max(1, min(n, len(order))))]
    totals = [0] * len(bins)
    for fqn in sorted(order, key=lambda k: -sizes[k]):
        i = totals.index(min(totals))
        bins[i].append(fqn)
        totals[i] += sizes[fqn]
    rank = {k: i for i, k in enumerate(order)}
    return [sorted(b, key=rank.__getitem__) for b in bins if b]


def _templates(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...], int]]) -> dict[str, BlobTemplate]:
    """One ``torch.save`` per distinct (dtype, shape), over untouched scratch memory.

    ``torch.save`` needs a tensor of the real size; an uninitialised ``torch.empty`` is
    virtual memory that is only read (the zero page), so no RAM is committed for it.
    """
    cache: dict[tuple[torch.dtype, tuple[int, ...]], BlobTemplate] = {}
    out: dict[str, BlobTemplate] = {}
    scratch: torch.Tensor | None = None
    for fqn, dtype, shape, nbytes in specs:
        key = (dtype, shape)
        if key not in cache:
            if scratch is None or scratch.numel() < nbytes:
                scratch = torch.empty(max(nbytes, BLOB_ALIGN), dtype=torch.uint8)
            cache[key] = blob_template(host_alias(scratch, TensorSlot(fqn, dtype, shape, 0, nbytes)))
        out[fqn] = cache[key]
    return out


def lay_out(
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], n_files: int, data_align: int = BLOB_ALIGN
) -> FileLayout:
    """Lay out tensors ``(fqn, dtype, shape)`` as ``n_files`` (at most) shard file images,
    each tensor's data ``data_align``-aligned (a multiple of 64; :data:`PAGE` lets every
    part of a differential save be written straight from the slot)."""
    nbytes = {fqn: torch.Size(shape).numel() * dtype.itemsize for fqn, dtype, shape in specs}
    meta = {fqn: (dtype, tuple(shape)) for fqn, dtype, shape in specs}
    templates = _templates((fqn, *meta[fqn], nbytes[fqn]) for fqn in meta)
    entries: dict[str, TensorSlot] = {}
    files: list[FileImage] = []
    start = 0
    for index, names in enumerate(split(nbytes, n_files) if specs else []):
        pos, blobs = 0, []
        for fqn in names:
            t = templates[fqn]
            pos = round_up(pos, BLOB_ALIGN)
            if data_align > BLOB_ALIGN:  # the data on the boundary; the blob stays 64-aligned
                pos = round_up(start + pos + len(t.prefix), data_align) - start - len(t.prefix)
            data = pos + len(t.prefix)
            if (start + data) % BLOB_ALIGN:
                raise RuntimeError("torch.save no longer aligns tensor data to 64 bytes")
            length = len(t.prefix) + nbytes[fqn] + len(t.suffix)
            blobs.append(BlobPlace(fqn, pos, length, data))
            entries[fqn] = TensorSlot(fqn, meta[fqn][0], meta[fqn][1], start + data, nbytes[fqn])
            pos += length
        image = FileImage(index, start, pos, tuple(blobs))
        files.append(image)
        start += image.padded
    return FileLayout(tuple(entries[fqn] for fqn in meta), tuple(files), start, templates)
