"""Every ```bash block in README.md and docs/*.md runs, or says where it is tested.

``asyncckpt`` command lines run as written (``python -m asyncckpt ...``) in a temporary
directory that holds real checkpoints at the paths they name; an ``s3://bucket/...`` root is
created on the moto server, whose address replaces the documented endpoint.  A block preceded
by ``<!-- not run: <reason> -->`` is skipped; one preceded by ``<!-- tested elsewhere: ... -->``
must name test files (and functions, as ``path::name``) that exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import requests
import torch

from asyncckpt import AsyncCheckpointer

from .conftest import KEY_ID, SECRET
from .test_docs_examples import FILES, REPO

BLOCK = re.compile(r"(?:<!--\s*(not run|tested elsewhere):(.*?)-->\n)?```bash\n(.*?)```", re.S)
DOC_ENDPOINT = "http://127.0.0.1:9000"


def shell_blocks(path: str) -> list[tuple[str | None, str, str]]:
    with open(os.path.join(REPO, path)) as f:
        return [(m.group(1), (m.group(2) or "").strip(), m.group(3)) for m in BLOCK.finditer(f.read())]


def commands(code: str) -> list[list[str]]:
    out = []
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def _checkpoint(root: str, storage_options: dict | None = None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with AsyncCheckpointer(root, state={"model": model, "optim": opt}, storage_options=storage_options) as ck:
        for step, loss in ((10, 0.9), (20, 0.5), (30, 0.7), (40, 0.6)):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            ck.save_async(step, metrics={"eval_loss": loss})


CASES = [(f, i) for f in FILES for i, (mark, _, _) in enumerate(shell_blocks(f)) if mark != "not run"]


@pytest.mark.parametrize(("path", "index"), CASES, ids=[f"{f}:{i}" for f, i in CASES])
def test_shell_block(path: str, index: int, tmp_path, moto_endpoint, request) -> None:
    mark, note, code = shell_blocks(path)[index]
    if mark == "tested elsewhere":
        names = re.findall(r"(?:tests/[\w/]+\.py|\.ci/run)(?:::\w+)?", note)
        assert names, f"{path} block {index}: name the tests that run it"
        for name in names:
            file, _, func = name.partition("::")
            with open(os.path.join(REPO, file)) as f:
                assert not func or f"def {func}(" in f.read(), f"{path}: {name} does not exist"
        return
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    made: set[str] = set()
    for argv in commands(code):
        assert argv[0] == "asyncckpt", f"{path} block {index}: {argv[0]!r} is not run here; mark the block"
        args = [a.replace(DOC_ENDPOINT, moto_endpoint) for a in argv[1:]]
        for a in args:
            if a.startswith("checkpoints/") and a not in made:
                _checkpoint(str(tmp_path / a))
                made.add(a)
            elif a.startswith("s3://") and a not in made:
                from asyncckpt.storage import FsspecStorage

                opts = {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": moto_endpoint}}
                bucket = a.split("/")[2]
                FsspecStorage(a, opts).fs.call_s3("create_bucket", Bucket=bucket)
                request.addfinalizer(lambda: requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10))
                _checkpoint(a, opts)
                made.add(a)
        proc = subprocess.run(
            [sys.executable, "-m", "asyncckpt", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{path}: `{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr}"
        assert proc.stdout.strip(), f"{path}: `{' '.join(argv)}` printed nothing"


def test_every_bash_block_is_covered() -> None:
    """No block slips through: each one is run above, or marked with a reason."""
    for f in FILES:
        with open(os.path.join(REPO, f)) as fh:
            text = fh.read()
        assert text.count("```bash") == len(shell_blocks(f)), f
        for mark, note, _ in shell_blocks(f):
            assert mark is None or len(note) > 5, f"{f}: say why the block is not run here"
