"""CUDA state: pinned staging, side-stream copies, overlap, resume, FSDP2. Skipped without a GPU.

Every test goes through the public API only.  Values are compared as raw bytes, so NaN
payloads, negative zeros and fp8 patterns must survive bit for bit.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

import asyncckpt
from asyncckpt import AsyncCheckpointer, resume

pytestmark = pytest.mark.gpu

DEVICE = "cuda"  # every tensor below lives here

FP8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, *FP8]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A copy of the tensor's bytes on the CPU (DTensors gathered first)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    t = t.detach().contiguous().cpu().reshape(-1)
    return (t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)).clone()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw(a), _raw(b))


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (floats include NaNs and infinities), on DEVICE."""
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, device=DEVICE).bool().reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    bits = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g, device=DEVICE)
    return bits.view(dtype).reshape(shape)


def _zeros_like(t: torch.Tensor) -> torch.Tensor:
    """All-zero bytes of the same dtype/shape/device (fill kernels may lack fp8)."""
    if t.dtype == torch.bool:
        return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    z = torch.zeros(t.numel() * t.element_size(), dtype=torch.uint8, device=t.device)
    return z.view(t.dtype).reshape(t.shape)


def _dtype_state(seed: int = 0) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = [(1 << 16,), (257, 129), (3, 5, 7), ()]  # large, odd, 3-d, 0-d
    return {
        "w": {
            f"{str(dt).removeprefix('torch.')}_{i}": _random(shape, dt, g)
            for dt in DTYPES
            for i, shape in enumerate(shapes)
        },
        "extra": {"epoch": 3},
    }


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Device-side clones, queued on the current stream: no host synchronisation."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def _host_pinned_bytes() -> int | None:
    """Bytes the CUDA pinned-memory allocator has handed out, where torch reports it."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    try:
        return stats().get("active_bytes.current")
    except RuntimeError:
        return None


def _model(seed: int, width: int = 1024, depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).to(DEVICE)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, width: int) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(1000 + step)
    x = torch.randn(64, width, device=DEVICE, generator=g)
    opt.zero_grad(set_to_none=True)
    model(x).float().pow(2).mean().backward()
    opt.step()


def _model_and_optim_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{idx}.{name}"] = v
    return out


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_every_dtype_round_trips_bit_exact(root: str, executor: str) -> None:
    state = _dtype_state()
    expected = {k: _raw(v) for k, v in state["w"].items()}
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        ck.save_async(5).result()
    fresh = {"w": {k: _zeros_like(v) for k, v in state["w"].items()}, "extra": {"epoch": 0}}
    assert resume(root, fresh) == 5
    assert fresh["extra"]["epoch"] == 3
    for k, v in fresh["w"].items():
        assert v.device.type == DEVICE and v.dtype == state["w"][k].dtype, k
        assert torch.equal(_raw(v), expected[k]), k


def test_thread_executor_stages_into_pinned_memory(root: str) -> None:
    """The staging buffers come from the CUDA pinned allocator (so the D2H copy is async)."""
    state = {"w": {f"t{i}": torch.ones(1 << 20, device=DEVICE) for i in range(8)}}  # 32 MiB
    nbytes = sum(t.numel() * t.element_size() for t in state["w"].values())
    torch.cuda.synchronize()
    before = _host_pinned_bytes()
    if before is None:
        pytest.skip("this torch does not report pinned host memory (torch.cuda.host_memory_stats)")
    with AsyncCheckpointer(root, state, executor="thread", max_inflight=2) as ck:
        ck.save_async(0).result()
        after = _host_pinned_bytes()
        assert after is not None and after - before >= 2 * nbytes, (before, after, nbytes)


def test_write_during_copy_writes_what_the_gpu_has_copied(root: str) -> None:
    """With write_during_copy, CUDA copies are marked in ~32 MiB runs as the DMA completes: the
    writer is let at the slot's first bytes before the copy (the stall) ends, and what it
    writes is the snapshot, not the state mutated right after save_async."""
    from asyncckpt import StorageOptions, WriterOptions
    from asyncckpt.storage import LocalStorage

    class ReadyTimes(LocalStorage):
        def __init__(self) -> None:
            super().__init__()
            self.released: list[float] = []

        def write_file(self, path, data, size, pace=None, ready=None):  # type: ignore[no-untyped-def]
            def timed(n: int) -> None:
                ready(n)
                self.released.append(time.perf_counter())

            super().write_file(path, data, size, pace, timed if ready is not None else None)

    g = torch.Generator(device=DEVICE).manual_seed(5)
    state = {"w": {f"t{i}": torch.randn(32 << 20, device=DEVICE, generator=g) for i in range(16)}}  # 2 GiB
    storage = ReadyTimes()
    writer = WriterOptions(write_during_copy=True)
    with AsyncCheckpointer(root, state, writer=writer, storage=StorageOptions(backend=storage)) as ck:
        ck.save_async(0, force=True).result()  # allocate and warm up
        storage.released.clear()
        want = {k: _raw(v) for k, v in state["w"].items()}
        h = ck.save_async(1, force=True)
        returned = time.perf_counter()
        for t in state["w"].values():
            t.add_(1)
        h.result()
    assert storage.released and storage.released[0] < returned  # a piece went before the copy ended
    got = {"w": {k: torch.zeros_like(v) for k, v in state["w"].items()}}
    assert resume(root, got, step=1) == 1
    for k, v in got["w"].items():
        assert torch.equal(_raw(v), want[k]), k


# ---------------------------------------------------------------------------- mutation


@pytest.mark.parametrize("executor", ["thread", "process"])
@pytest.mark.parametrize("overlap", [False, True])
def test_mutation_right_after_save_async_keeps_old_values(root: str, executor: str, overlap: bool) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    state = {"w": {f"t{i}": torch.randn(1 << 20, device=DEVICE, generator=g) for i in range(8)}}
    checked = (0, 7, 19)
    expected = {}
    with AsyncCheckpointer(root, state, overlap=overlap, executor=executor, max_inflight=2) as ck:
        for step in range(20):
            if step in checked:
                expected[step] = _snapshot(state["w"])
            ck.save_async(step)
            if overlap:
                ck.wait_staged()  # without an optimizer step, wait_staged is the protection
            for t in state["w"].values():
                t.mul_(1.5).add_(1)  # queued on the compute stream right after the call returns
        ck.wait()
    for step in checked:
        fresh = {"w": {k: torch.zeros_like(v) for k, v in state["w"].items()}}
        assert resume(root, fresh, step=step) == step
        for k, v in fresh["w"].items():
            assert v.device.type == DEVICE
            assert _same(v, expected[step][k]), (step, k)


# ---------------------------------------------------------------------------- overlap


@pytest.mark.parametrize("executor", ["thread", "process"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_overlap_adamw_step_right_after_save_async(root: str, executor: str, fused: bool) -> None:
    """An optimizer step issued straight after save_async must not leak into the snapshot.

    Non-fused AdamW keeps its step counters on the CPU (a mixed state: the hook waits for the
    copy); fused AdamW keeps them on the GPU (the hook only makes the compute stream wait).
    """
    width = 1024
    model = _model(0, width)
    kw = {"fused": True} if fused and DEVICE == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)
    _train_step(model, opt, 0, width)  # the optimizer state exists before the pool is planned
    state = {"model": model, "optim": opt}
    expected = {}
    with AsyncCheckpointer(root, state, overlap=True, executor=executor, max_inflight=2) as ck:
        for step in range(1, 6):
            g = torch.Generator(device=DEVICE).manual_seed(step)
            x = torch.randn(64, width, device=DEVICE, generator=g)
            opt.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            expected[step] = _snapshot(_model_and_optim_tensors(model, opt))
            ck.save_async(step)
            opt.step()  # no wait: the pre-hook must order it after the copy
        ck.wait()
    for step in (1, 3, 5):
        fresh_model = _model(1, width)
        fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2, **kw)
        assert resume(root, {"model": fresh_model, "optim": fresh_opt}, step=step) == step
        got = _model_and_optim_tensors(fresh_model, fresh_opt)
        assert set(got) == set(expected[step])
        for k, v in got.items():
            assert _same(v, expected[step][k]), (step, k)
        assert all(p.device.type == DEVICE for p in fresh_model.parameters())


def test_overlap_hook_makes_the_gpu_wait_not_the_cpu(root: str) -> None:
    model = torch.nn.Linear(512, 512).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 512, device=DEVICE)
    with AsyncCheckpointer(root, {"model": model}, overlap=True) as ck:
        model(x).sum().backward()
        ck.save_async(0)  # warm-up: the first save and step are not timed
        opt.step()
        ck.wait()
        model(x).sum().backward()
        sleeping = DEVICE == "cuda"
        if sleeping:
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles queued before the copy
        t0 = time.perf_counter()
        ck.save_async(1)
        before = _snapshot(model.state_dict())
        opt.step()  # the pre-hook orders this after the copy on the GPU
        cpu_s = time.perf_counter() - t0
        if sleeping:
            torch.cuda.synchronize()
        total_s = time.perf_counter() - t0
        ck.wait()
    if sleeping:
        assert total_s > 0.4, f"the GPU was not held by _sleep ({total_s:.3f}s); the check says nothing"
        assert cpu_s < total_s / 2, f"save_async + opt.step blocked the CPU {cpu_s:.3f}s of {total_s:.3f}s"
    fresh = torch.nn.Linear(512, 512)  # a CPU module loads a CUDA checkpoint
    assert resume(root, {"model": fresh}) == 1
    for k, v in fresh.state_dict().items():
        assert _same(v, before[k]), k


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_resume_into_cuda_tensors_in_place_bit_exact(root: str, executor: str) -> None:
    width = 512
    model = _model(0, width, depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt, 0, width)
    state = {"model": model, "optim": opt, "w": _dtype_state(1)["w"], "extra": {"step": 0}}
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        for step in (1, 2):
            _train_step(model, opt, step, width)
            state["extra"]["step"] = step
            ck.save_async(step)
        ck.wait()
        expected = {k: _raw(v) for k, v in _model_and_optim_tensors(model, opt).items()}
        expected.update({f"w.{k}": _raw(v) for k, v in state["w"].items()})
        # wreck the live state, then resume through the checkpointer itself
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        for k, v in state["w"].items():
            state["w"][k] = _zeros_like(v)
        state["extra"]["step"] = -1
        ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
        assert ck.resume() == 2
    assert state["extra"]["step"] == 2
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs  # loaded in place
    got = _model_and_optim_tensors(model, opt)
    got.update({f"w.{k}": v for k, v in state["w"].items()})
    assert set(got) == set(expected)
    for k, v in got.items():
        if k.startswith(("model.", "w.")):
            assert v.device.type == DEVICE, k
        assert torch.equal(_raw(v), expected[k]), k

    # a fresh process's view: the module-level resume into new CUDA objects, an older step
    model2 = _model(1, width, depth=2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    w2 = {k: _zeros_like(v) for k, v in state["w"].items()}
    state2 = {"model": model2, "optim": opt2, "w": w2, "extra": {"step": 0}}
    assert asyncckpt.resume(root, state2, step=1) == 1
    assert state2["extra"]["step"] == 1
    assert all(p.device.type == DEVICE for p in model2.parameters())
    assert all(_same(state2["w"][k], state["w"][k]) for k in w2)  # "w" did not change between steps


# ---------------------------------------------------------------------------- FSDP2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _one_rank_group() -> Iterator[None]:
    backend = "cpu:gloo,cuda:nccl" if DEVICE == "cuda" else "gloo"
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp_model(seed: int, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed, width=256, depth=3)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@pytest.mark.parametrize(("executor", "overlap"), [("thread", False), ("thread", True), ("process", False)])
def test_fsdp2_one_rank_save_and_resume_bit_exact(root: str, executor: str, overlap: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    with _one_rank_group():
        mesh = init_device_mesh(DEVICE, (1,))
        model = _fsdp_model(0, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _train_step(model, opt, 0, 256)
        state = {"model": model, "optim": opt, "extra": {"step": 0}}
        with AsyncCheckpointer(root, state, executor=executor, overlap=overlap, commit_timeout=60) as ck:
            for step in (1, 2, 3):
                _train_step(model, opt, step, 256)
                state["extra"]["step"] = step
                if step == 2:
                    expected = {k: _raw(v) for k, v in _model_and_optim_tensors(model, opt).items()}
                info = ck.save_async(step).result()
                assert info.world_size == 1, info
        assert any(isinstance(p, DTensor) for p in model.parameters())

        model2 = _fsdp_model(1, mesh)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
        state2 = {"model": model2, "optim": opt2, "extra": {"step": 0}}
        with AsyncCheckpointer(root, state2, executor=executor) as ck2:
            assert ck2.resume(step=2) == 2
        assert state2["extra"]["step"] == 2
        got = _model_and_optim_tensors(model2, opt2)
        assert set(got) == set(expected)
        for k, v in got.items():
            assert torch.equal(_raw(v), expected[k]), k
        for p in model2.parameters():
            assert isinstance(p, DTensor) and p.to_local().device.type == DEVICE
        # training continues from the resumed state
        _train_step(model2, opt2, 3, 256)
