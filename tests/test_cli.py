"""The ``asyncckpt`` command line, on real checkpoints: ls, inspect, verify, export, gc, bench."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from asyncckpt import AsyncCheckpointer, ConfigError, list_checkpoints
from asyncckpt.catalog import list_leftovers
from asyncckpt.cli import main
from asyncckpt.export import parse_size
from asyncckpt.progress import Progress, human_bytes
from asyncckpt.state import flatten_state

from .helpers import assert_same, rewrite_manifest, tree_digest

REPO = str(Path(__file__).resolve().parents[1])
LOSSES = {10: 0.5, 20: 0.9, 30: 0.7}


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {
        "model": model,
        "optim": opt,
        "extra": {
            "epoch": 0,
            "name": "run-1",
            "counts": torch.arange(5),
            "half": torch.ones(3, dtype=torch.bfloat16),
        },
    }


def _train_step(state: dict[str, Any]) -> None:
    state["optim"].zero_grad()
    state["model"](torch.randn(4, 8)).pow(2).sum().backward()
    state["optim"].step()


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A root with steps 10, 20, 30; returns it and the tensors of step 30 by fqn."""
    root = str(tmp_path / "ckpt")
    state = _state()
    with AsyncCheckpointer(root, state) as ck:
        for step in (10, 20, 30):
            _train_step(state)
            state["extra"]["epoch"] = step // 10
            ck.save_async(step, metrics={"loss": LOSSES[step]}).result()
    expected = {k: v.detach().clone() for k, v in flatten_state(state).tensors.items()}
    return root, expected


def _leftovers(root: str) -> tuple[str, str]:
    tmp = os.path.join(root, ".tmp", "step_000000040.0123456789abcdef")
    os.makedirs(tmp)
    Path(tmp, "__0_0.distcp").write_bytes(b"partial")
    step = os.path.join(root, "step_000000050")
    os.makedirs(step)
    Path(step, "__0_0.distcp").write_bytes(b"no manifest")
    return tmp, step


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(a.contiguous().view(-1).view(torch.uint8))
        == bytes(b.contiguous().view(-1).view(torch.uint8))
    )


# --------------------------------------------------------------------------- ls


def test_ls_table_and_json_mark_leftovers(ckpt, capsys) -> None:
    root, _ = ckpt
    tmp, step = _leftovers(root)
    rc, out, err = _run(capsys, "ls", root)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "TIER", "COMMITTED", "SIZE", "METRICS"]
    assert [ln.split()[0] for ln in lines[1:4]] == ["10", "20", "30"]
    assert "loss=0.9" in lines[2] and "permanent" in lines[2] and "KiB" in lines[2]
    assert f"UNCOMMITTED  {tmp}" in out and f"UNCOMMITTED  {step}" in out

    rc, out, _ = _run(capsys, "ls", root, "--json")
    doc = json.loads(out)
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20, 30]
    assert doc["checkpoints"][0]["metrics"] == {"loss": 0.5}
    assert doc["checkpoints"][0]["committed_at"].startswith("20")
    assert all(c["bytes"] > 0 and c["tier"] == "permanent" for c in doc["checkpoints"])
    assert {lo["path"] for lo in doc["leftovers"]} == {tmp, step}
    assert all(lo["status"] == "uncommitted" for lo in doc["leftovers"])


def test_ls_real_subprocess(ckpt, tmp_path) -> None:
    root, _ = ckpt
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "ls", root], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:4]] == ["10", "20", "30"]
    r = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "ls", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("asyncckpt: error: checkpoint root") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_values_and_tensors(ckpt, capsys) -> None:
    root, expected = ckpt
    rc, out, err = _run(capsys, "inspect", root)
    assert rc == 0, err
    assert out.splitlines()[1].split() == ["step", "30"]
    assert "extra.epoch = 3" in out and 'extra.name = "run-1"' in out
    assert "optim.param_groups.0.lr = 0.001" in out and "optim.param_groups.0.betas = [0.9, 0.999]" in out
    assert "model  <Sequential>" in out and "optim  <AdamW>" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("  model.")}
    assert rows["model.0.weight"][1:4] == ["float32", "[16,", "8]"] and rows["model.0.weight"][4] == "512"
    for fqn in expected:
        assert f"  {fqn} " in out

    rc, out, _ = _run(capsys, "inspect", root, "--step", "10", "--json")
    doc = json.loads(out)
    assert doc["step"] == 10 and doc["metrics"] == {"loss": 0.5} and doc["world_size"] == 1
    assert doc["values"]["extra.epoch"] == 1 and doc["objects"] == {"model": "Sequential", "optim": "AdamW"}
    assert doc["torch_version"] == torch.__version__ and doc["library_version"]
    tensors = {t["name"]: t for t in doc["tensors"]}
    assert tensors.keys() == expected.keys()
    assert tensors["extra.half"] == {
        "name": "extra.half",
        "dtype": "bfloat16",
        "shape": [3],
        "bytes": 6,
        "chunks": 1,
    }

    rc, out2, _ = _run(capsys, "inspect", os.path.join(root, "step_000000010"), "--json")
    assert rc == 0 and json.loads(out2) == doc


