from __future__ import annotations

import logging
import uuid
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


SECRET = "SENTINEL-secret-9f2c1d"
KEY_ID = "SENTINELKEYID7731"


@pytest.fixture(scope="session")
def moto_endpoint():
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint):
    """A fresh bucket and its options; the server's state is reset after each test."""
    import requests

    opts = {
        "key": KEY_ID,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    bucket = f"b{uuid.uuid4().hex[:12]}"
    from asyncckpt.storage import FsspecStorage

    fs = FsspecStorage("s3://", opts).fs
    fs.call_s3("create_bucket", Bucket=bucket)
    yield f"s3://{bucket}/run7", opts, fs
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)


# fail fast: one botocore attempt in all (botocore's legacy ``max_attempts`` counts *retries*,
# so ``total_max_attempts`` it is), short timeouts; the library's own retries still apply
FAST_S3 = {"connect_timeout": 1, "read_timeout": 2, "retries": {"total_max_attempts": 1}}


@pytest.fixture
def proxied(s3, moto_endpoint, monkeypatch):
    """(root, storage options through a fault proxy, direct s3fs filesystem, proxy)."""
    import s3fs

    from .faultproxy import FaultProxy

    # s3fs retries SlowDown and dropped connections itself (not listings), up to
    # `S3FileSystem.retries` attempts (5), with backoff; that is a class attribute, not a
    # constructor option (`"retries": 1` in storage options is silently ignored), so lower
    # it here: one attempt, and only the library's own retries remain
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    root, opts, fs = s3
    with FaultProxy(moto_endpoint) as px:
        popts = {
            **opts,
            "client_kwargs": {**opts["client_kwargs"], "endpoint_url": px.endpoint},
            "config_kwargs": dict(FAST_S3),
        }
        yield root, popts, fs, px
