"""staging.py: the reused host pool, the copy into it, overlap and its optimizer hook."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from asyncckpt.blob import host_alias
from asyncckpt.errors import StagingError
from asyncckpt.file_layout import BLOB_ALIGN, PAGE
from asyncckpt.options import StagingOptions
from asyncckpt.staging import Lease, Stager, StagingPlan, StagingPool, copy_into
from asyncckpt.state import flatten_state


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _state() -> dict:
    torch.manual_seed(0)
    return {
        "model": torch.nn.Linear(5, 3),
        "t": {
            "bf16": torch.randn(4, 4).to(torch.bfloat16),
            "ints": torch.arange(7, dtype=torch.int16),
            "mask": torch.tensor([True, False, True]),
            "c": torch.randn(2, dtype=torch.complex64),
            "empty": torch.empty(0, 3),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "strided": torch.arange(24.0).reshape(4, 6)[:, ::2],  # not contiguous
        },
        "epoch": 2,
    }


def _plan(tensors: dict[str, torch.Tensor], cast: torch.dtype | None = None) -> StagingPlan:
    return StagingPlan.from_tensors(tensors, signature=tuple(tensors), cast=cast)


# --------------------------------------------------------------------------- plan and pool


def test_plan_lays_out_aligned_entries():
    flat = flatten_state(_state())
    plan = _plan(flat.tensors)
    assert [e.fqn for e in plan.entries] == list(flat.tensors)
    for e in plan.entries:
        t = flat.tensors[e.fqn]
        assert e.offset % BLOB_ALIGN == 0
        assert (e.dtype, e.shape, e.nbytes) == (t.dtype, tuple(t.shape), t.numel() * t.element_size())
    by_offset = sorted(plan.entries, key=lambda e: e.offset)
    ends = [e.offset + e.nbytes for e in by_offset]
    assert all(end <= nxt.offset for end, nxt in zip(ends, by_offset[1:], strict=False))
    assert plan.total_bytes >= ends[-1] and plan.total_bytes % PAGE == 0
    assert not plan.needs_pinned  # CPU state


def test_pool_allocates_views_and_hands_out_slots():
    flat = flatten_state(_state())
    pool = StagingPool(_plan(flat.tensors), 2)
    assert pool.nbytes == 2 * pool.plan.total_bytes
    assert pool.shm_names() is None
    for slot in (0, 1):
        assert pool.buffer(slot).dtype == torch.uint8
        views = pool.views(slot)
        for fqn, t in flat.tensors.items():
            assert views[fqn].dtype == t.dtype and views[fqn].shape == t.shape
            assert torch.count_nonzero(views[fqn].view(-1).view(torch.uint8)) == 0  # zero-filled
        # around the tensors: the blobs' headers, written once (file_layout)
        assert torch.count_nonzero(pool.buffer(slot)) > 0
    # two slots' views never share memory
    assert pool.buffer(0).data_ptr() != pool.buffer(1).data_ptr()

    assert pool.idle()
    a = pool.acquire()
    b = pool.acquire()
    assert {a, b} == {0, 1}
    assert not pool.idle()
    assert pool.acquire(block=False) is None
    t0 = time.monotonic()
    assert pool.acquire(timeout=0.05) is None
    assert time.monotonic() - t0 >= 0.04
    assert not pool.wait_idle(timeout=0.05)
    pool.release(a)
    pool.release(a)  # idempotent
    assert pool.acquire(block=False) == a
    pool.release(a)
    pool.release(b)
    assert pool.wait_idle(timeout=1) and pool.idle()
    pool.close()


def test_acquire_waits_for_a_release_from_another_thread():
    pool = StagingPool(_plan({"x": torch.zeros(4)}), 1)
    slot = pool.acquire()
    threading.Timer(0.1, pool.release, args=(slot,)).start()
    t0 = time.monotonic()
    assert pool.acquire(timeout=10) == slot
    assert 0.05 < time.monotonic() - t0 < 5
    pool.release(slot)
    assert pool.wait_idle(timeout=1)
    pool.close()


def test_shared_pool_has_named_segments_and_unlinks_them():
    pool = StagingPool(_plan({"x": torch.arange(10.0)}), 2, shared=True)
    names = pool.shm_names()
    assert names is not None and len(names) == 2
    copy_into(pool.views(1), {"x": torch.arange(10.0)})
    assert torch.equal(pool.views(1)["x"], torch.arange(10.0))
    pool.close()
    from multiprocessing import shared_memory

    for n in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=n)


def test_copy_into_and_host_alias_are_exact():
    flat = flatten_state(_state())
    plan = _plan(flat.tensors)
    pool = StagingPool(plan, 1)
    assert copy_into(pool.views(0), flat.tensors) is None  # no CUDA: no event
    for e in plan.entries:
        alias = host_alias(pool.buffer(0), e)
        assert _raw(alias) == _raw(flat.tensors[e.fqn]), e.fqn
        if e.nbytes:  # its own storage is exactly the tensor's bytes, over the slot's memory
            assert alias.untyped_storage().nbytes() == e.nbytes
            assert alias.data_ptr() == pool.buffer(0).data_ptr() + e.offset
    pool.close()


# --------------------------------------------------------------------------- Stager


@pytest.fixture
def stagers():
    made: list[Stager] = []

    def make(dtype: torch.dtype | None = None, **opts) -> Stager:
        s = Stager(StagingOptions(**opts), shared=False, dtype=dtype)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.pool is not None:
            for slot in range(s.pool.slots):
                s.pool.release(slot)
        s.close()


def test_stage_copies_exact_bytes_and_the_caller_may_mutate(stagers):
    state = _state()
    flat = flatten_state(state)
    before = {k: _raw(v) for k, v in flat.tensors.items()}
    stager = stagers()
    lease = stager.stage(flat, 1)
    assert isinstance(lease, Lease)
    assert lease.staged.done() and lease.staged.result() is None  # at once without overlap
    assert lease.generation == 1 and lease.slot_wait_s >= 0 and lease.staging_s >= 0
    with torch.no_grad():
        for t in flat.tensors.values():
            if t.numel() and t.dtype.is_floating_point:
                t.add_(1)  # the snapshot is a copy, never an alias
    views = lease.pool.views(lease.slot)
    for k, raw in before.items():
        assert _raw(views[k]) == raw, k
    assert lease.buffer.data_ptr() == lease.pool.buffer(lease.slot).data_ptr()
    lease.release()
    lease.release()  # idempotent
    assert lease.pool.idle()


def test_on_busy_skip_returns_none_when_every_slot_is_taken(stagers):
    flat = flatten_state(_state())
    stager = stagers(max_inflight=2, on_busy="skip")
    a = stager.stage(flat, 1)
    b = stager.stage(flat, 2)
    assert a is not None and b is not None and a.slot != b.slot
    assert stager.stage(flat, 3) is None
    b.release()
    c = stager.stage(flat, 4)
    assert c is not None and c.slot == b.slot
    a.release()
    c.release()


def test_on_busy_wait_blocks_until_a_release(stagers):
    flat = flatten_state(_state())
    stager = stagers(max_inflight=1, on_busy="wait")
    a = stager.stage(flat, 1)
    threading.Timer(0.1, a.release).start()
    t0 = time.monotonic()
    b = stager.stage(flat, 2)
    assert b is not None and b.slot == a.slot
    assert b.slot_wait_s >= 0.05 and time.monotonic() - t0 >= 0.05
    b.release()


def test_pool_is_reused_for_the_same_structure_and_replanned_when_it_changes(stagers):
    state = _state()
    stager = stagers()
    pool = stager.ensure(flatten_state(state))
    assert stager.generation == 1
    state["model"].weight.data.mul_(2)  # new values, same structure
    lease = stager.stage(flatten_state(state), 1)
    assert stager.pool is pool and lease.generation == 1
    lease.release()

    # an optimizer that gains state changes the structure
    opt = torch.optim.Adam(state["model"].parameters())
    state["optim"] = opt
    stager.stage(flatten_state(state), 2).release()  # no moments yet: plain values only
    assert stager.pool is pool and stager.generation == 1
    state["model"](torch.randn(2, 5)).sum().backward()
    opt.step()
    flat = flatten_state(state)
    held = stager.stage(flat, 3)
    assert stager.pool is not pool
    assert stager.generation == 2 and held.generation == 2
    pool3 = stager.pool

    # a re-plan waits for the saves in flight to release their slots
    state["t"]["new"] = torch.ones(2)
    done = threading.Event()
    result: list = []

    def replan() -> None:
        result.append(stager.stage(flatten_state(state), 4))
        done.set()

    threading.Thread(target=replan, daemon=True).start()
    assert not done.wait(0.2), "re-planned while a slot was still in use"
    # the held slot's bytes are intact while we wait
    assert _raw(held.pool.views(held.slot)["optim.state.0.exp_avg"]) == _raw(
        flat.tensors["optim.state.0.exp_avg"]
    )
    held.release()
    assert done.wait(10)
    (new,) = result
    assert stager.pool is not pool3 and new.generation == 3 and stager.generation == 3
    assert "t.new" in new.pool.views(new.slot)
    new.release()


def test_dtype_cast_stages_a_cast_copy_and_leaves_the_live_state(stagers):
    state = _state()
    flat = flatten_state(state)
    live = {k: (v.dtype, _raw(v)) for k, v in flat.tensors.items()}
    stager = stagers(dtype=torch.bfloat16)
    lease = stager.stage(flat, 1)
    entries = {e.fqn: e for e in lease.pool.plan.entries}
    views = lease.pool.views(lease.slot)
    for fqn, t in flat.tensors.items():
        if t.dtype in (torch.float32, torch.float64, torch.bfloat16) and t.dim() > 0:
            assert entries[fqn].dtype == torch.bfloat16, fqn
            assert entries[fqn].nbytes == t.numel() * 2
            assert _raw(views[fqn]) == _raw(t.to(torch.bfloat16)), fqn
        else:  # ints, bools, complex, and scalars (a step count must stay exact): as they are
            assert entries[fqn].dtype == t.dtype, fqn
            assert _raw(views[fqn]) == _raw(t), fqn
    for fqn, t in flat.tensors.items():
        assert (t.dtype, _raw(t)) == live[fqn], fqn
    lease.release()


def test_cast_never_widens():
    tensors = {
        "h": torch.ones(2, dtype=torch.bfloat16),
        "f": torch.ones(2),
        "i": torch.ones(2, dtype=torch.int32),
    }
    plan = _plan(tensors, cast=torch.float32)
    assert {e.fqn: e.dtype for e in plan.entries} == {
        "h": torch.bfloat16,
        "f": torch.float32,
        "i": torch.int32,
    }


def _mismatched(planned: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]):
    """A flat state that claims ``planned``'s structure but holds ``actual``: the copy fails."""
    flat = flatten_state(actual)
    sig = flatten_state(planned).signature()
    flat.signature = lambda: sig  # type: ignore[method-assign]
    return flat