# --------------------------------------------------------------------------- verify


def _flip_byte(root: str, step: int) -> str:
    m = json.loads(Path(root, f"step_{step:09d}", "manifest.json").read_bytes())
    chunk = m["tensors"]["model.0.weight"]["chunks"][0]
    path = Path(root, f"step_{step:09d}", chunk["file"])
    data = bytearray(path.read_bytes())
    data[chunk["data_offset"] + 5] ^= 0x40
    path.write_bytes(bytes(data))
    return chunk["file"]


def test_verify_ok_then_catches_a_flipped_byte(ckpt, capsys) -> None:
    root, _ = ckpt
    rc, out, err = _run(capsys, "verify", root)
    assert rc == 0 and out.startswith("OK") and "step_000000030" in out, err
    assert err == ""  # the progress bar stays quiet when stderr is not a terminal

    name = _flip_byte(root, 30)
    rc, out, _ = _run(capsys, "verify", root)
    assert rc == 1
    assert out.startswith("FAILED") and name in out and "checksum mismatch" in out

    rc, out, _ = _run(capsys, "verify", root, "--all")
    assert rc == 1
    assert "OK      " + os.path.join(root, "step_000000010") in out
    assert "FAILED  " + os.path.join(root, "step_000000030") in out
    assert "2 of 3 checkpoints OK, 1 FAILED" in out
    assert _run(capsys, "verify", root, "--step", "20")[0] == 0


def test_corrupt_manifest_is_an_error_not_a_traceback(ckpt, capsys) -> None:
    root, _ = ckpt
    Path(root, "step_000000030", "manifest.json").write_text('{"format": "asyncckpt", "schema_version": 1')
    step30 = os.path.join(root, "step_000000030")
    rc, out, err = _run(capsys, "inspect", step30)
    assert rc == 1 and err.startswith("asyncckpt: error: invalid manifest") and "Traceback" not in err
    assert len(err.splitlines()) == 1
    rc, out, _ = _run(capsys, "verify", step30)
    assert rc == 1 and out.startswith("FAILED") and "invalid manifest" in out
    rc, out, _ = _run(capsys, "inspect", root, "--json")  # the newest *committed* one is now 20
    assert rc == 0 and json.loads(out)["step"] == 20


# --------------------------------------------------------------------------- export


def test_export_single_file_is_bit_exact(ckpt, capsys, tmp_path) -> None:
    root, expected = ckpt
    out_dir = str(tmp_path / "out")
    rc, out, err = _run(capsys, "export", root, out_dir)
    assert rc == 0, err
    assert sorted(os.listdir(out_dir)) == ["model.safetensors"]
    assert_same(load_file(os.path.join(out_dir, "model.safetensors")), expected)

    # --only model. strips the prefix (HF names), and an existing export needs --force
    rc, _, err = _run(capsys, "export", root, out_dir, "--only", "model.")
    assert rc == 1 and "--force" in err
    rc, _, err = _run(capsys, "export", root, out_dir, "--only", "model.", "--force")
    assert rc == 0, err
    got = load_file(os.path.join(out_dir, "model.safetensors"))
    assert_same(got, {k[len("model.") :]: v for k, v in expected.items() if k.startswith("model.")})

    rc, _, err = _run(capsys, "export", root, out_dir, "--only", "model.", "--strip-prefix", "", "--force")
    assert rc == 0, err
    assert set(load_file(os.path.join(out_dir, "model.safetensors"))) == {
        k for k in expected if k.startswith("model.")
    }


def test_export_casts_floating_tensors_only(ckpt, capsys, tmp_path) -> None:
    root, expected = ckpt
    out_dir = str(tmp_path / "bf16")
    rc, _, err = _run(capsys, "export", root, out_dir, "--dtype", "bf16", "--step", "30")
    assert rc == 0, err
    got = load_file(os.path.join(out_dir, "model.safetensors"))
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert _bytes_equal(got[k], want), k
    assert got["extra.counts"].dtype == torch.int64


