"""A throwaway two-node Ray cluster on this machine, for the tests that must not rely on a shared
disk: a head with no CPUs (so every task that asks for one runs on the worker node) and a worker node
that, where the kernel lets us, runs in a mount namespace of its own with tmpfs over the folders it
must not see (the test's scratch folders): what a task reads there is empty, as on another machine."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.ray_head import _free_port
from helpers.s3_server import S3Server

# Ways to give the worker node a mount namespace of its own, tried in turn: as root, then as a user
# mapped to root in a user namespace of its own (for a rootless machine that allows those).
_UNSHARE = (
    ["unshare", "--mount", "--propagation", "private"],
    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
)
_STARTED = "Ray runtime started."  # `ray start` prints it once its node is registered with the GCS
_PROJECT = Path(__file__).resolve().parents[2]  # the editable install of assay


@dataclass(frozen=True)
class TwoNodeCluster:
    address: str  # 127.0.0.1:PORT, for ray.init(address=...) or --ray-address
    env: dict[str, str]  # the environment of a driver: os.environ, the extra env, the cluster's token
    hidden: list[str]  # folders the worker node sees as empty tmpfs; [] where unshare is not permitted
    started_in: float  # seconds from `ray start --head` to both nodes registered


def _mounts(hide: Sequence[str]) -> str:
    """A shell command that mounts an empty tmpfs over each folder in `hide`."""
    return " && ".join(f"mount -t tmpfs none {shlex.quote(d)}" for d in hide)


def _unshare_prefix(mounts: str) -> list[str] | None:
    """The first unshare command under which `mounts` works here (tried in a throwaway namespace)."""
    for prefix in _UNSHARE:
        with contextlib.suppress(OSError):
            probe = subprocess.run([*prefix, "sh", "-c", mounts], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return prefix
    return None


def _start(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        # In a session of its own, so that teardown can stop exactly this node (`ray stop` would stop
        # every Ray on the machine, the tests' own included).
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def _wait_started(node: subprocess.Popen, log_path: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _STARTED not in log_path.read_text(errors="replace"):
        assert node.poll() is None, f"the Ray {what} exited:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"the Ray {what} did not start in {timeout} s"
        time.sleep(0.2)


@contextlib.contextmanager
def two_node_cluster(
    worker_cpus: int = 2, env: dict[str, str] | None = None, hide: Sequence[str | os.PathLike] = ()
) -> Iterator[TwoNodeCluster]:
    """Start a head (no CPUs) and a worker node (`worker_cpus` CPUs, its own --temp-dir), `env` added to
    both nodes' environment and the folders in `hide` hidden from the worker node where unshare is
    permitted; yields the cluster once both nodes are registered. Skips when there is no ray CLI."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray_bin is None:
        pytest.skip("the ray CLI is not installed")
    hide = [str(Path(d).resolve()) for d in hide]
    root = Path(tempfile.mkdtemp(prefix="ray2-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    head_tmp, worker_tmp = root / "head", root / "worker"
    nodes: list[subprocess.Popen] = []
    try:
        for path in (sys.prefix, _PROJECT, worker_tmp):  # what the worker node needs to see
            if any(Path(path).resolve().is_relative_to(d) for d in hide):
                raise ValueError(f"{path} must stay visible to the worker node, but {hide} would hide it")
        worker_tmp.mkdir()
        port = _free_port()
        # Ray >= 2.5x authenticates clients with a token; the nodes and the driver share this one.
        node_env = {
            **os.environ,
            **(env or {}),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        }
        head_cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=0"]
        head_cmd += ["--include-dashboard=false", f"--temp-dir={head_tmp}", "--disable-usage-stats"]
        worker_cmd = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--block"]
        worker_cmd += [f"--num-cpus={worker_cpus}", f"--temp-dir={worker_tmp}"]  # Ray 2.60: per node
        unshare = _unshare_prefix(_mounts(hide)) if hide else None
        if unshare is not None:
            worker_cmd = [*unshare, "sh", "-c", f"{_mounts(hide)} && exec {shlex.join(worker_cmd)}"]

        t0 = time.monotonic()
        nodes.append(_start(head_cmd, node_env, root / "head.log", cwd=root))
        _wait_started(nodes[0], root / "head.log", "head")
        # The worker node's cwd is its temp dir: a cwd under a hidden folder would still reach its files.
        nodes.append(_start(worker_cmd, node_env, root / "worker.log", cwd=worker_tmp))
        _wait_started(nodes[1], root / "worker.log", "worker node")
        hidden = hide if unshare else []
        yield TwoNodeCluster(f"127.0.0.1:{port}", node_env, hidden, time.monotonic() - t0)
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # a throwaway cluster: no need to be gentle
            node.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    """One two-node cluster for the test session: both nodes and `.env` point at the session's S3
    server, and pytest's scratch folders (basetemp) are hidden from the worker node."""
    with two_node_cluster(env=s3.env, hide=[tmp_path_factory.getbasetemp()]) as cluster:
        yield cluster
