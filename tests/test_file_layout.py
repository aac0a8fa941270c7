"""file_layout.py: a slot holds the shard files byte for byte, page-aligned, headers in place."""

from __future__ import annotations

import io

import pytest
import torch

from asyncckpt.file_layout import BLOB_ALIGN, PAGE, lay_out, split
from asyncckpt.staging import StagingPlan, StagingPool, copy_into
from asyncckpt.writer import slot_bytes


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "emb": torch.randn(300, 17, generator=g),
        "w1": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "w2": torch.randn(64, 64, generator=g).to(torch.bfloat16),  # same dtype and shape as w1
        "b": torch.randn(64, generator=g, dtype=torch.float64),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "mask": torch.rand(33, generator=g) > 0.5,
    }


@pytest.mark.parametrize("n_files", [1, 2, 3, 10])
def test_every_file_image_is_a_run_of_loadable_blobs(n_files):
    tensors = _state()
    plan = StagingPlan.from_tensors(tensors, ("t",), files=n_files)
    pool = StagingPool(plan, 2)
    try:
        assert len(plan.files) == min(n_files, len(tensors))
        seen = set()
        for slot in range(2):
            buf = pool.buffer(slot)
            assert buf.data_ptr() % PAGE == 0  # what O_DIRECT needs
            copy_into(pool.views(slot), tensors)
            for f in plan.files:
                assert f.start % PAGE == 0 and f.padded % PAGE == 0 and f.padded >= f.size
                image = bytes(slot_bytes(buf, f.start, f.padded))
                assert image[f.size :] == bytes(f.padded - f.size)  # zero padding
                pos = 0
                for b in f.blobs:
                    assert b.start >= pos and b.start % BLOB_ALIGN == 0 and b.start - pos < BLOB_ALIGN
                    pos = b.start + b.length
                    loaded = torch.load(io.BytesIO(image[b.start : b.start + b.length]), weights_only=True)
                    assert loaded.dtype == tensors[b.fqn].dtype and torch.equal(loaded, tensors[b.fqn])
                    seen.add(b.fqn)
                assert pos == f.size
        assert seen == set(tensors)
    finally:
        pool.close()


def test_templates_are_built_once_per_dtype_and_shape():
    lay = lay_out([("a", torch.float32, (4, 4)), ("b", torch.float32, (4, 4)), ("c", torch.float32, (4,))], 1)
    assert lay.templates["a"] is lay.templates["b"]
    assert lay.templates["a"] is not lay.templates["c"]


def test_split_balances_sizes_and_keeps_the_state_order_in_each_file():
    sizes = {"a": 100, "b": 10, "c": 90, "d": 5, "e": 1}
    files = split(sizes, 2)
    assert sorted(sum(sizes[k] for k in f) for f in files) == [101, 105]  # greedy, largest first
    for f in files:
        assert f == sorted(f, key=list(sizes).index)


def test_no_tensors_no_files():
    lay = lay_out([], 4)
    assert lay.files == () and lay.total_bytes == 0
