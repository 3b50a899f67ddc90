"""A throwaway one-node Ray cluster, `ray start --head` in a session of its own, for the tests that
run a command with --ray-address."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, num_gpus: int = 0) -> Iterator[tuple[str, dict[str, str]]]:
    """Start a Ray head (declaring ``num_gpus`` GPUs: none is needed, Ray only places actors that
    ask for them); yields its address and the environment a driver needs (the cluster's token).
    Skips the test when the ray CLI is not installed."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray_bin is None:
        pytest.skip("the ray CLI is not installed")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # Ray >= 2.5x authenticates clients with a token; the cluster and the driver share this one.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
    }
    # --block keeps the head in the foreground, in a session of its own, so that teardown can stop
    # exactly this cluster (`ray stop` would stop every Ray on the machine, the tests' own included).
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}"]
    cmd += [f"--num-gpus={num_gpus}"] if num_gpus else []
    cmd += ["--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # a throwaway cluster: no need to be gentle
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
