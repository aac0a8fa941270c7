"""The standalone resume's slab (resume._slab) and the whole-file read path
(reader._whole_file): edge cases on local disk (O_DIRECT) and S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

from asyncckpt import AsyncCheckpointer, CorruptCheckpointError, SelectOptions, WriterOptions, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.storage import LocalStorage

from .helpers import assert_same, snapshot, zeroed

resume_mod = importlib.import_module("asyncckpt.resume")


def _bits(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype) if dtype != torch.bool else raw % 2 == 1


def _odd_state(seed: int) -> dict:
    """Every dtype, odd byte counts (the next blob's offset shifts), 0-dim, 0-element."""
    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    dts = [
        torch.int8, torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.int16, torch.uint16,
        torch.float32, torch.int32, torch.uint32, torch.complex64, torch.float64, torch.int64,
        torch.uint64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
    ]  # fmt: skip
    for i, dt in enumerate(dts):
        out[f"v{i:02d}_{str(dt)[6:]}"] = _bits(dt, 3 + 2 * i, g)  # odd lengths
        out[f"s{i:02d}_{str(dt)[6:]}"] = _bits(dt, 1, g).reshape(())  # 0-dim
    out["empty"] = torch.empty(0, 5)
    out["empty_c128"] = torch.empty(3, 0, dtype=torch.complex128)
    out["big"] = torch.randn(5 << 20, generator=g)  # 20 MiB: two read pieces
    out["nested"] = {"a": _bits(torch.float64, 17, g), "b": [_bits(torch.int16, 9, g)]}
    return out


class _Reads:
    """Spy on LocalStorage.read_into (the whole-file reads)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, short: tuple[str, int] | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        real = LocalStorage.read_into
        spy = self

        def read_into(self_, path: str, offset: int, out: memoryview) -> int:
            full = os.readlink(path) if path.startswith("/proc/self/fd/") else path
            name = os.path.basename(full)
            spy.calls.append((name, offset, out.nbytes))
            n = real(self_, path, offset, out)
            if short is not None and full == short[0] and offset == short[1]:
                return max(0, n - 4096)  # the file "ended" early: a truncation mid-read
            return n

        monkeypatch.setattr(LocalStorage, "read_into", read_into)


@pytest.mark.parametrize("threads", [1, 3])
def test_slab_every_dtype_odd_sizes_scalars_and_empties_bit_exact(
    tmp_path, monkeypatch, threads: int
) -> None:
    """Edge case: every dtype the manifest knows, odd byte counts (so blobs start at offsets that
    are only 64-aligned), 0-dim and 0-element tensors, several shard files: the slab views all
    of them (bar the empties) and each file is read whole, bit-exactly."""
    root = str(tmp_path / "ck")
    state = _odd_state(1)
    with AsyncCheckpointer(root, state, writer=WriterOptions(threads=threads)) as ck:
        info = ck.save_async(1).result()
    m = read_manifest(LocalStorage(), info.path)
    n_files = len({c.file for t in m.tensors.values() for c in t.chunks})
    views: list[int] = []
    real_slab = resume_mod._slab

    def spy_slab(manifest):  # type: ignore[no-untyped-def]
        slab, v, region = real_slab(manifest)
        views.append(len(v))
        return slab, v, region

    monkeypatch.setattr(resume_mod, "_slab", spy_slab)
    reads = _Reads(monkeypatch)
    live = zeroed(_odd_state(2))
    assert resume(root, live) == 1
    assert_same(snapshot(live), snapshot(state))
    with_bytes = sum(1 for t in m.tensors.values() if t.chunks[0].nbytes)
    assert views == [with_bytes]
    assert {name for name, _, _ in reads.calls} == set(f for f in m.files if f.endswith(".distcp"))
    assert len({name for name, _, _ in reads.calls}) == n_files


def test_slab_tied_weights_and_non_contiguous_live_targets(tmp_path) -> None:
    """Edge case: two fqns of one storage (tied weights) and non-contiguous live tensors
    (a transpose, a strided slice) are loaded through the slab; the tie survives."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    m = Tied()
    base = torch.randn(8, 10)
    state = {"model": m, "t": {"T": base.t().contiguous(), "S": torch.randn(5, 4)}}
    root = str(tmp_path / "ck")
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    torch.manual_seed(1)
    m2 = Tied()
    live_t = torch.zeros(8, 10).t()  # non-contiguous
    live_s = torch.zeros(5, 8)[:, ::2]  # strided
    live = {"model": m2, "t": {"T": live_t, "S": live_s}}
    assert resume(root, live) == 1
    assert m2.head.weight is m2.emb.weight
    assert torch.equal(m2.emb.weight, m.emb.weight)
    assert live["t"]["T"] is live_t and torch.equal(live_t, state["t"]["T"])
    assert live["t"]["S"] is live_s and torch.equal(live_s, state["t"]["S"])


def test_slab_fresh_optimizer_and_new_entries_do_not_keep_the_slab_alive(tmp_path) -> None:
    """Edge case: tensors that reach the state without a live target (a fresh optimizer's
    moments, a dict key the live dict lacks, a numpy array) are copies, not views of the slab
    (a view would pin the whole checkpoint in memory and alias its neighbours)."""
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    state = {"model": model, "optim": opt, "extra": {"x": torch.randn(7), "arr": np.arange(9.0)}}
    root = str(tmp_path / "ck")
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    m2 = torch.nn.Linear(64, 32)
    o2 = torch.optim.Adam(m2.parameters())
    live = {"model": m2, "optim": o2, "extra": {"arr": np.zeros(9)}}
    assert resume(root, live) == 1
    got = [t for s in o2.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    got.append(live["extra"]["x"])
    assert got
    for t in got:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), "a view of the slab"
    assert np.array_equal(live["extra"]["arr"], np.arange(9.0))
    assert torch.equal(live["extra"]["x"], state["extra"]["x"])
    assert torch.equal(o2.state[m2.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


@pytest.mark.parametrize("how", ["saved_dtype", "cast"])
def test_slab_bf16_saved_into_fp32_live(tmp_path, how: str) -> None:
    """Edge case: the slab holds the saved dtype (bf16); the live fp32 tensors get the cast."""
    torch.manual_seed(0)
    w = torch.randn(33, 17)
    root = str(tmp_path / "ck")
    if how == "saved_dtype":
        with AsyncCheckpointer(root, {"w": w}, select=SelectOptions(dtype=torch.bfloat16)) as ck:
            ck.save_async(1).result()
        opts = {}
    else:
        with AsyncCheckpointer(root, {"w": w.to(torch.bfloat16)}) as ck:
            ck.save_async(1).result()
        opts = {"cast": True}
    live = {"w": torch.zeros(33, 17)}
    assert resume(root, live, **opts) == 1
    assert live["w"].dtype == torch.float32
    assert torch.equal(live["w"], w.to(torch.bfloat16).float())


def _two_steps(root: str, first: WriterOptions, second: WriterOptions) -> tuple[dict, dict, str]:
    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(3 << 20, generator=g),
        "w": torch.randn(100, 7, generator=g),
        "n": torch.tensor(3),
    }
    with AsyncCheckpointer(root, state, writer=first) as ck:
        ck.save_async(1).result()
    one = snapshot(state)
    state["big"].mul_(2)
    state["w"].add_(1)
    with AsyncCheckpointer(root, state, writer=second) as ck:
        info = ck.save_async(2).result()
    return one, snapshot(state), info.path


def _flip_in_shard(step_path: str, frac: float = 0.5) -> None:
    name = sorted(f for f in os.listdir(step_path) if f.endswith(".distcp"))[-1]
    path = os.path.join(step_path, name)
    with open(path, "r+b") as f:
        pos = int(f.seek(0, 2) * frac)
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "first,second",
    [
        ("plain3", "lz4"),
        ("lz4", "plain3"),
        ("incremental", "plain1"),
        ("plain1", "incremental"),
    ],
)
def test_slab_mixed_formats_round_trip_and_corrupt_newest_falls_back(
    tmp_path, first: str, second: str
) -> None:
    """Edge case: compressed, differential and multi-file plain steps in one root, each
    loaded through the standalone slab; a corrupt newest falls back, live untouched until then."""
    if "lz4" in (first, second):
        pytest.importorskip("blosc2")
    if "incremental" in (first, second):
        pytest.importorskip("xxhash")
    w = {
        "plain1": WriterOptions(threads=1),
        "plain3": WriterOptions(threads=3),
        "lz4": WriterOptions(compression="lz4", threads=2),
        "incremental": WriterOptions(incremental=True),
    }
    root = str(tmp_path / "ck")
    one, two, path2 = _two_steps(root, w[first], w[second])
    live = {"big": torch.zeros(3 << 20), "w": torch.zeros(100, 7), "n": torch.tensor(0)}
    assert resume(root, live) == 2
    assert_same(snapshot(live), two)
    if second == "incremental":
        return  # no shard file to damage
    _flip_in_shard(path2)
    live = {"big": torch.zeros(3 << 20), "w": torch.zeros(100, 7), "n": torch.tensor(0)}
    with pytest.warns(RuntimeWarning, match="skipping step 2"):
        assert resume(root, live) == 1
    assert_same(snapshot(live), one)


@pytest.mark.parametrize("threads", [1, 3])
def test_slab_truncation_detected_mid_read_falls_back_and_only_step_leaves_live_untouched(
    tmp_path, monkeypatch, threads: int
) -> None:
    """A shard that ends early while it is read (its size checked fine before) is refused
    with the live state untouched, and resume falls back to the older step."""
    root = str(tmp_path / "ck")
    one, _, path2 = _two_steps(root, WriterOptions(threads=threads), WriterOptions(threads=threads))
    big_file = read_manifest(LocalStorage(), path2).tensors["big"].chunks[0].file
    _Reads(monkeypatch, short=(os.path.realpath(os.path.join(path2, big_file)), 0))
    live = {"big": torch.zeros(3 << 20), "w": torch.zeros(100, 7), "n": torch.tensor(0)}
    with pytest.warns(RuntimeWarning, match="skipping step 2.*truncated"):
        assert resume(root, live) == 1
    assert_same(snapshot(live), one)
    before = snapshot(live)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resume(root, live, step=2)
    assert_same(snapshot(live), before)


def test_slab_checksum_mismatch_in_last_file_only_step_leaves_live_untouched(tmp_path) -> None:
    """Several files read whole into the slab, the last one damaged: nothing reaches the
    live state (the others were read and verified first)."""
    root = str(tmp_path / "ck")
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(300_000 + i, generator=g) for i in range(4)}
    with AsyncCheckpointer(root, state, writer=WriterOptions(threads=4)) as ck:
        info = ck.save_async(1).result()
    _flip_in_shard(info.path, 0.9)
    live = {k: torch.full_like(v, 7.0) for k, v in state.items()}
    before = snapshot(live)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        with pytest.raises(CorruptCheckpointError):
            resume(root, live)
    assert_same(snapshot(live), before)