def test_export_sharded_index_covers_every_tensor(ckpt, capsys, tmp_path) -> None:
    root, expected = ckpt
    out_dir = str(tmp_path / "sharded")
    rc, out, err = _run(capsys, "export", root, out_dir, "--max-shard-size", "600")
    assert rc == 0, err
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads(Path(out_dir, "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == expected.keys()
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(os.path.join(out_dir, f))
        assert all(index["weight_map"][k] == f for k in part)
        loaded.update(part)
    assert_same(loaded, expected)
    assert not os.path.exists(os.path.join(out_dir, "model.safetensors"))

    # re-exporting as one file with --force removes the stale shards and index
    rc, out, err = _run(capsys, "export", root, out_dir, "--force")
    assert rc == 0, err
    assert sorted(os.listdir(out_dir)) == ["model.safetensors"]


def test_export_assembles_a_tensor_from_several_chunks(tmp_path, capsys) -> None:
    """A multi-rank tensor is stored as pieces; export copies each into its offsets."""
    root = str(tmp_path / "ckpt")
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with AsyncCheckpointer(root, {"a": a, "b": b}) as ck:
        ck.save_async(1).result()
    mpath = Path(root, "step_000000001", "manifest.json")
    m = json.loads(mpath.read_bytes())
    top = dict(m["tensors"]["a"]["chunks"][0], offsets=[0, 0])
    bottom = dict(m["tensors"]["b"]["chunks"][0], offsets=[2, 0])
    m["tensors"]["w"] = {"dtype": "float32", "shape": [4, 4], "chunks": [bottom, top]}
    rewrite_manifest(str(mpath), m)
    out_dir = str(tmp_path / "out")
    rc, _, err = _run(capsys, "export", root, out_dir, "--only", "w")
    assert rc == 0, err
    assert torch.equal(load_file(os.path.join(out_dir, "model.safetensors"))["w"], torch.cat([a, b]))

    m["tensors"]["w"]["chunks"] = [top]  # the bottom half was never written
    rewrite_manifest(str(mpath), m)
    rc, _, err = _run(capsys, "export", root, str(tmp_path / "out2"), "--only", "w")
    assert rc == 1 and "leave 8 of 16 elements unwritten" in err and "Traceback" not in err


def test_export_of_a_corrupt_shard_fails_and_writes_nothing(ckpt, capsys, tmp_path) -> None:
    root, _ = ckpt
    _flip_byte(root, 30)
    out_dir = tmp_path / "out"
    rc, _, err = _run(capsys, "export", root, str(out_dir))
    assert rc == 1 and "checksum mismatch" in err
    assert not out_dir.exists() or os.listdir(out_dir) == []


# --------------------------------------------------------------------------- gc


def test_gc_dry_run_changes_nothing(ckpt, capsys) -> None:
    root, _ = ckpt
    tmp, step = _leftovers(root)
    before = tree_digest(root)
    rc, out, err = _run(capsys, "gc", root, "--dry-run", "--keep-last", "1", "--min-age", "0")
    assert rc == 0, err
    assert tree_digest(root) == before
    assert f"would remove uncommitted {tmp}" in out and f"would remove uncommitted {step}" in out
    assert "would remove step 10" in out and "would remove step 20" in out and "step 30 " not in out
    assert out.splitlines()[-1].startswith("dry run: would remove 2 uncommitted leftovers and 2 checkpoints")


def test_gc_removes_leftovers_and_applies_keep_last(ckpt, capsys) -> None:
    root, _ = ckpt
    _leftovers(root)
    rc, out, err = _run(capsys, "gc", root, "--keep-last", "2", "--min-age", "0")
    assert rc == 0, err
    assert [c.step for c in list_checkpoints(root)] == [20, 30]
    assert list_leftovers(root) == []
    assert os.listdir(os.path.join(root, ".tmp")) == []  # deleted steps were decommitted, then removed
    assert "removed 2 uncommitted leftovers and 1 checkpoint" in out.splitlines()[-1]
    assert _run(capsys, "verify", root, "--all")[0] == 0


def test_gc_keeps_recent_leftovers_by_default(ckpt, capsys) -> None:
    root, _ = ckpt
    tmp, step = _leftovers(root)
    rc, out, _ = _run(capsys, "gc", root)
    assert rc == 0
    assert sorted(list_leftovers(root)) == sorted([tmp, step])
    assert "may be a save in progress" in out and "every committed checkpoint is kept" in out
    assert [c.step for c in list_checkpoints(root)] == [10, 20, 30]


def test_gc_keep_best_and_protected_steps(ckpt, capsys) -> None:
    root, _ = ckpt
    Path(root, ".protected.json").write_text("[20]")
    rc, out, err = _run(capsys, "gc", root, "--keep-best", "1", "--metric", "loss", "--mode", "min")
    assert rc == 0, err
    # 10 has the best loss, 20 is protected, 30 is the newest
    assert [c.step for c in list_checkpoints(root)] == [10, 20, 30]
    Path(root, ".protected.json").write_text("[]")
    rc, out, err = _run(capsys, "gc", root, "--keep-best", "1", "--metric", "loss", "--mode", "max")
    assert rc == 0, err
    assert [c.step for c in list_checkpoints(root)] == [20, 30]  # 20 has the highest loss


def test_snapshots_are_listed_and_left_alone_by_gc(tmp_path, capsys) -> None:
    root = str(tmp_path / "ckpt")
    state = {"w": torch.zeros(8)}
    with AsyncCheckpointer(root, state, save_policy=10, snapshot_every=5, save_final=False) as ck:
        for step in (5, 10, 15, 20):
            state["w"].add_(1)
            ck.save_async(step)
    rc, out, _ = _run(capsys, "ls", root, "--json")
    tiers = [(c["step"], c["tier"]) for c in json.loads(out)["checkpoints"]]
    assert tiers == [(5, "snapshot"), (10, "permanent"), (15, "snapshot"), (20, "permanent")]
    rc, out, err = _run(capsys, "inspect", os.path.join(root, "snapshots", "step_000000015"), "--json")
    assert rc == 0 and json.loads(out)["tier"] == "snapshot", err
    rc, out, _ = _run(capsys, "gc", root, "--keep-last", "1")
    assert rc == 0 and "2 snapshots untouched" in out
    assert [(c.step, c.tier) for c in list_checkpoints(root)] == [
        (5, "snapshot"),
        (15, "snapshot"),
        (20, "permanent"),
    ]


def test_an_fsspec_root_works_like_a_local_one(tmp_path, capsys) -> None:
    fsspec = pytest.importorskip("fsspec")
    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    root = f"memory://{bucket}/run"
    state = {"w": torch.randn(4, 4), "extra": {"e": 1}}
    try:
        with AsyncCheckpointer(root, state) as ck:
            for step in (1, 2):
                ck.save_async(step, metrics={"loss": 1.0 / step}).result()
        fsspec.filesystem("memory").pipe(f"/{bucket}/run/step_000000003/__0_0.distcp", b"partial")
        rc, out, err = _run(capsys, "ls", root, "--json")
        doc = json.loads(out)
        assert [c["step"] for c in doc["checkpoints"]] == [1, 2]
        assert [lo["path"] for lo in doc["leftovers"]] == [f"{root}/step_000000003"]
        assert _run(capsys, "verify", root, "--all")[0] == 0
        rc, _, err = _run(capsys, "export", root, str(tmp_path / "out"))
        assert rc == 0, err
        assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], state["w"])
        rc, out, _ = _run(capsys, "gc", root, "--keep-last", "1")  # the store's mtimes: too recent
        assert rc == 0 and "changed 0s ago" in out and len(list_leftovers(root)) == 1
        rc, out, _ = _run(capsys, "gc", root, "--min-age", "0")
        assert rc == 0 and list_leftovers(root) == []
        assert [c.step for c in list_checkpoints(root)] == [2]
    finally:
        fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)


