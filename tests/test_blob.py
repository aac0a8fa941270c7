"""blob.py: the DCP-compatible byte format of one tensor, written and read back."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from asyncckpt.blob import blob_template, dcp_metadata, raw_bytes, read_chunk_into
from asyncckpt.checksum import DEFAULT, checksum
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.manifest import Chunk, TensorEntry, dtype_name
from asyncckpt.staging import StagingPlan, StagingPool, copy_into
from asyncckpt.writer import slot_bytes


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f64_1d": torch.randn(7, generator=g, dtype=torch.float64),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "f16_3d": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "bool": torch.rand(9, generator=g) > 0.5,
        "complex64": torch.randn(3, 2, generator=g, dtype=torch.complex64),
        "int64": torch.arange(-5, 6, dtype=torch.int64),
        "uint8": torch.arange(0, 200, 7, dtype=torch.uint8),
        "int8_scalar": torch.tensor(-3, dtype=torch.int8),
        "f32_scalar": torch.tensor(2.5),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(3, 0, dtype=torch.bfloat16),
        "empty_bool": torch.empty(0, 4, dtype=torch.bool),
        # NaN payloads and negative zero must survive bit for bit
        "special": torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")]),
    }


CASES = sorted(_tensors())


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert _raw(a) == _raw(b)


def _blob(t: torch.Tensor) -> bytes:
    # built once per dtype and shape, from other data (a fresh tensor: its storage is exactly
    # its bytes), then reused around any tensor's raw bytes
    tpl = blob_template(torch.zeros_like(t).contiguous())
    return tpl.prefix + _raw(t) + tpl.suffix


@pytest.mark.parametrize("name", CASES)
def test_template_around_raw_bytes_is_a_torch_save_file(tmp_path, name):
    t = _tensors()[name]
    path = tmp_path / f"{name}.pt"
    path.write_bytes(_blob(t))
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, torch.Tensor)
    _bits_equal(loaded, t)


def test_template_prefix_depends_only_on_dtype_and_shape():
    a = blob_template(torch.zeros(4, 3))
    b = blob_template(torch.full((4, 3), 7.0))
    # the suffix differs (torch.save's random serialization id, and the zip data
    # descriptor's crc of the template's own data), never its length
    assert a.prefix == b.prefix and len(a.suffix) == len(b.suffix)
    c = blob_template(torch.zeros(3, 4))
    d = blob_template(torch.zeros(4, 3, dtype=torch.float64))
    assert c.prefix != a.prefix and d.prefix != a.prefix


def _staged(tensors: dict[str, torch.Tensor]) -> tuple[StagingPool, StagingPlan]:
    plan = StagingPlan.from_tensors(tensors, signature=("blob-test",))
    pool = StagingPool(plan, 1)
    copy_into(pool.views(0), tensors)
    return pool, plan


def _write_shard(path, tensors):
    """A shard file as the writer makes it: the slot's file image, with chunks describing it
    (shifted by a few bytes, so the first blob does not start at offset 0)."""
    pool, plan = _staged(tensors)
    (f,) = plan.files
    image = bytes(slot_bytes(pool.buffer(0), f.start, f.size))
    shift = 12
    data = b"HEAD" * 3 + image
    entries = {e.fqn: e for e in plan.entries}
    chunks = {}
    for b in f.blobs:
        e = entries[b.fqn]
        assert e.offset == f.start + b.data_offset  # the tensor's view is the file's data bytes
        chunks[e.fqn] = Chunk(
            offsets=[0] * len(e.shape),
            sizes=list(e.shape),
            file=path.name,
            offset=shift + b.start,
            length=b.length,
            data_offset=shift + b.data_offset,
            nbytes=e.nbytes,
            crc=checksum(DEFAULT, image[b.start : b.start + b.length]),
            algo=DEFAULT,
        )
    path.write_bytes(data)
    pool.close()
    return chunks


def test_a_slot_file_image_holds_blobs_that_each_load(tmp_path):
    tensors = _tensors()
    path = tmp_path / "__0_0.distcp"
    chunks = _write_shard(path, tensors)
    data = path.read_bytes()
    for fqn, c in chunks.items():
        loaded = torch.load(io.BytesIO(data[c.offset : c.offset + c.length]), weights_only=True)
        _bits_equal(loaded, tensors[fqn])
        # the raw bytes sit where the chunk says
        assert data[c.data_offset : c.data_offset + c.nbytes] == _raw(tensors[fqn])


def test_raw_bytes_is_a_view_of_the_slot():
    tensors = {"a": torch.arange(10, dtype=torch.int32), "z": torch.empty(0)}
    pool, plan = _staged(tensors)
    a, z = plan.entries
    assert bytes(raw_bytes(pool.buffer(0), a)) == _raw(tensors["a"])
    assert bytes(raw_bytes(pool.buffer(0), z)) == b""
    pool.views(0)["a"][0] = 99  # zero-copy: a later change of the slot shows through
    assert bytes(raw_bytes(pool.buffer(0), a))[:4] == (99).to_bytes(4, "little")
    pool.close()


def test_read_chunk_into_reads_bit_exactly(tmp_path):
    tensors = _tensors()
    path = tmp_path / "__0_0.distcp"
    chunks = _write_shard(path, tensors)
    with open(path, "rb") as f:
        for fqn in reversed(list(chunks)):  # any order: each read seeks
            t = tensors[fqn]
            out = torch.empty(t.shape, dtype=t.dtype)
            read_chunk_into(f, chunks[fqn], out, str(path))
            _bits_equal(out, t)


def test_read_chunk_into_rejects_a_bad_target(tmp_path):
    tensors = {"w": torch.randn(4, 4)}
    path = tmp_path / "s"
    chunks = _write_shard(path, tensors)
    with open(path, "rb") as f:
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            read_chunk_into(f, chunks["w"], torch.empty(4, 3), "x")
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            read_chunk_into(f, chunks["w"], torch.empty(4, 8)[:, ::2], "x")


@pytest.mark.parametrize("where", ["prefix", "data", "suffix"])
def test_read_chunk_into_detects_a_flipped_byte(tmp_path, where):
    tensors = {"a": torch.randn(16), "b": torch.randn(5, 5).to(torch.bfloat16)}
    path = tmp_path / "s"
    chunks = _write_shard(path, tensors)
    c = chunks["b"]
    pos = {
        "prefix": c.offset + 10,
        "data": c.data_offset + c.nbytes // 2,
        "suffix": c.data_offset + c.nbytes + 3,
    }[where]
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with open(path, "rb") as f:
        out = torch.empty(5, 5, dtype=torch.bfloat16)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            read_chunk_into(f, c, out, str(path))
        # the other blob is untouched and still reads
        a = torch.empty(16)
        read_chunk_into(f, chunks["a"], a, str(path))
        _bits_equal(a, tensors["a"])


@pytest.mark.parametrize("cut", ["in_data", "in_suffix", "before_blob"])
def test_read_chunk_into_detects_a_truncated_file(tmp_path, cut):
    tensors = {"a": torch.randn(8), "b": torch.randn(64)}
    path = tmp_path / "s"
    chunks = _write_shard(path, tensors)
    c = chunks["b"]
    size = {
        "in_data": c.data_offset + 10,
        "in_suffix": c.offset + c.length - 1,
        "before_blob": c.offset - 1,
    }[cut]
    with open(path, "r+b") as f:
        f.truncate(size)
    with open(path, "rb") as f:
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            read_chunk_into(f, c, torch.empty(64), str(path))


def _entries(tensors: dict[str, torch.Tensor], file: str = "__0_0.distcp") -> dict[str, TensorEntry]:
    out, off = {}, 0
    for fqn, t in tensors.items():
        n = t.numel() * t.element_size()
        chunk = Chunk([0] * t.dim(), list(t.shape), file, off, n + 100, off + 50, n, 0)
        out[fqn] = TensorEntry(dtype_name(t.dtype), list(t.shape), [chunk])
        off += n + 100
    return out


def test_dcp_metadata_without_paths_is_the_readers_view():
    tensors = {"model.w": torch.zeros(3, 4, dtype=torch.bfloat16), "step": torch.tensor(5)}
    md = dcp_metadata(_entries(tensors))
    assert isinstance(md, Metadata)
    assert set(md.state_dict_metadata) == set(tensors)
    w = md.state_dict_metadata["model.w"]
    assert isinstance(w, TensorStorageMetadata)
    assert w.properties.dtype == torch.bfloat16
    assert w.size == torch.Size([3, 4])
    assert [(list(c.offsets), list(c.sizes)) for c in w.chunks] == [([0, 0], [3, 4])]
    assert md.state_dict_metadata["step"].size == torch.Size([])
    assert md.planner_data is None
    assert md.storage_data is None


def test_dcp_metadata_with_paths_is_the_stock_metadata():
    tensors = {"model.w": torch.zeros(3, 4), "extra.t": torch.zeros(2, dtype=torch.int64)}
    entries = _entries(tensors)
    md = dcp_metadata(entries, {"model.w": ("model", "w")})
    # planner paths: given ones as given, the others as the fqn itself
    assert md.planner_data == {"model.w": ("model", "w"), "extra.t": ("extra.t",)}
    assert md.storage_meta is not None and md.storage_meta.save_id
    assert len(md.storage_data) == 2
    for fqn, e in entries.items():
        c = e.chunks[0]
        info = md.storage_data[MetadataIndex(fqn, c.offsets, 0)]
        # stock DCP reads the whole blob: [offset, offset + length)
        assert (info.relative_path, info.offset, info.length) == (c.file, c.offset, c.length)
    # two calls never share a save id
    assert dcp_metadata(entries, {}).storage_meta.save_id != md.storage_meta.save_id
