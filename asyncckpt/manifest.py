"""The manifest: the commit marker and the only proof that a checkpoint exists.

It is plain JSON.  Everything the loader needs (tensor dtypes, shapes, chunk placement,
checksums) comes from here, so the load path never unpickles a file.  ``from_json`` treats its
input as hostile: every field is type-checked and bounded before anything trusts it.
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checksum import ALGORITHMS
from .errors import UnsupportedStateError

if TYPE_CHECKING:
    import torch

    # Built on first use by __getattr__ below, so that reading a manifest (``asyncckpt ls``)
    # does not import torch.
    DTYPES: dict[str, torch.dtype]  # manifest name -> torch dtype, for those this torch has
    DTYPE_NAMES: dict[torch.dtype, str]  # the inverse

SCHEMA_VERSION = 1
FORMAT_NAME = "asyncckpt"
MAX_MANIFEST_BYTES = 256 << 20
MAX_TREE_DEPTH = 128

# Every dtype a manifest may name, with its size in bytes (a test checks these against torch).
ITEMSIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex64": 8, "complex128": 16,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}  # fmt: skip


@functools.cache
def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    names = {n: getattr(torch, n) for n in ITEMSIZES if isinstance(getattr(torch, n, None), torch.dtype)}
    return names, {v: k for k, v in names.items()}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":
        return _torch_dtypes()[0]
    if name == "DTYPE_NAMES":
        return _torch_dtypes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name for ``dtype``; raises TypeError for dtypes it cannot store."""
    try:
        return _torch_dtypes()[1][dtype]
    except KeyError:
        raise UnsupportedStateError(f"tensors of dtype {dtype} cannot be checkpointed") from None


PART_FLAGS = (0, 1)  # a part's stored bytes: 0 raw, 1 compressed by the chunk's codec
MAX_PARTS = 1 << 22


@dataclass(frozen=True)
class Part:
    """One stored piece of a differential chunk: an object in the kind root's chunk store.

    Attributes:
        name: the object's name under ``.chunks/`` (``chunkstore.object_name``).
        stored: its length in bytes.
        flags: 0 raw, 1 compressed by the chunk's codec.
        s_crc: checksum of the stored bytes; r_crc: of the raw bytes (the chunk's ``algo``).
    """

    name: str
    stored: int
    flags: int
    s_crc: int
    r_crc: int

    def entry(self) -> tuple[int, int, int, int]:
        """As a compressed record's index entry (what ``compressed`` checks and decodes)."""
        return self.stored, self.flags, self.s_crc, self.r_crc


@dataclass
class Chunk:
    """One stored piece of a tensor: where it sits in the tensor and in which file."""

    offsets: list[int]
    sizes: list[int]
    file: str
    offset: int  # start of the torch.save blob in the file (what stock DCP reads)
    length: int  # length of that blob
    data_offset: int  # absolute file offset of the raw little-endian bytes inside the blob
    nbytes: int
    crc: int  # of the whole blob [offset, offset + length), by ``algo``
    algo: str = "crc32"  # checksum.ALGORITHMS; the JSON key of ``crc``
    # a compressed record (compressed.py) of this codec instead of a torch.save blob: then
    # ``data_offset == offset`` and ``nbytes`` is the decoded size; absent from plain chunks
    codec: str | None = None
    # a differential chunk: the raw bytes cut at ``part_size``, each part an object of the
    # chunk store (chunkstore.py); then ``file`` is "" and ``crc`` 0 (each part has its own)
    parts: list[Part] | None = None
    part_size: int = 0

    def to_json(self) -> dict[str, Any]:
        skip = ("crc", "algo", "codec", "parts", "part_size")
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        out[self.algo] = self.crc
        if self.codec is not None:
            out["codec"] = self.codec
        if self.parts is not None:
            out["part_size"] = self.part_size
            out["parts"] = [[p.name, p.stored, p.flags, p.s_crc, p.r_crc] for p in self.parts]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Chunk:
        """The inverse of :meth:`to_json` for trusted input (a rank's own done record)."""
        fields = dict(d)
        algo = next(a for a in ALGORITHMS if a in fields)
        if "parts" in fields:
            fields["parts"] = [Part(*p) for p in fields["parts"]]
        return cls(**{k: v for k, v in fields.items() if k not in ALGORITHMS}, crc=fields[algo], algo=algo)


