"""Shared test helpers: state builders, comparisons and a fault-injecting storage wrapper."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from typing import Any

import torch

from asyncckpt.storage import LocalStorage, wrap_os_error


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int = 2) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()


def tensors_of(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor reachable in ``obj`` (state_dict() of Stateful objects), by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        out.update(tensors_of(obj.state_dict(), prefix))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_of(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{prefix}.{i}"))
    return out


def zeroed(obj: Any) -> Any:
    """``obj`` with every tensor replaced by zeros of its shape and dtype (dicts, lists kept)."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: zeroed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [zeroed(v) for v in obj]
    return obj


def snapshot(obj: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors_of(obj).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        # compare bytes: exact even for NaN payloads and fp8
        assert bytes(a[k].contiguous().view(-1).view(torch.uint8).numpy()) == bytes(
            b[k].contiguous().view(-1).view(torch.uint8).numpy()
        ), k


def tree_digest(path: str) -> str:
    """A hash of every file under ``path`` (names and bytes)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class _FaultyFile:
    def __init__(self, f: Any, budget: list[int], err: OSError) -> None:
        self.f, self.budget, self.err = f, budget, err
        self.name = getattr(f, "name", "?")

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if self.budget[0] is not None and self.budget[0] < n:
            raise self.err
        if self.budget[0] is not None:
            self.budget[0] -= n
        return self.f.write(b)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


class FaultyStorage(LocalStorage):
    """Real local storage that fails on demand: after ``fail_after_bytes`` bytes written, or
    on the n-th call of an operation (``fail_op``, ``fail_on_call``)."""

    def __init__(
        self,
        fail_after_bytes: int | None = None,
        fail_op: str | None = None,
        fail_on_call: int = 1,
        err: OSError | None = None,
        block: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.budget = [fail_after_bytes]
        self.fail_op = fail_op
        self.fail_on_call = fail_on_call
        self.calls: dict[str, int] = {}
        self.err = err or OSError(errno.EIO, "injected I/O error")
        self.block = block

    def _maybe_fail(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.block is not None and op == "rename_dir":
            self.block.wait()
        if op == self.fail_op and self.calls[op] == self.fail_on_call:
            raise self.err

    def open_write(self, path: str) -> Any:
        self._maybe_fail("open_write")
        return _FaultyFile(super().open_write(path), self.budget, self.err)

    def open_direct(self, path: str) -> Any:
        self._maybe_fail("open_write")
        return _FaultyFile(super().open_direct(path), self.budget, self.err)

    def finish_write(self, f: Any, path: str = "", size: int | None = None) -> None:
        self._maybe_fail("finish_write")
        super().finish_write(f.f if isinstance(f, _FaultyFile) else f, path, size)

    def abort_write(self, f: Any) -> None:
        super().abort_write(f.f if isinstance(f, _FaultyFile) else f)

    def write_file(self, path: str, data: Any, size: int, pace: Any = None, ready: Any = None) -> None:
        """The whole-file write (O_DIRECT) with the same faults: at open, after the byte
        budget (leaving the partial file a failed write leaves), at the fsync."""
        self._maybe_fail("open_write")
        budget = self.budget[0]
        if budget is not None and budget < size:
            with open(path, "xb") as f:
                f.write(data[:budget])
            self.budget[0] = 0
            raise wrap_os_error("write", path, self.err) from self.err
        if budget is not None:
            self.budget[0] = budget - size
        super().write_file(path, data, size, pace, ready)
        try:
            self._maybe_fail("finish_write")
        except OSError as e:
            raise wrap_os_error("fsync", path, e) from e

    def rename_dir(self, src: str, dst: str) -> None:
        self._maybe_fail("rename_dir")
        super().rename_dir(src, dst)

    def sync_dir(self, path: str) -> None:
        self._maybe_fail("sync_dir")
        super().sync_dir(path)


def rewrite_manifest(path: str, doc: dict[str, Any]) -> None:
    """Write an edited manifest with a matching self-checksum, as a deliberate editor would."""
    import json

    from asyncckpt.manifest import _self_checksum

    doc = {k: v for k, v in doc.items() if k != "checksum"}
    doc["checksum"] = _self_checksum(doc)
    with open(path, "w") as f:
        f.write(json.dumps(doc, indent=1))
