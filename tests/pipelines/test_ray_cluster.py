"""`--ray-address`: a stage runs on an existing Ray cluster and gives the same output as in process."""

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
from pathlib import Path

import pytest
from helpers.badrows import make_fuzz_rows, queries_table
from helpers.kill import assay_cmd, assert_same_dataset, run_ok

from assay.curation.dataset import write_dataset

pytestmark = pytest.mark.ray


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
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
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
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


def test_validate_on_an_existing_cluster_matches_local(tmp_path, ray_cluster):
    queries, corpus, pairs, _ = make_fuzz_rows(
        tmp_path / "root", tmp_path / "outside", n_good=200, n_bad=60, seed=5, max_text_chars=1000
    )
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=50,
        data_root=str(tmp_path / "root"),
    )
    run_ok(assay_cmd("validate", str(ds.root), str(tmp_path / "local"), "--executor", "local"))
    address, env = ray_cluster
    res = subprocess.run(
        assay_cmd("validate", str(ds.root), str(tmp_path / "cluster"), "--ray-address", address),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"connected to the cluster at {address}" in res.stderr
    assert assert_same_dataset(tmp_path / "local", tmp_path / "cluster") > 0