@dataclass
class TensorEntry:
    """A tensor's global dtype and shape, and the chunks that tile it."""

    dtype: str
    shape: list[int]
    chunks: list[Chunk]

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return _torch_dtypes()[0][self.dtype]
        except KeyError:  # a newer torch wrote it
            import torch

            raise UnsupportedStateError(
                f"dtype {self.dtype} is not available in torch {torch.__version__}; upgrade torch to load it"
            ) from None


@dataclass
class Manifest:
    """Everything recorded about one committed step."""

    step: int
    world_size: int
    created_at: float
    tensors: dict[str, TensorEntry]
    files: dict[str, dict[str, int]]
    state: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""
    torch_version: str = ""
    schema_version: int = SCHEMA_VERSION
    remote: str | None = None  # with a local-first tier: where this step is uploaded
    # several ranks with a local-first tier: this local step holds only this rank's shards,
    # committed on the remote root together with the other ranks' (never loaded by itself)
    piece: int | None = None
    # what a selective save covered: {"include": [patterns] | None, "exclude": [patterns],
    # "cast": saved float dtype | None}; None for a checkpoint of everything
    selection: dict[str, Any] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "step": self.step,
            "world_size": self.world_size,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "library_version": self.library_version,
            "torch_version": self.torch_version,
            "files": self.files,
            "tensors": {
                k: {"dtype": t.dtype, "shape": t.shape, "chunks": [c.to_json() for c in t.chunks]}
                for k, t in self.tensors.items()
            },
            "state": self.state,
        }
        if self.remote is not None:
            doc["remote"] = self.remote
        if self.piece is not None:
            doc["piece"] = self.piece
        if self.selection is not None:
            doc["selection"] = self.selection
        # one encoding pass: the checksum goes last, so the document is the body's canonical
        # text with the field appended (what json.dumps(doc | {"checksum": crc}, indent=1) gives)
        body = _canonical(doc)
        return body[:-2] + _CHECKSUM_FIELD + str(zlib.crc32(body)).encode() + b"\n}"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate; any problem raises CorruptCheckpointError naming ``where``."""
        from .manifest_parse import Parser  # the validator; it builds these classes

        return Parser(where).manifest(data)


_CHECKSUM_FIELD = b',\n "checksum": '


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=1, allow_nan=True).encode()


def _checksum_matches(data: bytes, doc: dict[str, Any]) -> bool:
    """Whether the manifest's ``checksum`` is the crc32 of its canonical JSON without that field.

    Shard checksums cover the data; this covers the manifest itself, so a flipped digit in
    a shape, an offset or a plain value is caught rather than loaded.  A manifest as
    ``to_json`` writes it is its body's canonical text with the field appended, so the check
    is one crc32 of the bytes read; any other layout is re-encoded (the pure-Python indented
    encoder, about 10x slower: 9 ms for 64 tensors, on a thread that shares the trainer's GIL).
    """
    crc = doc["checksum"]
    if type(crc) is not int:
        return False
    cut = data.rfind(_CHECKSUM_FIELD)
    if cut > 0 and data[cut + len(_CHECKSUM_FIELD) :] == str(crc).encode() + b"\n}":
        if zlib.crc32(b"\n}", zlib.crc32(memoryview(data)[:cut])) == crc:  # no copy of the body
            return True
    return _self_checksum(doc) == crc


def _self_checksum(doc: dict[str, Any]) -> int:
    """crc32 of ``doc``'s canonical JSON without its ``checksum`` field, whatever its layout."""
    return zlib.crc32(_canonical({k: v for k, v in doc.items() if k != "checksum"}))
