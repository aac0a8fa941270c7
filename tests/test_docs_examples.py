"""Every ```python block in README.md and docs/*.md runs.

Blocks run in order per file, sharing one namespace, in a temporary working directory,
after a prelude that defines the names the prose assumes (``model``, ``opt``, ``sched``,
``state``, ``train_step``, ``total``).  A block whose first line is ``# not run: <reason>``
is skipped; the reason must say why (e.g. it needs a cluster).
"""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md"] + [
    os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs"))) if f.endswith(".md")
]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

PRELUDE = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, 10)
state = {"model": model, "optim": opt, "sched": sched}
total = 30
def train_step():
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
"""


def blocks(path: str) -> list[str]:
    with open(os.path.join(REPO, path)) as f:
        return BLOCK.findall(f.read())


@pytest.mark.parametrize("path", [f for f in FILES if blocks(f)])
def test_code_blocks_run(path: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    exec(PRELUDE, ns)
    ran = 0
    for i, code in enumerate(blocks(path)):
        first = code.strip().splitlines()[0] if code.strip() else ""
        if first.startswith("# not run:"):
            assert len(first) > len("# not run:") + 5, f"{path} block {i}: say why it is not run"
            continue
        try:
            exec(compile(code, f"{path}:block{i}", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{path} code block {i} failed: {type(e).__name__}: {e}\n{code}") from e
        ran += 1
    # close anything the blocks left open, so threads and processes don't leak
    for v in list(ns.values()):
        if type(v).__name__ == "AsyncCheckpointer":
            v.close()
    assert ran >= 0