# --------------------------------------------------------------------------- bench


def test_bench_quick(tmp_path, capsys) -> None:
    out_json = tmp_path / "bench.json"
    argv = [
        "bench",
        "--quick",
        "--size-gib",
        "0.004",
        "--tensors",
        "4",
        "--reps",
        "1",
        "--dir",
        str(tmp_path),
    ]
    rc, out, err = _run(capsys, *argv, "--json", str(out_json))
    assert rc == 0, err + out
    assert "asyncckpt (overlap=False)" in out and "x floor" in out
    result = json.loads(out_json.read_text())
    assert result["config"]["reps"] == 1 and result["config"]["n_tensors"] == 4


def test_bench_needs_no_benchmarks_package(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # any import of it would fail
    monkeypatch.setitem(sys.modules, "benchmarks.bench_stall", None)
    argv = ["bench", "--size-gib", "0.004", "--tensors", "4", "--reps", "1", "--dir", str(tmp_path)]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    assert "x floor" in out


# --------------------------------------------------------------------------- bad input and plumbing


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "{missing}"],
        ["inspect", "{missing}"],
        ["inspect", "{root}", "--step", "99"],
        ["inspect", "{root}/step_000000099"],
        ["inspect", "{root}/step_000000010", "--step", "20"],
        ["verify", "{missing}", "--all"],
        ["verify", "{root}/step_000000010", "--all"],
        ["export", "{root}", "{out}", "--step", "99"],
        ["export", "{root}", "{out}", "--only", "nothing."],
        ["export", "{root}", "{out}", "--max-shard-size", "lots"],
        ["export", "{root}", "{out}", "--dtype", "fp8"],
        ["gc", "{missing}"],
        ["gc", "{root}", "--keep-best", "1"],
        ["gc", "{root}", "--keep-last", "0"],
        ["gc", "{root}/step_000000010"],
        ["ls", "{root}", "--bogus"],
        ["frobnicate"],
        ["ls"],
    ],
)
def test_bad_input_exits_nonzero_with_a_message(ckpt, tmp_path, capsys, argv: list[str]) -> None:
    root, _ = ckpt
    fill = {"root": root, "missing": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    rc, out, err = _run(capsys, *(a.format(**fill) for a in argv))
    assert rc != 0
    assert "error:" in err and "Traceback" not in err + out
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]  # one line says what is wrong
    assert line.startswith("asyncckpt")


