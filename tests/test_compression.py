"""Compressed checkpoints (``WriterOptions(compression=...)``): bit-exact round trips, the
record format's checks, corruption caught by verify and by resume, S3 and the local tier."""

from __future__ import annotations

import json
import os
import struct
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from asyncckpt import AsyncCheckpointer, ConfigError, WriterOptions, resume
from asyncckpt.cli import main

from .helpers import assert_same, rewrite_manifest, snapshot

pytest.importorskip("blosc2")

LZ4 = WriterOptions(compression="lz4")


def _step(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:09d}")


def _manifest(root: str, step: int) -> dict[str, Any]:
    with open(os.path.join(_step(root, step), "manifest.json")) as f:
        return json.load(f)


def _bits(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """Random bit patterns: every NaN payload, -0.0 and subnormal a dtype has."""
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype) if dtype != torch.bool else raw % 2 == 1


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64):
        out[f"n_{dt}"] = (torch.randn(3000, generator=g) * 0.02).to(dt)
        out[f"bits_{dt}"] = _bits(dt, 777, g)
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        out[f"i_{dt}"] = torch.randint(-100 if dt != torch.uint8 else 0, 100, (5000,), generator=g).to(dt)
    out["bool"] = torch.rand(4097, generator=g) > 0.3
    out["empty"] = torch.empty(0, 4)
    out["empty_bf16"] = torch.empty(0, dtype=torch.bfloat16)
    out["scalar"] = torch.tensor(-0.0)
    out["specials"] = torch.tensor(
        [float("nan"), -float("nan"), float("inf"), -0.0, 0.0, 5e-324], dtype=torch.float64
    )
    out["nan_payload"] = (
        torch.tensor([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )
    # several 4 MiB chunks, the last one short
    out["big_bf16"] = (torch.randn(5 << 20, generator=g) * 0.02).to(torch.bfloat16)
    return out


def _zeroed(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in d.items()}


def test_every_dtype_round_trips_bit_exactly(root: str, executor: str) -> None:
    tensors = _every_dtype()
    state = {"t": tensors, "extra": {"epoch": 3}}
    expected = snapshot(state)
    writer = WriterOptions(executor=executor, compression="lz4", threads=2)
    with AsyncCheckpointer(root, state, writer=writer) as ck:
        ck.save_async(5).result()
    m = _manifest(root, 5)
    assert all(c["codec"] == "blosc2" for t in m["tensors"].values() for c in t["chunks"])
    assert ".metadata" not in os.listdir(_step(root, 5))  # not stock-DCP loadable: says so
    raw = sum(v.numel() * v.element_size() for v in tensors.values())
    assert sum(f["size"] for f in m["files"].values()) < raw / 1.2

    fresh = {"t": _zeroed(tensors), "extra": {"epoch": 0}}
    assert resume(root, fresh) == 5
    assert_same(snapshot(fresh), expected)
    assert fresh["extra"]["epoch"] == 3
    assert main(["verify", root]) == 0


def test_zstd_and_a_model_with_adam_round_trip(root: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters())
    for _ in range(3):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
    state = {"model": model, "optim": opt}
    expected = snapshot(state)
    with AsyncCheckpointer(root, state, writer=WriterOptions(compression="zstd", compression_level=3)) as ck:
        ck.save_async(1).result()
    model2 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    state2 = {"model": model2, "optim": torch.optim.Adam(model2.parameters())}
    assert resume(root, state2) == 1
    assert_same(snapshot(state2), expected)


def _record_flags(root: str, step: int, fqn: str) -> list[int]:
    c = _manifest(root, step)["tensors"][fqn]["chunks"][0]
    with open(os.path.join(_step(root, step), c["file"]), "rb") as f:
        f.seek(c["offset"] + c["length"] - 32)
        n = struct.unpack_from("<I", f.read(32), 12)[0]
        f.seek(c["offset"] + c["length"] - 32 - 16 * n)
        index = f.read(16 * n)
    return [struct.unpack_from("<IIII", index, 16 * i)[1] for i in range(n)]


def test_uncompressible_chunks_are_stored_raw(root: str) -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8, generator=g)
    state = {"noise": noise, "zeros": torch.zeros(3 << 20), "tiny": torch.arange(10, dtype=torch.int8)}
    expected = snapshot(state)
    with AsyncCheckpointer(root, state, writer=LZ4) as ck:
        ck.save_async(1).result()
    assert _record_flags(root, 1, "noise") == [0, 0, 0]  # raw: compression does not pay
    assert _record_flags(root, 1, "zeros") == [1, 1, 1]
    assert _record_flags(root, 1, "tiny") == [0]
    m = _manifest(root, 1)
    noise_len = m["tensors"]["noise"]["chunks"][0]["length"]
    assert noise_len == (9 << 20) + 3 * 16 + 32  # the raw bytes, the index and the footer
    assert m["tensors"]["zeros"]["chunks"][0]["length"] < 10_000
    fresh = {k: torch.ones_like(v) for k, v in state.items()}
    assert resume(root, fresh) == 1
    assert_same(snapshot(fresh), expected)


def _flip(path: str, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.mark.parametrize("where", ["chunk", "index", "footer"])
def test_a_corrupt_byte_is_caught_by_verify_and_resume_falls_back(root: str, where: str, capsys) -> None:
    g = torch.Generator().manual_seed(1)
    state = {"w": (torch.randn(3 << 20, generator=g) * 0.02).to(torch.bfloat16), "extra": {"n": 1}}
    with AsyncCheckpointer(root, state, writer=LZ4) as ck:
        ck.save_async(1).result()
        step1 = snapshot(state)
        state["w"].add_(1)
        state["extra"]["n"] = 2
        ck.save_async(2).result()
    c = _manifest(root, 2)["tensors"]["w"]["chunks"][0]
    end = c["offset"] + c["length"]
    pos = {"chunk": c["offset"] + c["length"] // 3, "index": end - 40, "footer": end - 20}[where]
    _flip(os.path.join(_step(root, 2), c["file"]), pos)

    assert main(["verify", root, "--step", "2"]) != 0
    assert "corrupt" in capsys.readouterr().out
    assert main(["verify", root, "--step", "1"]) == 0
    live = {"w": torch.full_like(state["w"], 7.0), "extra": {"n": 0}}
    with pytest.warns(RuntimeWarning, match="skipping step 2"):
        assert resume(root, live) == 1
    assert_same(snapshot(live), step1)
    assert live["extra"] == {"n": 1}


def test_only_one_step_and_it_is_corrupt_leaves_live_state_untouched(root: str) -> None:
    state = {"w": torch.randn(1 << 20)}
    with AsyncCheckpointer(root, state, writer=LZ4) as ck:
        ck.save_async(1).result()
    c = _manifest(root, 1)["tensors"]["w"]["chunks"][0]
    _flip(os.path.join(_step(root, 1), c["file"]), c["offset"] + 100)
    live = {"w": torch.full((1 << 20,), 3.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(Exception, match="no loadable|checksum|corrupt"):
            resume(root, live)
    assert torch.equal(live["w"], torch.full((1 << 20,), 3.0))


def test_export_reads_compressed_checkpoints(root: str, tmp_path) -> None:
    state = {"model": {"a": torch.randn(1000, 100), "b": torch.arange(7)}}
    with AsyncCheckpointer(root, state, writer=LZ4) as ck:
        ck.save_async(3).result()
    out = str(tmp_path / "out")
    assert main(["export", root, out]) == 0
    loaded = load_file(os.path.join(out, "model.safetensors"))
    assert_same({k.removeprefix("model."): v for k, v in loaded.items()}, state["model"])


def test_unknown_codec_and_missing_package_are_clear_errors(root: str, monkeypatch) -> None:
    from asyncckpt import codec

    state = {"w": torch.randn(4096)}
    with AsyncCheckpointer(root, state, writer=LZ4) as ck:
        ck.save_async(1).result()
    path = os.path.join(_step(root, 1), "manifest.json")
    with open(path) as f:
        doc = json.load(f)
    doc["tensors"]["w"]["chunks"][0]["codec"] = "brotli9"
    rewrite_manifest(path, doc)
    with pytest.raises(ConfigError, match="brotli9.*upgrade asyncckpt"):
        resume(root, {"w": torch.zeros(4096)})

    def missing() -> Any:
        raise ConfigError("compressed checkpoints need the blosc2 package: pip install 'asyncckpt[compress]'")

    monkeypatch.setattr(codec, "_blosc2", missing)
    with pytest.raises(ConfigError, match=r"asyncckpt\[compress\]"):
        WriterOptions(compression="lz4")
    doc["tensors"]["w"]["chunks"][0]["codec"] = "blosc2"
    rewrite_manifest(path, doc)
    with pytest.raises(ConfigError, match=r"asyncckpt\[compress\]"):
        resume(root, {"w": torch.zeros(4096)})


@pytest.mark.parametrize(
    "kwargs",
    [{"compression": "gzip"}, {"compression": "lz4", "compression_level": 0}, {"compression_level": 3},
     {"compression": "lz4", "compression_threads": 0}],
)  # fmt: skip
def test_bad_compression_options_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="WriterOptions"):
        WriterOptions(**kwargs)


@pytest.mark.s3
def test_s3_round_trip(s3) -> None:
    root, opts, _ = s3
    g = torch.Generator().manual_seed(2)
    state = {"w": (torch.randn(5 << 20, generator=g) * 0.02).to(torch.bfloat16), "i": torch.arange(100)}
    expected = snapshot(state)
    with AsyncCheckpointer(root, state, storage_options=opts, writer=LZ4) as ck:
        ck.save_async(1).result()
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    assert resume(root, fresh, storage_options=opts) == 1
    assert_same(snapshot(fresh), expected)


@pytest.mark.s3
def test_local_first_tier_uploads_compressed_steps(s3, tmp_path) -> None:
    root, opts, _ = s3
    local = str(tmp_path / "nvme")
    state = {"w": torch.randn(1 << 20) * 0.02}
    expected = snapshot(state)
    with AsyncCheckpointer(root, state, local_dir=local, storage_options=opts, writer=LZ4) as ck:
        h = ck.save_async(1)
        h.result()
        h.uploaded.result(timeout=60)
    fresh = {"w": torch.zeros(1 << 20)}
    assert resume(root, fresh, storage_options=opts) == 1  # from the remote copy
    assert_same(snapshot(fresh), expected)


def test_a_write_fault_mid_stream_commits_nothing_and_the_previous_step_loads(root: str) -> None:
    from asyncckpt import StorageOptions, WriteError

    from .helpers import FaultyStorage

    g = torch.Generator().manual_seed(4)
    state = {"w": (torch.randn(6 << 20, generator=g) * 0.02).to(torch.bfloat16)}
    storage = FaultyStorage()
    ck = AsyncCheckpointer(root, state, writer=LZ4, storage=StorageOptions(backend=storage))
    ck.save_async(1).result()
    step1 = snapshot(state)
    state["w"].neg_()
    storage.budget[0] = 5 << 20  # fails after some compressed chunks were written
    h = ck.save_async(2)
    with pytest.raises(WriteError) as ei:
        h.result()
    assert "injected" in str(ei.value.__cause__)
    ck.close()
    assert not os.path.exists(_step(root, 2))
    assert os.listdir(os.path.join(root, ".tmp")) == []
    fresh = {"w": torch.zeros_like(state["w"])}
    assert resume(root, fresh) == 1
    assert_same(snapshot(fresh), step1)


def test_direct_stream_writes_every_byte_of_writes_of_any_size(tmp_path) -> None:
    """Compressed records go to local disks through ``DirectStream`` (O_DIRECT from a bounce
    buffer): any sequence of write sizes lands byte for byte, and the file is durable."""
    import random

    from asyncckpt.storage import LocalStorage
    from asyncckpt.storage.direct import DirectStream

    storage, rng = LocalStorage(), random.Random(0)
    for trial in range(4):
        path = str(tmp_path / f"f{trial}")
        f = storage.open_direct(path)
        if not isinstance(f, DirectStream):
            pytest.skip("this filesystem refuses O_DIRECT")
        data = bytearray()
        for _ in range(rng.randint(1, 30)):
            b = os.urandom(rng.choice([1, 100, 4095, 4096, 65536, (1 << 22) + 7, 33 << 20]))
            assert f.write(memoryview(b) if trial % 2 else b) == len(b)
            data += b
        storage.finish_write(f, path, len(data))
        with open(path, "rb") as g:
            assert g.read() == bytes(data)
