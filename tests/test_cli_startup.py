"""The ``asyncckpt`` command starts without importing torch where the command does not need it.

Importing torch takes seconds; ``--help``, ``ls``, ``inspect`` and ``gc`` only read JSON and
list files.  These tests assert on what was imported, not on wall time (timings are flaky on
shared machines); docs/cli.md records the measured start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.manifest import DTYPES, ITEMSIZES

REPO = str(Path(__file__).resolve().parents[1])

# Runs the CLI's main in a fresh interpreter, then reports its exit code and whether torch
# (or anything under it) was imported.
_WRAPPER = (
    "import json, sys\n"
    "from asyncckpt.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(json.dumps({'rc': rc, 'torch': sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5]}))\n"
)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO)


def _cli(*argv: str) -> tuple[int, list[str], str]:
    r = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return report["rc"], report["torch"], r.stdout


@pytest.fixture
def one_checkpoint(tmp_path: Path) -> str:
    root = str(tmp_path / "ckpt")
    state = {"w": torch.arange(6, dtype=torch.float32)}
    with AsyncCheckpointer(root, state) as ck:
        ck.save_async(3, metrics={"loss": 0.25}).result()
    return root


def test_help_does_not_import_torch() -> None:
    rc, mods, out = _cli("--help")
    assert rc == 0 and "ls" in out
    assert mods == [], f"--help imported {mods}"


def test_ls_and_inspect_of_a_local_root_do_not_import_torch(one_checkpoint: str) -> None:
    rc, mods, out = _cli("ls", one_checkpoint)
    assert rc == 0 and "0.25" in out and "1 committed checkpoint" in out
    assert mods == [], f"ls imported {mods}"
    rc, mods, out = _cli("inspect", one_checkpoint, "--json")
    assert rc == 0 and '"float32"' in out
    assert mods == [], f"inspect imported {mods}"


def test_python_m_forms_do_not_import_torch() -> None:
    """``python -m asyncckpt`` and ``python -m asyncckpt.cli``, seen by ``-X importtime``."""
    for module in ("asyncckpt", "asyncckpt.cli"):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", module, "--help"],
            capture_output=True, text=True, env=_env(), timeout=120,
        )  # fmt: skip
        assert r.returncode == 0 and "usage: asyncckpt" in r.stdout
        imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
        assert "asyncckpt.cli" in imported
        assert not [m for m in imported if m.split(".")[0] == "torch"]


def test_import_asyncckpt_is_lazy_and_every_public_name_resolves() -> None:
    code = (
        "import sys, asyncckpt\n"
        "before = 'torch' in sys.modules\n"
        "from asyncckpt import AsyncCheckpointer, resume, ConfigError\n"
        "import asyncckpt.resume\n"  # the submodule must not shadow the function
        "ok = all(getattr(asyncckpt, n) is not None for n in asyncckpt.__all__)\n"
        "print(before, callable(asyncckpt.resume) and type(asyncckpt.resume).__name__, ok)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.stdout.split() == ["False", "function", "True"], r.stderr
    assert asyncckpt.resume.__module__ == "asyncckpt.resume"
    with pytest.raises(AttributeError, match="no_such_name"):
        asyncckpt.no_such_name  # noqa: B018


def test_manifest_itemsizes_match_torch() -> None:
    """The manifest validates dtypes without torch; its table must agree with torch's."""
    assert set(DTYPES) == set(ITEMSIZES)  # this torch has every dtype the format names
    assert {n: d.itemsize for n, d in DTYPES.items()} == ITEMSIZES
