"""One writer per output: an advisory lock held while a command writes a dataset, file or run.

The lock of ``OUT`` is the hidden file ``.<name>.lock`` beside it (in OUT's parent folder), not
inside it: a dataset or an export appears by rename, so a lock inside would be carried away or
left in the finished output; a file output (an export's ``.parquet``, eval's metrics, the report)
has no inside; and a file in a dataset folder would show up in its listings and in the "exists and
is not empty" check of a resumed run.

The lock is ``fcntl.flock`` on that file, so the kernel releases it when its holder exits, however
it exits: a SIGKILLed run never leaves a stale lock, and the rerun takes it and resumes. The file
holds the holder's pid, host, command and start time, which a refused process reports. A clean
release unlinks the file (while still holding the lock; a process that opened the old file before
the unlink sees that the path no longer names it and opens the new one), so a finished command
leaves nothing beside its output; a killed one leaves an unlocked file that the next run reuses.

The lock is re-entrant within a process: ``assay loop`` runs the other commands in process, and
flock locks belong to open file descriptions, so a second ``open`` + ``flock`` of the same file by
the same process would refuse itself. A nested ``output_lock`` of a path this process already
holds just counts.

On a file system without flock (``ENOLCK``, ``EOPNOTSUPP``) the command runs unlocked, with a
warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from assay.curation import lease, storage

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
#: flock is not supported there: run unlocked rather than not at all.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

_held: dict[str, list[int]] = {}  # lock path -> [how many nested holds]
_mutex = threading.Lock()


class OutputInUse(Exception):
    """Another process holds the lock of the output; ``holder`` is what its lock file says."""

    def __init__(self, out: Any, lock: Any, holder: dict[str, Any]):
        self.out, self.lock, self.holder = out, lock, holder
        super().__init__(
            f"{storage.display(out)} is being written by {describe_holder(holder)} "
            f"(lock file {storage.display(lock)})"
        )


def describe_holder(holder: dict[str, Any]) -> str:
    """``another process (pid 123 on host h: assay validate, since 2025-01-01T10:00:00Z)``."""
    if not holder.get("pid"):
        return "another process (its pid is not recorded yet)"
    what = [f"pid {holder['pid']}"]
    if holder.get("host"):
        what[0] += f" on host {holder['host']}"
    if holder.get("command"):
        what.append(str(holder["command"]))
    if holder.get("started"):
        what.append(f"since {holder['started']}")
    return f"another process ({', '.join(what)})"


def lock_path(out: str | os.PathLike) -> Path:
    """``.<name>.lock`` beside ``out`` (symlinks resolved, so every name of OUT shares one lock)."""
    target = Path(out).resolve()
    if not target.name:
        raise ValueError(f"{out} cannot be an output: it has no parent folder to hold its lock")
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def _mkdirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, deepest first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
            made.append(d)
        except FileExistsError:
            pass
    return made[::-1]


def _read_holder(fd: int) -> dict[str, Any]:
    """What the holder wrote into the lock file; it may not have written yet, so look a few times."""
    for _ in range(20):
        try:
            raw = os.pread(fd, 65536, 0)
        except OSError:
            return {}
        if raw.strip():
            try:
                obj = json.loads(raw)
                return obj if isinstance(obj, dict) else {}
            except ValueError:
                pass  # half written: look again
        time.sleep(0.025)
    return {}


def _write_holder(fd: int, info: dict[str, Any]) -> None:
    """Best effort: a full disk must not stop the lock (the command then says the disk is full)."""
    with contextlib.suppress(OSError):
        data = json.dumps(info, sort_keys=True).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(out: Path, path: Path, info: dict[str, Any]) -> tuple[int | None, list[Path]]:
    """Open and flock ``path``; the fd (None where flock is unsupported) and the folders made."""
    made = _mkdirs(path.parent)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # a releasing holder removed the folder it had made: make it again
            made += [d for d in _mkdirs(path.parent) if d not in made]
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            _remove_dirs(made)
            raise OutputInUse(out, path, holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                log.warning("%s: file locks are not supported here (%s); writing %s unlocked", path, e, out)
                return None, made
            raise
        if _same_file(fd, path):
            _write_holder(fd, info)
            return fd, made
        os.close(fd)  # we locked a file its holder had just unlinked on release: take the new one
    raise OSError(errno.EAGAIN, f"could not take the lock file {path} (it keeps being replaced)")


def _remove_dirs(made: list[Path]) -> None:
    for d in made:  # deepest first; a folder someone else now uses is not empty and stays
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, command: str = "") -> Iterator[Any]:
    """Hold the lock of ``out`` for the body; raise :class:`OutputInUse` at once if another process
    holds it. Creates OUT's parent folders (removed again on release if still empty). Yields the
    lock file's path. An output on object storage is locked by a lease (``curation/lease.py``)."""
    remote = storage.is_remote(out)
    path = lease.lock_location(out) if remote else lock_path(out)
    key = str(path)
    with _mutex:
        mine = _held.get(key)
        if mine is not None:
            mine[0] += 1
    if mine is not None:
        try:
            yield path
        finally:
            with _mutex:
                mine[0] -= 1
        return
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "out": storage.absolute(out),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    release = lease.acquire(out, info, OutputInUse).release if remote else _local_lock(Path(out), path, info)
    entry = [1]
    with _mutex:
        _held[key] = entry
    try:
        yield path
    finally:
        with _mutex:
            entry[0] -= 1
            done = entry[0] == 0
            if done:
                del _held[key]
        if done:
            release()


