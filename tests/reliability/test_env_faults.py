"""Environment faults: a second writer on the same output, a full disk, a read-only folder.

Every `assay` command that writes takes the lock of its output (curation/lock.py): a second
process on the same output is refused at once, naming the output and the holder's pid and host,
and touches nothing. A full disk or a read-only output fails with one clear line naming the path
(no traceback) and leaves no partial output: no manifest, no complete.json, no temporary file;
after space is freed, the same command resumes and ends with the output a clean run gives.

The small disks are tmpfs mounts (as root: `mount -t tmpfs`; otherwise inside `unshare -rm`).
Without either the tests skip, unless ASSAY_REQUIRE_MOUNT=1 says they must run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.colours import TINY, colour_dataset
from helpers.kill import assay_cmd, assert_same_dataset, run_ok
from PIL import Image

from assay.curation.dataset import MANIFEST, Dataset, write_dataset
from assay.curation.ingest import ingest
from assay.curation.lock import OutputInUse, holds_lock, lock_path, output_lock
from assay.curation.validate import validate

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
N_IMAGES = 48  # noise PNGs of ~49 KB: ~2.4 MiB, more than the 2 MiB disk


# -- helpers ---------------------------------------------------------------------------------------


def noise_png(seed: int, side: int = 128) -> bytes:
    """A PNG that does not compress (so that it fills a small disk)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def assert_clear_failure(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, one clear error naming what it must, no traceback."""
    text = res.stdout + res.stderr
    assert res.returncode != 0, f"expected a failure:\n{text}"
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime (to see that nothing changed)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def leftovers(root: Path) -> list[str]:
    """Temporary files and half-written checkpoints anywhere under ``root``."""
    if not root.exists():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith((".tmp-", ".partial-")) or ".tmp-" in p.name
    )


def _can(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class Disk:
    """A tmpfs mounted at ``path``: commands run, and files are looked at, where it is visible.

    As root it is mounted in this namespace. Otherwise a user+mount namespace (``unshare -rm``)
    is kept alive by a sleeping process: commands run in it through ``nsenter``, and this process
    sees its files through ``/proc/PID/root``.
    """

    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path, self.size = path, size
        self.ns: subprocess.Popen | None = None
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        mode = os.environ.get("ASSAY_TEST_MOUNT", "root" if os.geteuid() == 0 else "unshare")
        if mode == "root" and _can(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]):
            return
        if shutil.which("unshare") and shutil.which("nsenter"):
            self.ns = subprocess.Popen(
                ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {opts} tmpfs '{path}' && exec sleep 3600"]
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.ns.poll() is None:
                if _can(["nsenter", "-t", str(self.ns.pid), "-U", "-m", "--preserve-credentials", "mountpoint", "-q", str(path)]):  # fmt: skip
                    return
                time.sleep(0.05)
            self.close()
        self.ns = None
        message = f"cannot mount a tmpfs at {path} (not root, and unshare -rm did not work)"
        if os.environ.get("ASSAY_REQUIRE_MOUNT") == "1":
            pytest.fail(message)
        pytest.skip(message)

    @property
    def view(self) -> Path:
        """Where this process sees the disk's files."""
        return Path(f"/proc/{self.ns.pid}/root{self.path}") if self.ns else self.path

    def cmd(self, cmd: list[str]) -> list[str]:
        if self.ns is None:
            return cmd
        return [
            "nsenter",
            "-t",
            str(self.ns.pid),
            "-U",
            "-m",
            "--preserve-credentials",
            "--wd=" + str(ROOT),
            *cmd,
        ]

    def run(self, cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return run(self.cmd(cmd), timeout)

    def grow(self, size: str = "64m") -> None:
        """Free space: the same disk, bigger, with its files kept."""
        opts = f"remount,size={size}"
        ok = _can(self.cmd(["mount", "-o", opts, str(self.path)]))
        assert ok, f"could not remount {self.path} with {opts}"

    def fill(self, leave: int) -> Path:
        """Fill the disk with one file until ``leave`` bytes are free; returns that file."""
        filler = self.view / "filler"
        st = os.statvfs(self.view)
        free = st.f_bavail * st.f_frsize
        filler.write_bytes(b"\0" * max(0, free - leave))
        return filler

    def close(self) -> None:
        if self.ns is None:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)
        else:
            self.ns.kill()
            self.ns.wait(timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    disks: list[Disk] = []

    def mount(size: str = "2m", read_only: bool = False, name: str = "disk") -> Disk:
        disk = Disk(tmp_path / name, size, read_only)
        disks.append(disk)
        return disk

    try:
        yield mount
    finally:
        for disk in disks:
            disk.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A dataset of ~2.4 MiB of incompressible inline images: more than a 2 MiB disk holds."""
    root = tmp_path_factory.mktemp("big")
    corpus = [
        {"doc_id": f"d{i:03d}", "subset": "s", "text": None, "image": {"bytes": noise_png(i), "path": None}}
        for i in range(N_IMAGES)
    ]
    queries = [{"query_id": f"q{i:03d}", "subset": "s", "task": "retrieval", "text": f"find {i}"} for i in range(N_IMAGES)]  # fmt: skip
    pairs = [{"query_id": f"q{i:03d}", "doc_id": f"d{i:03d}", "label": "positive"} for i in range(N_IMAGES)]
    write_dataset(root / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=8)
    return root / "ds"


@pytest.fixture(scope="module")
def raw_jsonl(tmp_path_factory) -> Path:
    """Raw pairs for `assay ingest --embed-images`: a JSONL file and image files (~2.4 MiB)."""
    root = tmp_path_factory.mktemp("raw")
    (root / "img").mkdir()
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(N_IMAGES):
            (root / "img" / f"{i}.png").write_bytes(noise_png(1000 + i))
            f.write(json.dumps({"query_text": f"find {i}", "doc_image": f"img/{i}.png"}) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return colour_dataset(tmp_path_factory.mktemp("colours") / "ds")


def train_config(path: Path, data: Path, output: Path) -> Path:
    config = {
        "stage": "1",
        "data": [str(data)],
        "output": str(output),
        "tiny": TINY,
        "tokens_per_tile": 16,
        "lr": 3e-3,
        "batch_size": 8,
        "mini_batch": 8,
        "epochs": 1,
        "progress": False,
        "save_every": 100,
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump(config))
    return path


# -- the lock: one writer per output ---------------------------------------------------------------

HOLDER = """
import sys
from assay.curation.lock import output_lock
with output_lock(sys.argv[1], command="test holder"):
    print("locked", flush=True)
    sys.stdin.read()
"""


class Holder:
    """Another process holding the lock of ``out`` until ``release``."""

    def __init__(self, out: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _commands(tmp: Path, big: Path, colours: Path) -> dict[str, tuple[list[str], Path]]:
    """Each writing command: its arguments, and the path whose lock it takes."""
    out = tmp / "out"
    src = tmp / "raw.jsonl"
    src.write_text(json.dumps({"query_text": "a", "doc_text": "b"}) + "\n")
    cfg = train_config(tmp / "train.yaml", colours, out)
    loop_file = tmp / "loop.yaml"
    loop_file.write_text(
        yaml.safe_dump(
            {"run_dir": str(out), "steps": [{"name": "v", "run": "validate", "args": [str(big), "{run}/v"]}]}
        )  # fmt: skip
    )
    run_dir = tmp / "run"
    (run_dir / "steps").mkdir(parents=True)
    local = ["--executor", "local"]
    return {
        "ingest": (["ingest", str(src), str(out), *local], out),
        "validate": (["validate", str(big), str(out), *local], out),
        "dedup": (["dedup", str(big), str(out), *local], out),
        "filter": (["filter", str(big), str(out), "--where", "label == 'positive'", *local], out),
        "curate": (["curate", str(big), str(out), "--num-cpus", "1"], out),
        "mine": (["mine", str(big), str(out), "--encoder", str(tmp / "no-model")], out),
        "judge": (["judge", str(big), str(out), "--model", str(tmp / "no-model")], out),
        "export": (["export", str(big), str(out), "--format", "parquet"], out),
        "train": (["train", str(cfg)], out),
        "eval": (["eval", str(tmp / "no-model"), str(big), "--out", str(out)], out),
        "loop": (["loop", str(loop_file)], out),
        "report": (["report", str(run_dir)], run_dir / "report.html"),
    }


LOCKED_COMMANDS = ["ingest", "validate", "dedup", "filter", "curate", "mine", "judge", "export", "train", "eval", "loop", "report"]  # fmt: skip


@pytest.mark.parametrize("name", LOCKED_COMMANDS)
def test_a_second_writer_is_refused_at_once_and_touches_nothing(tmp_path, big, colours, name):
    args, locked = _commands(tmp_path, big, colours)[name]
    holder = Holder(locked)
    try:
        before = tree(tmp_path)
        t0 = time.monotonic()
        res = run(assay_cmd(*args), timeout=120)
        seconds = time.monotonic() - t0
        text = assert_clear_failure(
            res, f"assay {name}:", str(locked), f"pid {holder.proc.pid}", f"on host {os.uname().nodename}"
        )
        assert "being written by another process" in text
        assert tree(tmp_path) == before, "the refused command changed files"
        assert seconds < 30, f"refused only after {seconds:.1f} s"
    finally:
        holder.release()
    assert not lock_path(locked).exists(), "a clean release leaves no lock file"


def _start_and_stop_when_locked(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start ``cmd``; SIGSTOP it as soon as it holds the lock of ``out``, before it finishes (a
    command holds its lock for a second or more even on small data: reading the inputs, the run's
    code version from git, writing)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
        start_new_session=True,
    )
    lock = lock_path(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and str(proc.pid) in lock.read_text():
            os.kill(proc.pid, signal.SIGSTOP)
            return proc
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"{cmd} finished (or hung) before it could be caught holding its lock: make the data bigger")


def test_two_validates_on_one_output_the_second_is_refused_the_first_completes(tmp_path, big):
    args = ["validate", str(big), "--executor", "local"]
    validate(Dataset(big), tmp_path / "clean")  # the reference, in process
    out = tmp_path / "out"
    first = _start_and_stop_when_locked(assay_cmd(*args[:2], str(out), *args[2:]), out)
    try:
        before = tree(tmp_path)
        second = run(assay_cmd(*args[:2], str(out), *args[2:]), timeout=60)
        assert_clear_failure(second, "assay validate:", str(out), f"pid {first.pid}", "being written")
        assert tree(tmp_path) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stdout + stderr
    assert_same_dataset(tmp_path / "clean", out)
    assert not lock_path(out).exists()


def test_a_killed_holder_leaves_no_stale_lock_and_the_rerun_resumes(tmp_path, big):
    args = ["validate", str(big), "--executor", "local"]
    validate(Dataset(big), tmp_path / "clean")  # the reference, in process
    out = tmp_path / "out"
    first = _start_and_stop_when_locked(assay_cmd(*args[:2], str(out), *args[2:]), out)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert lock_path(out).exists()  # the file stays, but the kernel released the lock
    run_ok(assay_cmd(*args[:2], str(out), *args[2:]))
    assert_same_dataset(tmp_path / "clean", out)
    assert not lock_path(out).exists()


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_lock(out, command="outer") as lock:
        assert lock == tmp_path / "a" / "b" / ".out.lock" and holds_lock(out)
        with output_lock(out, command="inner (a loop's step)"):  # no self-deadlock, no refusal
            assert holds_lock(out)
        assert holds_lock(out) and lock.exists()
        probe = "from curation.lock import output_lock; import sys\nwith output_lock(sys.argv[1]): pass"
        res = run([sys.executable, "-c", probe, str(out)])
        assert (
            res.returncode != 0 and OutputInUse.__name__ in res.stderr and f"pid {os.getpid()}" in res.stderr
        )
    assert not holds_lock(out) and not lock.exists()
    assert not (tmp_path / "a").exists(), "the folders made for the lock are removed when unused"


# -- a full disk -----------------------------------------------------------------------------------


def test_ingest_on_a_full_disk_fails_clearly_leaves_no_partial_output_and_resumes(
    tmp_path, small_disk, raw_jsonl
):
    disk = small_disk("2m")
    args = ["--embed-images", "--rows-per-shard", "8", "--executor", "local"]
    ingest(raw_jsonl, tmp_path / "clean", embed_images=True, rows_per_shard=8)  # the reference, in process
    out = disk.path / "out"
    res = disk.run(assay_cmd("ingest", str(raw_jsonl), str(out), *args))
    assert_clear_failure(res, "assay ingest: cannot write", str(out), "No space left on device (errno 28)")
    view = disk.view / "out"
    assert not (view / MANIFEST).exists() and leftovers(disk.view) == []
    with pytest.raises(Exception, match="unfinished run|not an assay dataset"):
        Dataset(view)
    disk.grow()
    run_ok(disk.cmd(assay_cmd("ingest", str(raw_jsonl), str(out), *args)))
    assert_same_dataset(tmp_path / "clean", view)


@pytest.mark.parametrize(
    "executor", ["local", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])]
)
def test_validate_on_a_full_disk_fails_clearly_leaves_no_partial_output_and_resumes(
    tmp_path, small_disk, big, executor
):
    disk = small_disk("2m")
    validate(Dataset(big), tmp_path / "clean")  # the reference, in process
    out = disk.path / "out"
    res = disk.run(assay_cmd("validate", str(big), str(out), "--executor", executor, "--num-cpus", "1"))
    text = assert_clear_failure(
        res, "assay validate: cannot write", str(out), "No space left on device (errno 28)"
    )
    assert "completed shards are kept" in text
    view = disk.view / "out"
    assert not (view / MANIFEST).exists() and leftovers(disk.view) == []
    done = list((view / "_progress" / "done").rglob("*.json"))
    disk.grow()
    run_ok(disk.cmd(assay_cmd("validate", str(big), str(out), "--executor", executor, "--num-cpus", "1")))
    assert_same_dataset(tmp_path / "clean", view)
    assert done, "the failed run had completed no shard: the resume was not tested"


@pytest.mark.parametrize("target", ["out", "out.jsonl"])
def test_export_on_a_full_disk_fails_clearly_and_leaves_nothing(tmp_path, small_disk, big, target):
    disk = small_disk("2m")
    out = disk.path / target
    res = disk.run(assay_cmd("export", str(big), str(out), "--format", "jsonl"))
    assert_clear_failure(res, "assay export: cannot write", str(out), "No space left on device (errno 28)")
    assert "nothing was written" in res.stderr
    assert tree(disk.view) == {}, "a failed export leaves nothing (no file, no staging, no images)"
    disk.grow()
    run_ok(disk.cmd(assay_cmd("export", str(big), str(out), "--format", "jsonl")))
    rows = (
        (disk.view / target / "train.jsonl" if target == "out" else disk.view / target)
        .read_text()
        .splitlines()
    )
    assert len(rows) == N_IMAGES


@pytest.mark.slow
def test_train_on_a_full_disk_fails_clearly_keeps_no_partial_checkpoint_and_reruns(
    tmp_path, small_disk, colours
):
    disk = small_disk("2m")
    out = disk.path / "train"
    cfg = train_config(tmp_path / "train.yaml", colours, out)
    filler = disk.fill(leave=256 << 10)  # a checkpoint of the tiny model is ~600 KB
    res = disk.run(assay_cmd("train", str(cfg)))
    assert_clear_failure(res, "assay train: cannot write", str(out), "No space left on device (errno 28)")
    view = disk.view / "train"
    assert not (view / "complete.json").exists() and not list(view.glob("step-*"))
    assert leftovers(disk.view) == []
    filler.unlink()
    res = disk.run(assay_cmd("train", str(cfg)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (view / "complete.json").exists() and len(list(view.glob("step-*"))) == 1


# -- a read-only folder ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, where",
    [
        ("ingest", "under"),
        ("ingest", "at"),
        ("validate", "under"),
        ("validate", "at"),
        ("export", "under"),  # not "at": an export is staged beside OUT and renamed onto it
        ("train", "under"),
    ],
)
def test_a_read_only_output_fails_clearly(tmp_path, small_disk, raw_jsonl, big, colours, name, where):
    """OUT inside a read-only mount (its lock cannot be made), or OUT the read-only mount itself."""
    disk = small_disk("1m", read_only=True)
    out = disk.path / "out" if where == "under" else disk.path
    args = {
        "ingest": ["ingest", str(raw_jsonl), str(out), "--embed-images", "--executor", "local"],
        "validate": ["validate", str(big), str(out), "--executor", "local"],
        "export": ["export", str(big), str(out), "--format", "jsonl", "--overwrite"],
        "train": ["train", str(train_config(tmp_path / "train.yaml", colours, out))],
    }[name]
    res = disk.run(assay_cmd(*args))
    assert_clear_failure(res, f"assay {name}: cannot write {out}", "Read-only file system (errno 30)")
    assert tree(disk.view) == {}
