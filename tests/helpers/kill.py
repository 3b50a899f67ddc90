"""Kill a command with SIGKILL in the middle of its work, and compare two outputs row for row."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq


def assay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "assay.pipelines.cli", *args]


def run_and_kill(
    cmd: list[str],
    out: Path,
    pattern: str,
    count: int = 1,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> bool:
    """Start ``cmd`` (in ``env``, default this process's); as soon as ``count`` files match
    ``out/pattern``, SIGKILL it. ``out`` may be a location on object storage (``storage.path``).

    Returns True if it was killed mid-run, False if it finished first (the caller should then
    make the work bigger: a test that never kills proves nothing).
    """
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    # Its own session, so that the Ray processes it starts can be cleaned up after the kill.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if len(list(out.glob(pattern))) >= count:
                os.kill(proc.pid, signal.SIGKILL)  # the command itself, mid-write
                proc.wait(timeout=30)
                _kill_group(proc.pid)  # then what it left behind (a local Ray's agents)
                return True
            time.sleep(0.02)
        raise TimeoutError(f"{cmd} neither finished nor produced {count} x {pattern} in {timeout}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_ok(cmd: list[str], timeout: float = 300) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def dataset_files(root: Path) -> dict[str, Path]:
    """Every data and quarantine Parquet file of a finished dataset, by relative path."""
    files = {}
    for sub in ("queries", "corpus", "pairs", "quarantine"):
        d = root / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                files[f"{sub}/{p.name}"] = p
    return files


def assert_same_dataset(a: Path, b: Path, roots: tuple[str, str] | None = None) -> int:
    """Same files, same rows in the same order; returns the number of rows compared. ``roots``: (a's
    data root, b's), when the two were read from two places: the quarantine's details name them."""
    fa, fb = dataset_files(a), dataset_files(b)
    assert sorted(fa) == sorted(fb), f"file lists differ: {sorted(set(fa) ^ set(fb))}"
    assert not list(a.rglob(".tmp-*")) and not (a / "_progress").exists()
    rows = 0
    for rel in fa:
        ta, tb = pq.read_table(fa[rel]), pq.read_table(fb[rel])
        if roots and "detail" in tb.column_names:
            detail = pc.replace_substring(tb.column("detail"), roots[1], roots[0])
            tb = tb.set_column(tb.column_names.index("detail"), "detail", detail)
        assert ta.equals(tb), f"{rel} differs between the resumed and the clean run"
        rows += ta.num_rows
    return rows
