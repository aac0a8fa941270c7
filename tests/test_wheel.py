"""The package works from an installed wheel, away from the repository checkout.

A wheel is built from a copy of the checkout and installed (``--no-deps``) into a fresh venv.
That venv sees the test environment's third-party packages (torch, ...) through a ``.pth`` file
naming their site-packages directory: a directory added that way is not scanned for ``.pth``
files itself, so an editable install of asyncckpt there stays invisible, and ``import asyncckpt``
must find the wheel's copy.  ``asyncckpt bench`` then runs from an unrelated directory, where the
repository's ``benchmarks/`` folder cannot be imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What setuptools reads to build the wheel; the packages themselves are copied whole.
BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")
BUILD_DIRS = ("asyncckpt", "benchmarks")  # benchmarks/ too, so a wheel that packed it would show
IMPORTS_BENCHMARKS = re.compile(r"^\s*(from|import)\s+benchmarks\b|import_module\(\s*['\"]benchmarks", re.M)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _check(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of the checkout, built in a copy (an in-tree build would leave build/ behind)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "results")
    for name in BUILD_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    _check(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)],
        cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("asyncckpt-*.whl")
    return wheel


def _make_venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed; returns its bin/ directory."""
    venv = tmp_path / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # Installed before the .pth exists, so pip sees no asyncckpt in the venv and uninstalls nothing.
    _check(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)],
        cwd=tmp_path,
    )  # fmt: skip
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_check([str(python), "-c", purelib], cwd=tmp_path).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this env's packages
    (site / "zz_test_env.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv / "bin"


def test_bench_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "asyncckpt/bench.py" in names
    assert not [n for n in names if n.startswith("benchmarks/")]

    bindir = _make_venv(tmp_path, wheel)
    python = bindir / "python"
    work = tmp_path / "work"  # the working directory: nothing importable in it
    work.mkdir()
    probe = (
        "import importlib.util, os, asyncckpt, torch; "
        "print(os.path.realpath(asyncckpt.__file__)); "
        "print(importlib.util.find_spec('benchmarks'))"
    )
    pkg_file, benchmarks_spec = _check([str(python), "-c", probe], cwd=work).strip().splitlines()[-2:]
    pkg = Path(pkg_file).parent
    assert pkg.is_relative_to(os.path.realpath(tmp_path / "venv")), f"imported the wrong asyncckpt: {pkg}"
    assert not pkg.is_relative_to(REPO), pkg
    assert benchmarks_spec == "None", f"benchmarks is importable from {benchmarks_spec}"
    importers = [str(f) for f in pkg.rglob("*.py") if IMPORTS_BENCHMARKS.search(f.read_text())]
    assert not importers, f"the installed package imports benchmarks: {importers}"

    out = _check([str(bindir / "asyncckpt"), "bench", "--quick", "--dir", str(tmp_path / "ckpts")], cwd=work)
    assert "x floor" in out and "asyncckpt (overlap=True)" in out and "speedup of" in out, out
    assert "ERROR" not in out, out
    assert not any((tmp_path / "ckpts").iterdir())  # its temporary checkpoints are removed
