"""Reading a manifest: every field type-checked and bounded before anything trusts it.

``Manifest.from_json`` hands its bytes here.  The input is hostile: a field of the wrong
type, a negative size, an unsafe file name, a tree nested too deep, a checksum that does not
match (``manifest._checksum_matches``) each raise ``CorruptCheckpointError`` naming the file.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .checksum import ALGORITHMS
from .errors import CorruptCheckpointError
from .manifest import (
    FORMAT_NAME,
    ITEMSIZES,
    MAX_MANIFEST_BYTES,
    MAX_PARTS,
    MAX_TREE_DEPTH,
    PART_FLAGS,
    SCHEMA_VERSION,
    Chunk,
    Manifest,
    Part,
    TensorEntry,
    _checksum_matches,
)

__all__ = ["Parser"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]{0,254}$")


class Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"invalid manifest {self.where}: {what}. The checkpoint is damaged or was not "
            "written by asyncckpt; `asyncckpt verify` shows details."
        )

    def get(self, d: dict[str, Any], key: str, typ: type | tuple[type, ...], ctx: str) -> Any:
        if key not in d:
            raise self.fail(f"{ctx}: missing field {key!r}")
        v = d[key]
        if isinstance(v, bool) and typ in (int, float, (int, float)):
            raise self.fail(f"{ctx}.{key}: expected a number, got a bool")
        if not isinstance(v, typ):
            raise self.fail(f"{ctx}.{key}: expected {typ}, got {type(v).__name__}")
        return v

    def nonneg(self, d: dict[str, Any], key: str, ctx: str) -> int:
        v = self.get(d, key, int, ctx)
        if v < 0:
            raise self.fail(f"{ctx}.{key}: negative value {v}")
        return int(v)

    def ints(self, v: Any, ctx: str) -> list[int]:
        if not isinstance(v, list) or len(v) > 64:
            raise self.fail(f"{ctx}: expected a list of at most 64 ints")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise self.fail(f"{ctx}: expected non-negative ints")
        return [int(x) for x in v]

    def filename(self, name: Any, ctx: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
            raise self.fail(f"{ctx}: unsafe file name {name!r} (only plain names inside the step)")
        return name

    def manifest(self, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise self.fail(f"it is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} limit")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise self.fail(f"not valid JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise self.fail("not an asyncckpt manifest (field 'format')")
        # Mandatory: were it optional, one flipped bit in the key's name would switch it off.
        if "checksum" not in doc:
            raise self.fail("it has no 'checksum' field: the manifest was modified or corrupted")
        if not _checksum_matches(data, doc):
            raise self.fail("its checksum does not match its content: the manifest was modified or corrupted")
        version = self.get(doc, "schema_version", int, "manifest")
        if version != SCHEMA_VERSION:
            raise self.fail(
                f"schema_version {version} is not supported (this asyncckpt reads "
                f"{SCHEMA_VERSION}); upgrade asyncckpt"
            )
        files_raw = self.get(doc, "files", dict, "manifest")
        files: dict[str, dict[str, int]] = {}
        for name, info in files_raw.items():
            self.filename(name, "files")
            if not isinstance(info, dict):
                raise self.fail(f"files[{name!r}]: expected an object")
            entry = {"size": self.nonneg(info, "size", f"files[{name!r}]")}
            algo = self.algo(info, f"files[{name!r}]", required=False)
            if algo is not None:
                entry[algo] = self.nonneg(info, algo, f"files[{name!r}]")
            files[name] = entry
        tensors: dict[str, TensorEntry] = {}
        for fqn, t in self.get(doc, "tensors", dict, "manifest").items():
            tensors[fqn] = self.tensor(fqn, t, files)
        metrics = self.get(doc, "metrics", dict, "manifest")
        state = self.get(doc, "state", dict, "manifest")
        for key, node in state.items():
            self.node(node, f"state[{key!r}]", tensors, 0)
        world_size = max(1, self.nonneg(doc, "world_size", "manifest"))
        piece = self.nonneg(doc, "piece", "manifest") if "piece" in doc else None
        if piece is not None and piece >= world_size:
            raise self.fail(f"piece {piece} is not a rank of world size {world_size}")
        return Manifest(
            step=self.nonneg(doc, "step", "manifest"),
            world_size=world_size,
            created_at=float(self.get(doc, "created_at", (int, float), "manifest")),
            tensors=tensors,
            files=files,
            state=state,
            metrics=metrics,
            library_version=str(doc.get("library_version", "")),
            torch_version=str(doc.get("torch_version", "")),
            schema_version=version,
            remote=doc["remote"] if isinstance(doc.get("remote"), str) else None,
            piece=piece,
            selection=self.selection(doc["selection"]) if "selection" in doc else None,
        )

    def algo(self, obj: dict[str, Any], ctx: str, *, required: bool) -> str | None:
        """The one checksum algorithm ``obj`` records (its key), or None if optional and absent."""
        found = [a for a in ALGORITHMS if a in obj]
        if len(found) > 1:
            raise self.fail(f"{ctx}: more than one checksum ({', '.join(found)})")
        if not found and required:
            raise self.fail(f"{ctx}: missing a checksum (one of {', '.join(ALGORITHMS)})")
        return found[0] if found else None

    def codec(self, c: dict[str, Any], ctx: str) -> str | None:
        """A chunk's codec name, if any: checked for form only; an unknown one is refused
        when read, naming what to install or upgrade (codec.decoder)."""
        if "codec" not in c:
            return None
        v = c["codec"]
        if not isinstance(v, str) or not _NAME_RE.match(v):
            raise self.fail(f"{ctx}.codec: expected a codec name, got {v!r}")
        return v

    def selection(self, sel: Any) -> dict[str, Any]:
        if not isinstance(sel, dict):
            raise self.fail("selection: expected an object")
        include = sel.get("include")
        out: dict[str, Any] = {"include": None if include is None else self.patterns(include, "include")}
        out["exclude"] = self.patterns(sel.get("exclude", []), "exclude")
        cast = sel.get("cast")
        if cast is not None and cast not in ITEMSIZES:
            raise self.fail(f"selection.cast: unknown dtype {cast!r}")
        out["cast"] = cast
        return out

    def patterns(self, v: Any, ctx: str) -> list[str]:
        if (
            not isinstance(v, list)
            or len(v) > 10_000
            or not all(isinstance(p, str) and len(p) < 4096 for p in v)
        ):
            raise self.fail(f"selection.{ctx}: expected a list of patterns")
        return list(v)

    def tensor(self, fqn: str, t: Any, files: dict[str, dict[str, int]]) -> TensorEntry:
        ctx = f"tensors[{fqn!r}]"
        if not isinstance(t, dict):
            raise self.fail(f"{ctx}: expected an object")
        dtype = self.get(t, "dtype", str, ctx)
        if dtype not in ITEMSIZES:
            raise self.fail(f"{ctx}: unknown dtype {dtype!r}")
        shape = self.ints(self.get(t, "shape", list, ctx), f"{ctx}.shape")
        itemsize = ITEMSIZES[dtype]
        chunks = []
        for i, c in enumerate(self.get(t, "chunks", list, ctx)):
            cctx = f"{ctx}.chunks[{i}]"
            if not isinstance(c, dict):
                raise self.fail(f"{cctx}: expected an object")
            differential = "parts" in c
            chunk = Chunk(
                offsets=self.ints(self.get(c, "offsets", list, cctx), f"{cctx}.offsets"),
                sizes=self.ints(self.get(c, "sizes", list, cctx), f"{cctx}.sizes"),
                file="" if differential else self.filename(self.get(c, "file", str, cctx), f"{cctx}.file"),
                offset=self.nonneg(c, "offset", cctx),
                length=self.nonneg(c, "length", cctx),
                data_offset=self.nonneg(c, "data_offset", cctx),
                nbytes=self.nonneg(c, "nbytes", cctx),
                crc=0,
                codec=self.codec(c, cctx),
            )
            chunk.algo = self.algo(c, cctx, required=True) or "crc32"
            chunk.crc = self.nonneg(c, chunk.algo, cctx)
            if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
                raise self.fail(f"{cctx}: rank does not match the tensor's shape {shape}")
            if any(o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, shape)):
                raise self.fail(f"{cctx}: chunk lies outside the tensor's shape {shape}")
            numel = 1
            for s in chunk.sizes:
                numel *= s
            if chunk.nbytes != numel * itemsize:
                raise self.fail(f"{cctx}: nbytes {chunk.nbytes} != {numel} x {itemsize}")
            if differential:
                self.parts(c, chunk, cctx)
                chunks.append(chunk)
                continue
            if chunk.file not in files:
                raise self.fail(f"{cctx}: file {chunk.file!r} is not listed in 'files'")
            end = chunk.offset + chunk.length
            if chunk.codec is not None:  # a compressed record: nbytes is its decoded size
                if chunk.data_offset != chunk.offset:
                    raise self.fail(f"{cctx}: a compressed record's data_offset must be its offset")
            elif not (chunk.offset <= chunk.data_offset <= chunk.data_offset + chunk.nbytes <= end):
                raise self.fail(f"{cctx}: data range lies outside its blob")
            if end > files[chunk.file]["size"]:
                raise self.fail(f"{cctx}: blob ends past the end of {chunk.file}")
            chunks.append(chunk)
        return TensorEntry(dtype=dtype, shape=shape, chunks=chunks)

    def parts(self, c: dict[str, Any], chunk: Chunk, ctx: str) -> None:
        """A differential chunk's parts: names, sizes and flags that tile its raw bytes."""
        if chunk.file or c.get("file", "") != "":
            raise self.fail(f"{ctx}: a differential chunk names no file")
        size = self.nonneg(c, "part_size", ctx)
        raw = self.get(c, "parts", list, ctx)
        if size < 1 or len(raw) > MAX_PARTS or len(raw) != -(-chunk.nbytes // size):
            raise self.fail(f"{ctx}: {len(raw)} parts of {size} bytes do not tile {chunk.nbytes} bytes")
        parts = []
        for i, p in enumerate(raw):
            pctx = f"{ctx}.parts[{i}]"
            if (
                not isinstance(p, list)
                or len(p) != 5
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p[1:])
            ):
                raise self.fail(f"{pctx}: expected [name, stored, flags, stored checksum, raw checksum]")
            name = self.filename(p[0], f"{pctx}.name")
            want = min(size, chunk.nbytes - i * size)
            if p[2] not in PART_FLAGS or (p[2] == 0 and p[1] != want) or (p[2] == 1 and chunk.codec is None):
                raise self.fail(f"{pctx}: bad flags or size for a part of {want} bytes")
            parts.append(Part(name, p[1], p[2], p[3], p[4]))
        chunk.parts, chunk.part_size = parts, size

    def node(self, node: Any, ctx: str, tensors: dict[str, TensorEntry], depth: int) -> None:
        if depth > MAX_TREE_DEPTH:
            raise self.fail(f"{ctx}: nested deeper than {MAX_TREE_DEPTH}")
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise self.fail(f"{ctx}: malformed state node")
        kind = node["t"]
        if kind in ("tensor", "ndarray"):
            if node.get("fqn") not in tensors:
                raise self.fail(f"{ctx}: tensor {node.get('fqn')!r} is not in 'tensors'")
        elif kind == "value":
            if "v" not in node:
                raise self.fail(f"{ctx}: value node without 'v'")
        elif kind in ("list", "tuple"):
            for i, child in enumerate(self.get(node, "items", list, ctx)):
                self.node(child, f"{ctx}[{i}]", tensors, depth + 1)
        elif kind == "dict":
            for item in self.get(node, "items", list, ctx):
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or isinstance(item[0], bool)
                    or not isinstance(item[0], (str, int))
                ):
                    raise self.fail(f"{ctx}: malformed dict item")
                self.node(item[1], f"{ctx}[{item[0]!r}]", tensors, depth + 1)
        elif kind == "object":
            self.node(self.get(node, "sd", dict, ctx), f"{ctx}.state_dict", tensors, depth + 1)
        else:
            raise self.fail(f"{ctx}: unknown node type {kind!r}")
