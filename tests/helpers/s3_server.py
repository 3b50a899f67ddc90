"""A throwaway S3 server (moto's) in a session of its own, for the tests that read and write s3:// URIs,
and its fixtures: `s3` (one server per test session, its settings in os.environ) and `s3_bucket`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.ray_head import _free_port, _listening


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # the AWS_* variables that point boto3, s3fs and pyarrow at this server

    def bucket(self, name: str) -> str:
        """Create the bucket `name` (a valid S3 name: 3+ characters) and return its URI."""
        import boto3  # a dependency of moto: imported here so that collection needs neither

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=name)
        return f"s3://{name}"


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on a free port of 127.0.0.1 and yield it once it answers; skips the test
    when moto (with its server extras) is not installed."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with tempfile.TemporaryDirectory(prefix="moto-") as workdir:
        log_path = Path(workdir) / "moto.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,  # teardown kills this process group, and only it
            )
        try:
            deadline = time.monotonic() + 60
            while not _listening(port):
                assert server.poll() is None, f"moto_server exited:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, (
                    f"moto_server did not start in 60 s:\n{log_path.read_text()}"
                )
                time.sleep(0.2)
            yield S3Server(endpoint, env)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=60)


def _forget_s3_clients() -> None:
    """s3fs caches its filesystems by their arguments, not the environment: drop them, so that none
    keeps talking to an endpoint that is gone."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One S3 server for the test session, its AWS_* settings in os.environ until the session ends."""
    with s3_server() as server, pytest.MonkeyPatch.context() as mp:
        for name, value in server.env.items():
            mp.setenv(name, value)
        _forget_s3_clients()
        yield server
    _forget_s3_clients()


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A new, empty bucket on the session's S3 server: its URI, s3://assay-test-…"""
    return s3.bucket(f"assay-test-{uuid.uuid4().hex[:12]}")
