from __future__ import annotations

import logging
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncckpt")


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "ckpt")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["thread", "process"])
def executor(request: pytest.FixtureRequest) -> str:
    """Core behaviour must hold on both executors."""
    return request.param
