"""One writer per output on object storage: a lock object taken with a conditional put, held on a lease.

An object store has no flock, and its clients die without telling it. The lock of ``s3://b/x/OUT``
is the object ``s3://b/x/.OUT.lock``, created with ``If-None-Match: *`` (the put fails when the
object exists, atomically, in the store): whoever creates it holds the lock. It records the holder
(pid, host, command, start) and when the lease ends; a thread renews the lease every third of its
length with ``If-Match: <the ETag it wrote>``, so the renewal fails if anyone else took the lock.
A writer that finds a lock whose lease has ended (its holder was killed, its machine lost), or whose
holder ran on this same machine (same boot) and whose process is gone, takes it over with a put
conditional on the ETag it read, so of two such writers only one succeeds. A clean
release deletes the object, again only if it is still the one this writer put there.

Lease ends are the holder's clock: the machines of one cluster must agree on the time to within a
small part of the lease (``ASSAY_LOCK_LEASE_S``, 120 s by default).

S3 and S3-compatible stores (MinIO, Ceph, moto) answer conditional puts. Other stores are refused
with a clear error rather than written without a guard; ``ASSAY_LOCK=off`` writes there unlocked
(the user then makes sure that one writer at a time writes each output).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from assay.curation import storage

log = logging.getLogger(__name__)

#: Protocols whose stores take ``If-None-Match`` / ``If-Match`` on a put.
CONDITIONAL_PUT = {"s3", "s3a"}
LEASE_ENV = "ASSAY_LOCK_LEASE_S"
OFF_ENV = "ASSAY_LOCK"


class LockUnsupported(ValueError):
    """The store of an output cannot hold assay's lock (no conditional put)."""


def describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, lease ending {holder.get('lease_ends')}"


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "120"))


def lock_location(out: str | os.PathLike) -> Any:
    """``.<name>.lock`` beside OUT, in OUT's parent prefix."""
    loc = storage.path(out)
    return loc.parent / f".{loc.name}.lock"


def _precondition_failed(e: OSError) -> bool:
    return "pre-condition" in str(e).lower() or "precondition" in str(e).lower()


class Lease:
    """A held lock object; renewed in the background until :meth:`release`."""

    def __init__(self, lock: Any, etag: str | None, info: dict[str, Any], seconds: float):
        self.lock, self.etag, self.info, self.seconds = lock, etag, info, seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = None
        if etag is not None:
            self._thread = threading.Thread(target=self._renew, name="assay-lock-lease", daemon=True)
            self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.etag = _put(self.lock, self.info, self.seconds, IfMatch=self.etag)
            except OSError as e:
                self.lost = True
                log.error(
                    "lost the lock %s (%s): another writer may now write the same output",
                    storage.display(self.lock),
                    "taken over" if _precondition_failed(e) else e,
                )
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is None or self.lost:
            return
        bucket, key, _ = self.lock.fs.split_path(self.lock.path)
        try:
            self.lock.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
        except OSError as e:  # taken over meanwhile, or the store is unreachable: leave it
            log.warning("could not remove the lock %s: %s", storage.display(self.lock), e)


def _put(lock: Any, info: dict[str, Any], seconds: float, **condition: str) -> str:
    ends = time.time() + seconds
    body = {**info, "boot_id": _boot_id(), "lease_s": seconds, "expires": ends}
    body["lease_ends"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ends))
    return lock.fs.pipe_file(lock.path, json.dumps(body).encode(), **condition)["ETag"]


def _boot_id() -> str:
    """This machine's current boot (Linux): a holder of the same boot whose pid is gone is dead."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _dead(holder: dict[str, Any]) -> bool:
    """The lease ended, or the holder ran on this very machine and its process is gone (a killed
    run here need not wait for its lease to end before it resumes)."""
    if float(holder.get("expires", 0)) <= time.time():
        return True
    if not holder.get("boot_id") or holder.get("boot_id") != _boot_id() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def acquire(out: str | os.PathLike, info: dict[str, Any], in_use: type[Exception]) -> Lease:
    """Take the lock of OUT or raise ``in_use(out, lock, holder)`` at once."""
    lock = lock_location(out)
    seconds = lease_seconds()
    if os.environ.get(OFF_ENV, "").lower() == "off":
        log.warning("%s=off: writing %s without a lock", OFF_ENV, storage.display(out))
        return Lease(lock, None, info, seconds)
    if storage.scheme(out) not in CONDITIONAL_PUT:
        raise LockUnsupported(
            f"{storage.display(out)}: assay locks an output on object storage with a conditional "
            f"put, which {storage.scheme(out)}:// does not offer here (S3 and S3-compatible stores "
            f"do); set {OFF_ENV}=off to write without the lock, one writer at a time"
        )
    try:
        return Lease(lock, _put(lock, info, seconds, mode="create"), info, seconds)
    except FileExistsError:
        pass
    try:
        etag = lock.fs.info(lock.path)["ETag"]
        holder = json.loads(lock.fs.cat_file(lock.path))
    except (FileNotFoundError, ValueError):  # released meanwhile, or unreadable: try once more
        return Lease(lock, _put(lock, info, seconds, mode="create"), info, seconds)
    if not _dead(holder):
        raise in_use(out, lock, holder)
    log.warning("taking over %s: its holder is gone (%s)", storage.display(lock), describe(holder))
    try:
        return Lease(lock, _put(lock, info, seconds, IfMatch=etag), info, seconds)
    except OSError as e:
        if _precondition_failed(e):  # another writer took it over first
            raise in_use(out, lock, json.loads(lock.fs.cat_file(lock.path))) from None
        raise