def test_a_failed_copy_releases_the_slot_and_raises_staging_error(stagers):
    stager = stagers()
    stager.ensure(flatten_state({"x": torch.zeros(4)}))
    with pytest.raises(StagingError, match="step 7"):
        stager.stage(_mismatched({"x": torch.zeros(4)}, {"x": torch.zeros(5)}), 7)
    assert stager.pool.idle()


# --------------------------------------------------------------------------- overlap


def test_overlap_staged_resolves(stagers):
    flat = flatten_state(_state())
    stager = stagers(overlap=True)
    lease = stager.stage(flat, 1)
    assert lease.staged.result(timeout=10) is None
    for k, t in flat.tensors.items():
        assert _raw(lease.pool.views(lease.slot)[k]) == _raw(t), k
    lease.release()


def _big_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 4096, bias=False)  # 16 MiB: the copy takes a while
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.ones_like(model.weight)
    return model, opt


@pytest.mark.parametrize("which", ["in_state", "other"])
def test_overlap_hook_blocks_an_optimizer_step_until_the_copy_finished(stagers, which):
    """Mutation test: step SGD right after stage(); the slot holds the pre-step values.

    The hook is global: an optimizer that is not part of the checkpointed state is held too.
    """
    model, opt = _big_model()
    state = {"model": model} if which == "other" else {"model": model, "optim": opt}
    before = model.weight.detach().clone()
    stager = stagers(overlap=True)
    for step in range(3):
        flat = flatten_state(state)
        expected = model.weight.detach().clone()
        lease = stager.stage(flat, step)
        opt.step()  # at once: the pre-hook must wait for the copy
        assert lease.staged.done()
        assert torch.equal(lease.pool.views(lease.slot)["model.weight"], expected)
        lease.release()
    assert torch.allclose(model.weight, before - 3)  # the steps did happen


