"""Hostile files under a checkpoint root: pickles, manifests, symlinks, FIFOs.

Nothing is ever unpickled (a canary ``__reduce__`` never fires), a hostile manifest is
rejected with CorruptCheckpointError and resume falls back with a warning, no reader hangs on
a FIFO, and no file outside the root is opened, listed, renamed or removed: every access is
recorded through ``sys.addaudithook`` (root can read any file, so an unreadable decoy would
prove nothing).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import pickle
import shutil
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from asyncckpt import AsyncCheckpointer, CorruptCheckpointError, list_checkpoints, resume
from asyncckpt.catalog import read_manifest
from asyncckpt.checksum import DEFAULT, checksum
from asyncckpt.cli import build_parser
from asyncckpt.cli import main as cli_main
from asyncckpt.manifest import MAX_MANIFEST_BYTES, MAX_TREE_DEPTH
from asyncckpt.step_files import verify_files
from asyncckpt.storage import LocalStorage

from ..helpers import rewrite_manifest
from ._support import FileAudit, fill, make_state, report, save_two_steps, state_mismatch

NUMEL = 1 << 12
STEP2 = "step_000000002"


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def two_steps(tmp_path) -> str:
    root = str(tmp_path / "ckpt")
    save_two_steps(root, NUMEL)
    return root


@pytest.fixture
def outside(tmp_path) -> str:
    """A directory outside the root with a decoy file; nothing may touch it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.bin").write_bytes(b"do not read me " * 100)
    return str(d)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for n in sorted(files):
            p = os.path.join(dirpath, n)
            h.update(p.encode())
            if os.path.isfile(p) and not os.path.islink(p):
                h.update(open(p, "rb").read())
    return h.hexdigest()


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue() + err.getvalue()


def _has_cli(cmd: str) -> bool:
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None))
    return cmd in sub.choices  # type: ignore[operator]


