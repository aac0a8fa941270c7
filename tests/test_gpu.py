"""CUDA staging: pinned buffers, side-stream copies, overlap. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from asyncckpt import AsyncCheckpointer, resume

pytestmark = pytest.mark.gpu


def _cuda_state() -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {"w": {f"t{i}": torch.randn(1 << 16, device="cuda", generator=g) for i in range(8)}}


@pytest.mark.parametrize("executor", ["thread", "process"])
@pytest.mark.parametrize("overlap", [False, True])
def test_cuda_round_trip_and_mutation(root: str, executor: str, overlap: bool) -> None:
    state = _cuda_state()
    expected = {}
    with AsyncCheckpointer(root, state, overlap=overlap, executor=executor, max_inflight=2) as ck:
        assert ck._pool is not None and ck._pool.buffer(0).is_pinned()
        for step in range(20):
            ck.save_async(step)
            expected[step] = {k: v.detach().cpu().clone() for k, v in state["w"].items()}
            if overlap:
                ck.wait_staged()
            for t in state["w"].values():
                t.mul_(1.5).add_(1)  # queued on the compute stream right after the copy
    for step in (0, 7, 19):
        fresh = {"w": {k: torch.zeros_like(v) for k, v in state["w"].items()}}
        assert resume(root, fresh, step=step) == step
        for k, v in fresh["w"].items():
            assert v.is_cuda
            assert torch.equal(v.cpu(), expected[step][k]), (step, k)


def test_overlap_hook_makes_the_gpu_wait_not_the_cpu(root: str) -> None:
    model = torch.nn.Linear(512, 512).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with AsyncCheckpointer(root, {"model": model}, overlap=True) as ck:
        model(torch.randn(64, 512, device="cuda")).sum().backward()
        ck.save_async(1)
        before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        opt.step()  # pre-hook orders this after the copy on the GPU
        ck.wait()
    fresh = torch.nn.Linear(512, 512)
    resume(root, {"model": fresh})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])