def test_a_step_left_uncommitted_is_named_as_such(ckpt, capsys) -> None:
    root, _ = ckpt
    _leftovers(root)
    rc, _, err = _run(capsys, "inspect", root, "--step", "50")
    assert rc == 1 and "step 50" in err and "not committed" in err


def test_help_and_demo_dispatch(monkeypatch, capsys) -> None:
    for cmd in ("ls", "inspect", "verify", "export", "gc", "bench"):
        rc, out, _ = _run(capsys, cmd, "--help")
        assert rc == 0 and out.startswith(f"usage: asyncckpt {cmd}")
    rc, out, _ = _run(capsys)
    assert rc == 2 and "export" in out
    seen: list[list[str]] = []

    def fake_demo(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    import asyncckpt.demo

    monkeypatch.setattr(asyncckpt.demo, "main", fake_demo)
    assert main(["demo", "--steps", "3"]) == 7 and seen == [["--steps", "3"]]


def test_progress_bar_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    with Progress(100, "x", stream=quiet) as bar:  # StringIO is not a tty
        bar.update(100)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    bar = Progress(2048, "verify", stream=loud, force=True)
    bar.update(2048)
    assert "100.0%" in loud.getvalue() and "2.0 KiB/2.0 KiB" in loud.getvalue()
    bar.close()
    assert loud.getvalue().endswith("\r")


def test_sizes() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30
    assert parse_size("1000") == 1000 and parse_size("1.5MB") == 1_500_000 and parse_size("10 kb") == 10_000
    for bad in ("", "0", "-1GB", "5XB", "GB"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert (
        human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 << 30) == "3.0 GiB"
    )


@pytest.mark.s3
def test_every_command_works_on_an_s3_root(s3, tmp_path, capsys) -> None:
    import json as _json

    from asyncckpt import AsyncCheckpointer
    from asyncckpt.cli import main as cli

    root, opts, fs = s3
    state = {"model": torch.nn.Linear(8, 4), "extra": {"epoch": 3}}
    with AsyncCheckpointer(root, state, storage_options=opts) as ck:
        ck.save_async(1).result()
        ck.save_async(2).result()
    fs.pipe(f"{root[5:]}/step_000000009/__0_0.distcp", b"abandoned")  # an uncommitted leftover
    o = ["--storage-options", _json.dumps(opts)]
    assert cli([*o, "ls", root, "--json"]) == 0
    listing = _json.loads(capsys.readouterr().out)
    assert [c["step"] for c in listing["checkpoints"]] == [1, 2] and len(listing["leftovers"]) == 1
    assert cli([*o, "inspect", root]) == 0
    out = capsys.readouterr().out
    assert "model.weight" in out and "epoch" in out
    assert cli([*o, "verify", root, "--all"]) == 0
    assert cli([*o, "export", root, str(tmp_path / "out")]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["model.weight"], state["model"].weight.detach())
    assert cli([*o, "gc", root, "--keep-last", "1", "--min-age", "0"]) == 0
    assert [c.step for c in __import__("asyncckpt").list_checkpoints(root, storage_options=opts)] == [2]
    assert not fs.exists(f"{root[5:]}/step_000000009")
    assert cli(["--storage-options", "not json", "ls", root]) != 0
    assert "JSON" in capsys.readouterr().err