def _resume_falls_back(root: str, match: str = "skipping step 2", to: int = 1) -> list[str]:
    fresh = make_state(NUMEL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = resume(root, fresh)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert got == to and state_mismatch(fresh, to) is None, (got, msgs)
    assert any(match in m for m in msgs), msgs
    return msgs


def _no_hang(fn: Callable[[], Any], fifos: list[str], timeout: float = 10.0) -> Any:
    """Run ``fn`` in a thread; if it blocks on a FIFO, unblock it and fail."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:  # a writer that opens and closes lets the blocked reader see EOF
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"hung for {timeout}s on a FIFO")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- pickles


def test_hostile_metadata_pickle_never_runs(two_steps: str, tmp_path) -> None:
    root = two_steps
    canary = str(tmp_path / "canary")
    payload = pickle.dumps(_Canary(canary))
    pickle.loads(payload)  # the payload is live (so this test can fail) ...
    assert os.path.exists(canary)
    os.remove(canary)  # ... and is now planted where stock DCP would unpickle it
    with open(os.path.join(root, STEP2, ".metadata"), "wb") as f:
        f.write(payload)
    step_dir = os.path.join(root, STEP2)
    fresh = make_state(NUMEL)
    assert resume(root, fresh) == 2 and state_mismatch(fresh, 2) is None
    assert [c.step for c in list_checkpoints(root)] == [1, 2]
    assert any(
        ".metadata" in p
        for p in verify_files(LocalStorage(), step_dir, read_manifest(LocalStorage(), step_dir))
    )
    ran = {"ls": _cli("ls", root)[0], "inspect": _cli("inspect", root)[0], "inspect --json": _cli("inspect", "--json", root)[0],
           "verify": _cli("verify", step_dir)[0], "verify --all": _cli("verify", "--all", root)[0]}  # fmt: skip
    assert ran["verify"] == 1 and ran["inspect"] == 0
    if _has_cli("export"):
        ran["export"] = _cli("export", step_dir, str(tmp_path / "export"))[0]
        assert ran["export"] == 0
    # a checkpointer on the root, retention deleting the hostile step, a process writer
    state = make_state(NUMEL)
    with AsyncCheckpointer(root, state, keep=1, executor="process") as ck:
        fill(state, 3)
        ck.save_async(3).result()
    assert not os.path.exists(step_dir)
    assert not os.path.exists(canary)
    report("hostile_metadata_pickle", {"entry_points": sorted(ran), "canary_created": False})


def _data_pkl_span(blob: bytes) -> tuple[int, int]:
    """(offset, size) of the stored data.pkl record inside a torch.save zip."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    head = blob[info.header_offset : info.header_offset + 30]
    name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _plant_pickle_in_blob(step_dir: str, fqn: str, payload: bytes) -> None:
    """Replace the data.pkl record of ``fqn``'s blob with ``payload`` and fix up the crc32 in
    the manifest, as an attacker who can write the checkpoint would."""
    mpath = os.path.join(step_dir, "manifest.json")
    doc = json.loads(open(mpath).read())
    chunk = doc["tensors"][fqn]["chunks"][0]
    path = os.path.join(step_dir, chunk["file"])
    data = bytearray(open(path, "rb").read())
    blob = bytes(data[chunk["offset"] : chunk["offset"] + chunk["length"]])
    start, size = _data_pkl_span(blob)
    assert len(payload) <= size, (len(payload), size)
    padded = payload + b"." * (size - len(payload))  # bytes after STOP are never read
    new_blob = blob[:start] + padded + blob[start + size :]
    data[chunk["offset"] : chunk["offset"] + chunk["length"]] = new_blob
    open(path, "wb").write(bytes(data))
    algo = "crc32c" if "crc32c" in chunk else "crc32"
    chunk[algo] = checksum(algo, new_blob)
    # an attacker who can rewrite the files can rewrite the manifest's own checksum too
    doc.pop("checksum", None)
    doc["checksum"] = zlib.crc32(json.dumps(doc, indent=1).encode())
    open(mpath, "w").write(json.dumps(doc, indent=1))


def test_hostile_pickle_inside_a_shard_blob_never_runs(two_steps: str, tmp_path) -> None:
    """Stock torch.load would unpickle each blob's data.pkl; asyncckpt reads raw bytes only."""
    root = two_steps
    canary = str(tmp_path / "c")
    payload = pickle.dumps(_Canary(canary), protocol=2)
    step_dir = os.path.join(root, STEP2)
    _plant_pickle_in_blob(step_dir, "w.a", payload)
    assert not os.path.exists(canary)
    fresh = make_state(NUMEL)
    assert resume(root, fresh) == 2 and state_mismatch(fresh, 2) is None  # tensor bytes untouched
    assert _cli("verify", step_dir)[0] == 0  # the crc was fixed up: nothing to see but bytes
    assert _cli("inspect", step_dir)[0] == 0
    if _has_cli("export"):
        assert _cli("export", step_dir, str(tmp_path / "export"))[0] == 0
    assert not os.path.exists(canary)
    # the planted pickle is live: extracting data.pkl and unpickling it creates the canary
    doc = json.loads(open(os.path.join(step_dir, "manifest.json")).read())
    c = doc["tensors"]["w.a"]["chunks"][0]
    blob = open(os.path.join(step_dir, c["file"]), "rb").read()[c["offset"] : c["offset"] + c["length"]]
    start, size = _data_pkl_span(blob)
    pickle.loads(blob[start : start + size])
    assert os.path.exists(canary)


# ----------------------------------------------------------------------------- manifests


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _rename_file(new: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["files"][new] = doc["files"].pop("__0_0.distcp")
        for t in doc["tensors"].values():
            for c in t["chunks"]:
                c["file"] = new

    return edit


def _deep_state(doc: dict[str, Any]) -> None:
    node: dict[str, Any] = {"t": "value", "v": 1}
    for _ in range(MAX_TREE_DEPTH + 5):
        node = {"t": "list", "items": [node]}
    doc["state"]["extra"]["items"].append(["deep", node])


CHUNK = ["tensors", "w.a", "chunks", 0]
HOSTILE: dict[str, Callable[[dict[str, Any]], None]] = {
    "file ../ escape": _rename_file("../../outside/secret.bin"),
    "file absolute path": _rename_file("/placeholder"),  # see _abs
    "file ..": _rename_file(".."),
    "file in a subdir": _rename_file("sub/__0_0.distcp"),
    "file with NUL": _rename_file("__0_0\x00.distcp"),
    "file name 300 chars": _rename_file("a" * 300),
    "step as string": _set(["step"], "2"),
    "step negative": _set(["step"], -2),
    "step says 5 in step_2": _set(["step"], 5),
    "files is a list": _set(["files"], []),
    "size as string": _set(["files", "__0_0.distcp", "size"], "12"),
    "size negative": _set(["files", "__0_0.distcp", "size"], -1),
    "size true": _set(["files", "__0_0.distcp", "size"], True),
    "size float": _set(["files", "__0_0.distcp", "size"], 12.0),
    "size NaN": _set(["files", "__0_0.distcp", "size"], float("nan")),
    "size 10**30": _set(["files", "__0_0.distcp", "size"], 10**30),
    "chunk offset negative": _set([*CHUNK, "offset"], -5),
    "chunk length 2**62": _set([*CHUNK, "length"], 2**62),
    "data_offset before its blob": _set(["tensors", "w.b", "chunks", 0, "data_offset"], 0),
    "nbytes mismatch": _set([*CHUNK, "nbytes"], 12),
    "checksum negative": _set([*CHUNK, DEFAULT], -1),
    "checksum missing": lambda doc: doc["tensors"]["w.a"]["chunks"][0].pop(DEFAULT),
    "two checksums": _set([*CHUNK, "crc32" if DEFAULT == "crc32c" else "crc32c"], 1),
    "dtype object": _set(["tensors", "w.a", "dtype"], "object"),
    "shape negative": _set(["tensors", "w.a", "shape"], [-1]),
    "shape a string": _set(["tensors", "w.a", "shape"], "4096"),
    "shape 100 dims": _set(["tensors", "w.a", "shape"], [1] * 100),
    "tensors a list": _set(["tensors"], []),
    "chunk file not listed": _set([*CHUNK, "file"], "__0_9.distcp"),
    "state node of unknown type": _set(["state", "extra"], {"t": "pickle", "v": "gASVAAAA"}),
    "state tensor not in tensors": _set(["state", "extra"], {"t": "tensor", "fqn": "nope"}),
    "state nested too deep": _deep_state,
    "format missing": lambda d: d.pop("format"),
    "schema_version 999": _set(["schema_version"], 999),
    "world_size a string": _set(["world_size"], "1"),
    "created_at a string": _set(["created_at"], "yesterday"),
    "metrics a list": _set(["metrics"], [1, 2]),
    "piece beyond the world size": _set(["piece"], 1),
    "piece a string": _set(["piece"], "0"),
    # the manifest's own checksum (cases above rewrite it to match, as an attacker would)
    "checksum stale": _set(["state", "extra", "items", 0, 1, "v"], 3),
    "checksum stripped, ../ name": _rename_file("../../outside/secret.bin"),
    "checksum a string": _set(["checksum"], "0"),
}
RAW: dict[str, bytes] = {
    "not UTF-8": b"\xff\xfe{}",
    "not JSON": b"<manifest/>",
    "JSON nested 100000 deep": b'{"format": "asyncckpt", "metrics": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "integer with 5000 digits": b'{"format": "asyncckpt", "step": ' + b"9" * 5000 + b"}",
    "a JSON list": b"[1, 2, 3]",
    "empty": b"",
}


@pytest.mark.parametrize("case", [*HOSTILE, *RAW])
def test_hostile_manifest_is_rejected(two_steps: str, outside: str, case: str) -> None:
    root = two_steps
    step_dir = os.path.join(root, STEP2)
    mpath = os.path.join(step_dir, "manifest.json")
    if case in RAW:
        with open(mpath, "wb") as f:
            f.write(RAW[case])
    else:
        doc = json.loads(open(mpath).read())
        HOSTILE[case](doc)
        if case == "file absolute path":
            doc = _abs(doc, outside)
        if case in ("checksum stale", "checksum a string"):
            open(mpath, "w").write(json.dumps(doc, indent=1))
        elif case.startswith("checksum stripped"):
            doc.pop("checksum", None)
            open(mpath, "w").write(json.dumps(doc, indent=1))
        else:  # an attacker fixes up the manifest's own checksum: each check must hold alone
            rewrite_manifest(mpath, doc)
    before = _digest(outside)
    with FileAudit() as audit:
        try:  # rejected by the parser, or (sizes, step) by the checks that follow it
            m = read_manifest(LocalStorage(), step_dir)
            rejected_by = "checks after parsing"
            assert m.step != 2 or verify_files(LocalStorage(), step_dir, m) != []
        except CorruptCheckpointError:
            rejected_by = "parser"
        _resume_falls_back(root)
        if rejected_by == "parser":  # listing parses manifests; it does not stat every file
            assert [c.step for c in list_checkpoints(root)] == [1]
        code, text = _cli("verify", step_dir)
        assert code == 1 and "Traceback" not in text, text
        if rejected_by == "parser":  # inspect shows a parsed manifest; it does not stat the files
            assert _cli("inspect", step_dir)[0] == 1
        assert _cli("ls", root)[0] == 0
        with AsyncCheckpointer(root, make_state(NUMEL), keep=1) as ck:  # retention over it
            ck.save_async(3).result()
    assert audit.touching(outside) == []
    assert _digest(outside) == before
    _REJECTED[case] = rejected_by


_REJECTED: dict[str, str] = {}


def test_hostile_manifest_report() -> None:
    """Runs after the parametrized cases above (file order): prints who rejected what."""
    if _REJECTED:
        by = {k: sorted(c for c, v in _REJECTED.items() if v == k) for k in set(_REJECTED.values())}
        report("hostile_manifests", {"cases": len(_REJECTED), "rejected_by": {k: len(v) for k, v in by.items()},
                                     "after_parsing": by.get("checks after parsing", [])})  # fmt: skip


def _abs(doc: dict[str, Any], outside: str) -> dict[str, Any]:
    """Point every chunk at the decoy outside the root by its absolute path."""
    doc = copy.deepcopy(doc)
    name = os.path.join(outside, "secret.bin")
    doc["files"] = {name: doc["files"].pop("/placeholder")}
    for t in doc["tensors"].values():
        for c in t["chunks"]:
            c["file"] = name
    return doc


def test_oversized_manifest_is_rejected_without_reading_it(two_steps: str) -> None:
    root = two_steps
    mpath = os.path.join(root, STEP2, "manifest.json")
    with open(mpath, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with FileAudit() as audit:
        _resume_falls_back(root, "larger than")
        assert _cli("verify", os.path.join(root, STEP2))[0] == 1
    assert not any(e == "open" and p == mpath for e, p in audit.log), "the oversized manifest was opened"


# ----------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("name", ["manifest.json", "__0_0.distcp", ".metadata"])
def test_symlink_out_of_the_step_is_never_followed(two_steps: str, outside: str, name: str) -> None:
    root = two_steps
    step_dir = os.path.join(root, STEP2)
    target = os.path.join(outside, name)
    shutil.move(os.path.join(step_dir, name), target)  # a valid file, but outside the root
    os.symlink(target, os.path.join(step_dir, name))
    before = _digest(outside)
    with FileAudit() as audit:
        if name == ".metadata":  # resume never reads it; verify refuses the link
            fresh = make_state(NUMEL)
            assert resume(root, fresh) == 2 and state_mismatch(fresh, 2) is None
        else:
            _resume_falls_back(root, "not a regular file" if name != "manifest.json" else "missing")
        assert _cli("verify", step_dir)[0] == 1
        with AsyncCheckpointer(root, make_state(NUMEL), keep=1) as ck:
            ck.save_async(3).result()
    if name != "manifest.json":  # committed (listed): retention removed the link, not its target
        assert not os.path.exists(step_dir)
    assert [e for e in audit.touching(outside) if e[0] != "os.listdir"] == []
    assert _digest(outside) == before


def _outside_checkpoint(outside: str) -> str:
    other = os.path.join(outside, "other_run")
    state = make_state(NUMEL)
    fill(state, 7)
    with AsyncCheckpointer(other, state) as ck:
        ck.save_async(7).result()
    return os.path.join(other, "step_000000007")


def test_symlinked_step_directory_is_not_loaded(two_steps: str, outside: str) -> None:
    root = two_steps
    os.symlink(_outside_checkpoint(outside), os.path.join(root, "step_000000007"))
    with FileAudit() as audit:
        fresh = make_state(NUMEL)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = resume(root, fresh)
    assert got == 2, f"resume loaded step {got} from outside the root"
    assert audit.touching(outside) == []


def test_retention_never_deletes_through_a_symlinked_step(two_steps: str, outside: str) -> None:
    root = two_steps
    target = _outside_checkpoint(outside)
    os.symlink(target, os.path.join(root, "step_000000000"))
    before = _digest(outside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with AsyncCheckpointer(root, make_state(NUMEL), keep=1) as ck:
            ck.save_async(3).result()
    assert _digest(outside) == before and os.path.isdir(target)


def _odd_leftover(root: str, outside: str, kind: str) -> str:
    tmp = os.path.join(root, ".tmp")
    os.makedirs(tmp, exist_ok=True)
    leftover = os.path.join(tmp, "step_000000009.0123456789abcdef")  # a name the sweep matches
    if kind == "symlink":
        os.symlink(outside, leftover)
    elif kind == "file":
        open(leftover, "w").write("x")
    else:
        os.mkfifo(leftover)
    return leftover


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_odd_leftover_in_tmp_does_not_block_the_checkpointer(two_steps: str, outside: str, kind: str) -> None:
    leftover = _odd_leftover(two_steps, outside, kind)
    before = _digest(outside)
    try:
        AsyncCheckpointer(two_steps, make_state(NUMEL)).close()
    finally:
        assert _digest(outside) == before  # whatever happens, the target survives
    assert not os.path.lexists(leftover)


def test_fifo_leftover_in_tmp_does_not_hang_the_checkpointer(two_steps: str, outside: str) -> None:
    leftover = _odd_leftover(two_steps, outside, "fifo")
    _no_hang(lambda: AsyncCheckpointer(two_steps, make_state(NUMEL)).close(), [leftover], timeout=5)
    assert not os.path.lexists(leftover)


# ----------------------------------------------------------------------------- FIFOs


@pytest.mark.parametrize("name", ["__0_0.distcp", "manifest.json", ".metadata"])
def test_fifo_in_place_of_a_file_never_hangs(two_steps: str, name: str) -> None:
    root = two_steps
    step_dir = os.path.join(root, STEP2)
    path = os.path.join(step_dir, name)
    os.remove(path)
    os.mkfifo(path)

    def readers() -> None:
        fresh = make_state(NUMEL)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = resume(root, fresh)
        want = 2 if name == ".metadata" else 1
        assert got == want and state_mismatch(fresh, want) is None, [str(w.message) for w in caught]
        assert _cli("verify", step_dir)[0] == 1
        # --all verifies the committed steps; without a manifest, step 2 is not one
        assert _cli("verify", "--all", root)[0] == (0 if name == "manifest.json" else 1)
        assert _cli("inspect", step_dir)[0] == (0 if name != "manifest.json" else 1)
        assert _cli("ls", root)[0] == 0
        list_checkpoints(root)
        with AsyncCheckpointer(root, make_state(NUMEL), keep=1) as ck:
            ck.save_async(3).result()

    _no_hang(readers, [path])


def test_fifo_as_a_step_directory_never_hangs(two_steps: str) -> None:
    root = two_steps
    fifo = os.path.join(root, "step_000000005")
    os.mkfifo(fifo)
    _no_hang(lambda: _resume_falls_back(root, "skipping step 5", to=2), [fifo])
    assert _no_hang(lambda: _cli("ls", root)[0], [fifo]) == 0


def test_fifo_as_protected_json_never_hangs(two_steps: str) -> None:
    root = two_steps
    fifo = os.path.join(root, ".protected.json")
    os.mkfifo(fifo)
    _no_hang(lambda: AsyncCheckpointer(root, make_state(NUMEL)).close(), [fifo], timeout=5)
    assert _no_hang(lambda: _cli("ls", root)[0], [fifo], timeout=5) == 0