@pytest.mark.s3
def test_s3_slab_multi_file_whole_reads_and_corrupt_object_falls_back(s3, monkeypatch) -> None:
    """On S3 (moto) the standalone slab is filled by whole-file GETs, several shard files;
    a damaged object of the newest step falls back to the older one, bit-exact."""
    from asyncckpt.storage import FsspecStorage

    root, opts, fs = s3
    g = torch.Generator().manual_seed(0)
    state = {
        f"t{i}": _bits(dt, 50_001 + i, g) for i, dt in enumerate([torch.float32, torch.int8, torch.bfloat16])
    }
    state["s"] = torch.tensor(1.5, dtype=torch.float64)
    state["e"] = torch.empty(0)
    with AsyncCheckpointer(root, state, storage_options=opts, writer=WriterOptions(threads=3)) as ck:
        ck.save_async(1).result()
        one = snapshot(state)
        for k in ("t0", "t2"):
            state[k].neg_()
        ck.save_async(2).result()
    two = snapshot(state)
    calls: list[tuple[str, int, int]] = []
    real = FsspecStorage.read_into

    def counting(self, path: str, offset: int, out: memoryview) -> int:  # type: ignore[no-untyped-def]
        calls.append((path.rsplit("/", 1)[-1], offset, out.nbytes))
        return real(self, path, offset, out)

    monkeypatch.setattr(FsspecStorage, "read_into", counting)
    live = zeroed(state)
    assert resume(root, live, storage_options=opts) == 2
    assert_same(snapshot(live), two)
    assert len(calls) == 3 and all(off == 0 for _, off, _ in calls), calls
    shard = f"{root[5:]}/step_000000002/" + sorted(c[0] for c in calls)[-1]
    data = bytearray(fs.cat(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(shard, bytes(data))
    live = zeroed(state)
    with pytest.warns(RuntimeWarning, match="skipping step 2.*checksum"):
        assert resume(root, live, storage_options=opts) == 1
    assert_same(snapshot(live), one)


def test_slab_skips_a_blob_whose_data_is_misaligned_for_its_dtype(tmp_path, monkeypatch) -> None:
    """Edge case: a (hand-shifted, still valid) shard whose float64 data starts 1 byte off its
    dtype's alignment: the slab cannot view it, gives it a shadow of its own, the file is read
    blob by blob instead of whole, and every value is right."""
    import json

    from .helpers import rewrite_manifest

    root = str(tmp_path / "ck")
    g = torch.Generator().manual_seed(0)
    state = {"a": _bits(torch.int8, 3, g), "b": torch.randn(1000, generator=g, dtype=torch.float64)}
    with AsyncCheckpointer(root, state, writer=WriterOptions(threads=1)) as ck:
        info = ck.save_async(1).result()
    mpath = os.path.join(info.path, "manifest.json")
    with open(mpath) as f:
        doc = json.load(f)
    cb = doc["tensors"]["b"]["chunks"][0]
    shard = os.path.join(info.path, cb["file"])
    with open(shard, "rb") as f:
        data = f.read()
    at = cb["offset"]
    with open(shard, "wb") as f:  # one zero byte before b's blob: everything after shifts by 1
        f.write(data[:at] + b"\0" + data[at:])
    for t in doc["tensors"].values():
        for c in t["chunks"]:
            if c["offset"] >= at:
                c["offset"] += 1
                c["data_offset"] += 1
    doc["files"][cb["file"]]["size"] += 1
    rewrite_manifest(mpath, doc)
    reads = _Reads(monkeypatch)
    live = {"a": torch.zeros(3, dtype=torch.int8), "b": torch.zeros(1000, dtype=torch.float64)}
    assert resume(root, live) == 1
    assert_same(snapshot(live), snapshot(state))
    assert reads.calls == []  # not read whole: b's shadow is not in the slab


_PEAK = r"""
import sys, warnings
import torch
from asyncckpt import AsyncCheckpointer, resume
warnings.simplefilter("ignore")
root, mode = sys.argv[1], sys.argv[2]
def build():
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(1448, 1448) for _ in range(4)])  # ~32 MiB of params
    return m, torch.optim.Adam(m.parameters())
m, o = build()
if mode == "save":
    m(torch.randn(2, 1448)).sum().backward()
    o.step()
    with AsyncCheckpointer(root, {"model": m, "optim": o}) as ck:
        ck.save_async(1).result()
    sys.exit(0)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS starts again from now (ru_maxrss would include the forking parent's)
base = status("VmRSS")
assert resume(root, {"model": m, "optim": o}) == 1
print(status("VmHWM") - base)
"""


def test_slab_resume_into_a_fresh_optimizer_does_not_hold_the_checkpoint_twice(tmp_path) -> None:
    """A standalone resume into a fresh optimizer (the usual restart) peaks near the
    checkpoint's size.  It peaked at 1.7x when the slab was used: the optimizer's tensors have
    no live counterpart, so they were handed over as copies of slab views while the slab was
    alive (load_plan.LoadPlan.apply clones owned shadows); now such a load takes a shadow per
    tensor (resume._slab_pays)."""
    import subprocess
    import sys

    root = str(tmp_path / "ck")
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    subprocess.run([sys.executable, str(script), root, "save"], check=True, env=env, timeout=300)
    m = read_manifest(LocalStorage(), os.path.join(root, "step_000000001"))
    ckpt = sum(c.nbytes for t in m.tensors.values() for c in t.chunks)
    out = subprocess.run(
        [sys.executable, str(script), root, "slab"],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 1.3 * ckpt, (
        f"resume's peak host memory {peak / ckpt:.2f}x the checkpoint ({ckpt >> 20} MiB)"
    )


def test_a_state_of_numpy_arrays_is_not_copied_out_of_a_slab(tmp_path, monkeypatch) -> None:
    """A numpy array is replaced on load, never written into, so it has no live tensor: a
    numpy-heavy state must not take the slab (its arrays would be copies of slab views, made
    while the slab lives).  ``flatten_state`` turns arrays into tensors; they once counted as
    live."""
    import numpy as np

    from asyncckpt import load_plan

    root = str(tmp_path / "ck")
    state = {"w": torch.ones(1024), "arr": np.arange(1 << 20, dtype=np.float32)}
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(1).result()
    seen: list[tuple[int, int]] = []
    real = load_plan.LoadPlan.apply

    def spy(self) -> None:  # type: ignore[no-untyped-def]
        nbytes = {f: s.numel() * s.element_size() for f, s in self.shadows.items()}
        seen.append(
            (
                sum(n for f, n in nbytes.items() if f in self.owned and f not in self.live),
                sum(nbytes.values()),
            )
        )
        real(self)

    monkeypatch.setattr(load_plan.LoadPlan, "apply", spy)
    live = {"w": torch.zeros(1024), "arr": np.zeros(1 << 20, dtype=np.float32)}
    assert resume(root, live) == 1
    assert (live["arr"] == state["arr"]).all() and torch.equal(live["w"], state["w"])
    [(copied, total)] = seen
    assert copied <= resume_mod.SLAB_MAX_ORPHANS * total, (copied, total)
