"""Bit-exact round trips of everything the state may hold."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from asyncckpt import AsyncCheckpointer, list_checkpoints, resume

from .helpers import assert_same, snapshot, tiny_model, train_steps, zeroed


def _dtypes() -> list[torch.dtype]:
    out = [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.int64,
        torch.bool,
        torch.float64,
        torch.int8,
        torch.uint8,
    ]
    out += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    return out


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def test_every_dtype_and_odd_shapes_round_trip(root: str, executor: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g)
    tensors = {f"d{i}": _random((3, 7), dt, g) for i, dt in enumerate(_dtypes())}
    tensors.update(
        scalar=torch.tensor(3.25),
        empty=torch.empty(0, 4),
        noncontig=torch.randn(5, 8, generator=g).t(),
        strided=torch.arange(40.0)[::3],
        view_a=base[1:3],  # two views of one storage: each saved as its own tensor
        view_b=base[:, 2],
        channels_last=torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last),
        nan=torch.tensor([float("nan"), float("inf"), -0.0]),
    )
    state = {"t": tensors, "nested": {"a": {"b": [torch.ones(2), {"c": torch.arange(3)}]}}}
    expected = snapshot(state)
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        ck.save_async(7).result()

    fresh = {"t": zeroed(tensors), "nested": zeroed(state["nested"])}
    assert resume(root, fresh) == 7
    assert_same(snapshot(fresh), expected)


def test_model_adam_scheduler_and_plain_values(root: str, executor: str) -> None:
    model = tiny_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, 3)
    sched.step()
    extra = {
        "epoch": 3,
        "name": "run7",
        "ok": True,
        "none": None,
        "lr": 0.1,
        "pair": (1, 2.5),
        "lst": [1, "x"],
    }
    state = {"model": model, "optim": opt, "sched": sched, "extra": extra, "rng": torch.get_rng_state()}
    expected = snapshot(state)
    opt_groups = opt.state_dict()["param_groups"]
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        ck.save_async(10, metrics={"loss": 0.5}).result()

    model2 = tiny_model(1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)  # fresh: no optimizer state yet
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    extra2: dict = {"epoch": 0}
    state2 = {
        "model": model2,
        "optim": opt2,
        "sched": sched2,
        "extra": extra2,
        "rng": torch.zeros_like(state["rng"]),
    }
    assert resume(root, state2, allow_missing=True) == 10
    assert_same(snapshot(state2), expected)
    assert opt2.state_dict()["param_groups"] == opt_groups
    assert sched2.state_dict() == sched.state_dict()
    assert extra2 == extra and isinstance(extra2["pair"], tuple)
    # training continues identically from the restored state
    torch.manual_seed(5)
    train_steps(model, opt, 1)
    torch.manual_seed(5)
    train_steps(model2, opt2, 1)
    assert_same(snapshot(model), snapshot(model2))
    [info] = list_checkpoints(root)
    assert info.step == 10 and info.metrics == {"loss": 0.5} and info.bytes > 0


def test_stock_dcp_load_reads_the_tensors(root: str, executor: str) -> None:
    model = tiny_model(0)
    with AsyncCheckpointer(root, {"model": model}, executor=executor) as ck:
        info = ck.save_async(1).result()
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(target, checkpoint_id=info.path, no_dist=True)
    assert_same({k: v for k, v in target["model"].items()}, dict(model.state_dict()))


def test_numpy_arrays_round_trip(root: str, executor: str) -> None:
    np = __import__("pytest").importorskip("numpy")
    rs = np.random.RandomState(3)
    state = {"extra": {"np_rng": rs.get_state(), "arr": np.arange(6, dtype=np.int32).reshape(2, 3)}}
    with AsyncCheckpointer(root, state, executor=executor) as ck:
        ck.save_async(0).result()
    state2 = {"extra": {"np_rng": None, "arr": None}}
    assert resume(root, state2) == 0
    rs2 = np.random.RandomState(0)
    rs2.set_state(state2["extra"]["np_rng"])
    assert rs2.randint(0, 10**9) == rs.randint(0, 10**9)
    assert (state2["extra"]["arr"] == state["extra"]["arr"]).all()


def test_resume_loads_into_live_parameters_in_place(root: str, executor: str) -> None:
    model = tiny_model(0)
    with AsyncCheckpointer(root, {"model": model}, executor=executor) as ck:
        ck.save_async(1).result()
    model2 = tiny_model(1)
    ptrs = [p.data_ptr() for p in model2.parameters()]
    resume(root, {"model": model2})
    assert [p.data_ptr() for p in model2.parameters()] == ptrs
    assert_same(snapshot(model2), snapshot(model))


def test_large_tensor_crc_computed_beside_the_write_is_right(tmp_path) -> None:
    """Tensors of 4 MiB and more get their crc on a helper thread while the bytes are written:
    the stored crc matches the file, and a flipped byte in the data is caught."""
    import os

    from asyncckpt.catalog import read_manifest
    from asyncckpt.checksum import DEFAULT, checksum
    from asyncckpt.step_files import verify_files
    from asyncckpt.storage import LocalStorage

    root = str(tmp_path / "ck")
    state = {"big": torch.randn(3 << 20), "small": torch.randn(10)}  # 12 MiB and 40 bytes
    with AsyncCheckpointer(root, state=state) as ck:
        info = ck.save_async(1).result()
    m = read_manifest(LocalStorage(), info.path)
    chunk = m.tensors["big"].chunks[0]
    with open(os.path.join(info.path, chunk.file), "rb") as f:
        f.seek(chunk.offset)
        assert chunk.algo == DEFAULT and checksum(chunk.algo, f.read(chunk.length)) == chunk.crc
    assert verify_files(LocalStorage(), info.path, m) == []
    with open(os.path.join(info.path, chunk.file), "r+b") as f:
        f.seek(chunk.data_offset + (5 << 20))
        b = f.read(1)
        f.seek(chunk.data_offset + (5 << 20))
        f.write(bytes([b[0] ^ 0x10]))
    assert verify_files(LocalStorage(), info.path, m) != []