def _global_pre_hooks() -> int:
    import sys

    hooks = getattr(sys.modules["torch.optim.optimizer"], "_global_optimizer_pre_hooks", None)
    if hooks is None:
        pytest.skip("this torch keeps its global optimizer hooks elsewhere")
    return len(hooks)


def test_overlap_hook_is_registered_once_and_removed_by_close():
    n = _global_pre_hooks()
    plain = Stager(StagingOptions(), shared=False, dtype=None)
    assert _global_pre_hooks() == n  # only overlap needs the hook
    stager = Stager(StagingOptions(overlap=True), shared=False, dtype=None)
    assert _global_pre_hooks() == n + 1
    stager.close()
    stager.close()  # idempotent
    plain.close()
    assert _global_pre_hooks() == n


def test_overlap_copy_error_surfaces_through_staged(stagers):
    stager = stagers(overlap=True)
    stager.ensure(flatten_state({"x": torch.zeros(4)}))
    lease = stager.stage(_mismatched({"x": torch.zeros(4)}, {"x": torch.zeros(5)}), 3)
    with pytest.raises(StagingError, match="step 3"):
        lease.staged.result(timeout=10)
    lease.release()
    # an optimizer step after a failed copy does not hang
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    torch.optim.SGD([p], lr=1.0).step()