def _local_lock(out: Path, path: Path, info: dict[str, Any]) -> Callable[[], None]:
    """flock the lock file; returns what releases it."""
    fd, made = _acquire(out, path, info)

    def release() -> None:
        if fd is None:
            return
        # Unlink while still holding the lock, then let go (see the module docstring).
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)
        _remove_dirs(made)

    return release


def holds_lock(out: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``out``."""
    path = lease.lock_location(out) if storage.is_remote(out) else lock_path(out)
    with _mutex:
        return str(path) in _held


# -- the errors of the place an output goes, and one writer at a time -----------------------------

#: The errors of the place an output goes rather than of assay: (errno, what the OS calls it).
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
}
# How libraries that do not raise a plain OSError spell one: pyarrow "[errno 28]", Rust crates
# (polars, safetensors) "(os error 28)" or "Os { code: 28, ...", Python "[Errno 28]".
_ERRNO_IN_TEXT = re.compile(r"(?:\[errno |\(os error |Os \{ code: )(\d+)", re.IGNORECASE)
#: Errors named in words only (a message without a number) are taken for these, never for
#: "Permission denied", which a web service or a model hub says too.
_BY_NAME = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e``, then what it wraps (``raise ... from``, the exception being handled, a Ray task's cause)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]


def environment_error(e: BaseException) -> tuple[int, str, str | None] | None:
    """(errno, strerror, file or None) when ``e`` is, or wraps, a full disk, a read-only file system
    or a permission denied; else None."""
    for x in _causes(e):
        if not isinstance(x, BaseException):
            continue
        code = getattr(x, "errno", None) if isinstance(x, OSError) else None
        if code not in ENVIRONMENT_ERRNOS:
            m = _ERRNO_IN_TEXT.search(str(x))
            code = int(m.group(1)) if m else None
            if code not in ENVIRONMENT_ERRNOS:
                code = next((c for c in _BY_NAME if ENVIRONMENT_ERRNOS[c].lower() in str(x).lower()), None)
        if code in ENVIRONMENT_ERRNOS:
            filename = getattr(x, "filename", None) if isinstance(x, OSError) else None
            return code, ENVIRONMENT_ERRNOS[code], os.fsdecode(filename) if filename else None
    return None


@contextlib.contextmanager
def writing(out: str | os.PathLike, *, command: str = "") -> Iterator[Path]:
    """Hold the lock of OUT while the body writes it (:func:`output_lock`: a second writer is refused
    at once with :class:`OutputInUse`); when the body fails because the disk is full, read-only or
    forbidden, remove the temporary files of the failed write (safe: no other writer's are there).
    Every stage of ``assay.pipelines.api`` writes under it, so Python callers and the CLI alike."""
    from assay.curation.dataset import remove_stale_tmp

    with output_lock(out, command=command) as lock:
        try:
            yield lock
        except BaseException as e:
            if environment_error(e) is not None and not storage.is_remote(out) and Path(out).is_dir():
                with contextlib.suppress(OSError):
                    remove_stale_tmp(out)
            raise
