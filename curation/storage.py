"""Where datasets live: a local folder, or a URI of any fsspec filesystem (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``; ``file://`` is a local folder).

:func:`path` gives a ``pathlib.Path`` for a local location and a ``upath.UPath`` (pathlib's API over
fsspec) for a URI, so the code that reads and writes datasets is the same at both scales; the few
operations pathlib has no portable form of (remove a tree, copy, write an object whole, read
Parquet) are the functions here. Credentials and endpoints come the way fsspec takes them: the
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), ``~/.aws``, and fsspec's own
configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/*.json``); assay passes none of them
around and prints locations through :func:`display`, which hides any user:password in a URI.

Object stores have no rename. A file put there appears whole or not at all (one PUT; Parquet shards
are written to memory first), and a dataset exists once its manifest is written: readers take the
shards the manifest lists and nothing else (``curation/dataset.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Location = Any  # pathlib.Path | upath.UPath: both have pathlib's API
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def scheme(p: str | os.PathLike) -> str:
    """``s3`` for ``s3://bucket/x``; ``""`` for a local path (``file://`` included)."""
    if _is_upath(p):
        return "" if _upath_is_local(p) else str(p.protocol)
    m = _SCHEME.match(os.fspath(p))
    return "" if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def is_remote(p: str | os.PathLike) -> bool:
    """True for a location on an object store or any non-local filesystem."""
    return scheme(p) != ""


def path(p: str | os.PathLike) -> Location:
    """The location ``p`` names: a ``Path`` for a local one, a ``UPath`` for a URI."""
    if _is_upath(p):
        return Path(p.path) if _upath_is_local(p) else p
    s = os.fspath(p)
    if not is_remote(s):
        return Path(s[len("file://") :] if s.lower().startswith("file://") else s)
    from upath import UPath

    # No listings cache: several processes (Ray tasks on other nodes) write under the same prefix,
    # and a folder listed before they did must not be remembered.
    return UPath(s, use_listings_cache=False)


def absolute(p: str | os.PathLike) -> str:
    """A location's full name as a string: an absolute local path, or the URI."""
    loc = path(p)
    return str(loc) if is_remote(loc) else str(loc.resolve())


def display(p: str | os.PathLike) -> str:
    """A location for messages and logs: a URI's ``user:password@`` (if any) is hidden."""
    return _USERINFO.sub(r"\1***@", str(p))


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root`` joined with ``parts`` as a string (a URI stays a URI)."""
    return str(path(root).joinpath(*parts))


def makedirs(p: str | os.PathLike) -> None:
    """Create a folder and its parents; nothing on an object store (prefixes need no creating)."""
    loc = path(p)
    if not is_remote(loc):
        loc.mkdir(parents=True, exist_ok=True)


def remove_tree(p: str | os.PathLike) -> None:
    """Delete a folder (a prefix on an object store) and everything in it; nothing if absent."""
    loc = path(p)
    if not is_remote(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        loc.fs.rm(loc.path, recursive=True)


def remove_file(p: str | os.PathLike) -> None:
    loc = path(p)
    if is_remote(loc):
        with contextlib.suppress(FileNotFoundError):
            loc.fs.rm_file(loc.path)
    else:
        loc.unlink(missing_ok=True)


def names(p: str | os.PathLike) -> list[str]:
    """The names in a folder (files and subfolders), sorted; [] when there is no such folder."""
    loc = path(p)
    if not is_remote(loc):
        return sorted(x.name for x in loc.iterdir()) if loc.is_dir() else []
    try:
        entries = loc.fs.ls(loc.path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != loc.path.rstrip("/"))


def files_under(p: str | os.PathLike, suffix: str = "") -> list[str]:
    """Every file below a folder (recursively), as paths relative to it, sorted."""
    loc = path(p)
    if not is_remote(loc):
        if not loc.is_dir():
            return []
        return sorted(str(f.relative_to(loc)) for f in loc.rglob(f"*{suffix}") if f.is_file())
    try:
        found = loc.fs.find(loc.path)
    except FileNotFoundError:
        return []
    base = loc.path.rstrip("/") + "/"
    return sorted(f[len(base) :] for f in found if f.startswith(base) and f.endswith(suffix))


def listing(p: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(path relative to the folder, the store's info: size, ETag, ...) of every file below the
    folder URI ``p``, sorted; [] when there is none."""
    loc = path(p)
    try:
        found = loc.fs.find(loc.path, detail=True)
    except FileNotFoundError:
        return []
    base = loc.path.rstrip("/") + "/"
    return sorted(
        (name[len(base) :], info)
        for name, info in found.items()
        if name.startswith(base) and info.get("type", "file") != "directory"
    )


def put_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Put a whole object at ``p`` in one request (readers see all of it or none). Object stores
    only: a local file is written by ``dataset.atomic_write_bytes``, which renames into place."""
    loc = path(p)
    loc.fs.pipe_file(loc.path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file to an object store: server-side within one store, else through this process."""
    s, d = path(src), path(dst)
    if is_remote(s) and type(s.fs) is type(d.fs):
        d.fs.cp_file(s.path, d.path)  # one file: not copy(), which first lists both paths
    else:
        put_bytes(d, s.read_bytes())


def _pa_source(p: str | os.PathLike) -> tuple[str, Any]:
    loc = path(p)
    return (loc.path, loc.fs) if is_remote(loc) else (str(loc), None)


def read_table(p: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, whole (a shard, a side table, a plan)."""
    where, fs = _pa_source(p)
    if fs is not None and (whole := _small_object(p)) is not None:  # one GET (see _small_object)
        return pq.read_table(pa.BufferReader(whole), columns=columns)
    return pq.read_table(where, columns=columns, filesystem=fs)


def parquet_file(p: str | os.PathLike) -> pq.ParquetFile:
    """A Parquet file opened for streaming its row groups."""
    where, fs = _pa_source(p)
    if fs is not None and (whole := _small_object(p)) is not None:  # one GET (see _small_object)
        return pq.ParquetFile(pa.BufferReader(whole))
    return pq.ParquetFile(where, filesystem=fs)


def read_metadata(p: str | os.PathLike) -> pq.FileMetaData:
    where, fs = _pa_source(p)
    if fs is not None and (footer := _remote_footer(p)) is not None:  # one GET (see _remote_footer)
        return footer
    return pq.read_metadata(where, filesystem=fs)


def num_rows(p: str | os.PathLike) -> int:
    return read_metadata(p).num_rows


def is_file(p: str | os.PathLike) -> bool:
    return path(p).is_file()


def size(p: str | os.PathLike) -> int:
    loc = path(p)
    return int(loc.fs.size(loc.path)) if is_remote(loc) else loc.stat().st_size


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def resolve_under(root: str | os.PathLike, rel: str) -> tuple[str, str, bool]:
    """(root, full, inside): where ``rel`` points under ``root``, and whether it stays inside. Local
    paths are resolved with symlinks followed; a URI's key is normalised (``..`` collapsed)."""
    if not is_remote(root):
        r = os.path.realpath(path(root))
        full = os.path.realpath(os.path.join(r, rel))
        return r, full, os.path.commonpath([r, full]) == r
    r = str(path(root)).rstrip("/")
    prefix = r.split("://", 1)[0] + "://"
    key_root = r[len(prefix) :]
    if rel.startswith(prefix):  # already a full URI (a resolved cell): inside if under the root
        key = posixpath.normpath(rel[len(prefix) :])
    elif posixpath.isabs(rel) or _SCHEME.match(rel):  # a place of its own: never under the root
        return r, rel, False
    else:
        key = posixpath.normpath(posixpath.join(key_root, rel))
    return r, prefix + key, key == key_root or key.startswith(key_root + "/")


def _is_upath(p: Any) -> bool:
    return type(p).__module__.startswith("upath")


def _upath_is_local(p: Any) -> bool:
    return str(getattr(p, "protocol", "")) in ("", "file", "local")


def local_copy(p: str | os.PathLike, under: str | os.PathLike) -> Path:
    """A local folder with the files of the folder ``p`` (a URI), downloaded once into ``under``:
    ``<under>/<key>/<p's name>``, ``key`` a hash of ``p``'s listing (each file's relative path, size
    and ETag or checksum), so an unchanged folder is never downloaded twice and a changed one is
    downloaded again. The files go to a staging folder beside it, renamed into place once all are
    there, so a killed download is never taken for a copy. A local ``p`` is returned as it is.

    For readers that need local files (transformers and safetensors open model folders by path)."""
    loc = path(p)
    if not is_remote(loc):
        return Path(loc)
    import hashlib
    import uuid

    base = loc.path.rstrip("/") + "/"
    files = listing(loc)
    if not files:
        raise FileNotFoundError(f"{display(p)}: no files there")
    h = hashlib.sha256(str(loc).rstrip("/").encode())
    for rel, info in files:
        tag = next(
            (
                info[k]
                for k in ("ETag", "etag", "md5Hash", "checksum", "mtime", "LastModified")
                if info.get(k)
            ),
            "",
        )
        h.update(f"\0{rel}\0{info.get('size')}\0{tag}".encode())
    key = h.hexdigest()[:24]
    name = posixpath.basename(loc.path.rstrip("/"))
    final = Path(under) / key
    if (final / name).is_dir():
        return final / name
    staging = Path(under) / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, _ in files:
            target = staging / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            loc.fs.get_file(base + rel, str(target))
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / name).is_dir():  # not another process that finished the same copy first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final / name


# -- Parquet on an object store in one request ------------------------------------------------------
# pyarrow reading through fsspec spends 5 to 7 requests on one small Parquet object (HEADs for the
# file's info, then ranged GETs for the footer and the column chunks), each a round trip to the store;
# a stage reads hundreds of shards, side tables and plans. One ranged GET of the object's last bytes
# ("bytes=-N", no HEAD first) brings a small object whole, and the footer of any other. Local files
# never come here.

#: Objects smaller than this are read whole in one GET (a 50,000-row text shard is ~0.5 MB).
SMALL_OBJECT = 8 << 20
#: The bytes fetched to read a footer alone (``read_metadata``): enough for all but very wide files.
FOOTER_READ = 64 << 10


def _small_object(p: str | os.PathLike) -> bytes | None:
    """The whole object at ``p`` when it is smaller than ``SMALL_OBJECT``; None when it is not (the
    caller reads it the generic way: one wasted GET for a large file, against 4 to 6 saved on each
    small one)."""
    loc = path(p)
    tail = loc.fs.cat_file(loc.path, start=-SMALL_OBJECT)
    return tail if len(tail) < SMALL_OBJECT else None


def _remote_footer(p: str | os.PathLike) -> pq.FileMetaData | None:
    """The Parquet footer of the object at ``p`` from one GET of its last ``FOOTER_READ`` bytes;
    None when the footer is larger or the tail ends in no Parquet footer: the caller then reads it the
    generic way, which raises pyarrow's own error for a file that is not Parquet."""
    loc = path(p)
    return _footer_of(loc.fs.cat_file(loc.path, start=-FOOTER_READ))


def _footer_of(tail: bytes) -> pq.FileMetaData | None:
    if len(tail) < FOOTER_READ:  # the whole object
        return pq.read_metadata(pa.BufferReader(tail))
    footer_len = int.from_bytes(tail[-8:-4], "little")
    if tail[-4:] != b"PAR1" or footer_len + 8 > len(tail):
        return None
    # The footer with the magic bytes around it reads as a Parquet file of no data: enough for its
    # metadata (row counts, schema), which is all that is asked of it here.
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(footer_len + 8) :]))


#: Requests an object-store caller keeps in flight at once (``each``).
CONCURRENCY = 16


def each(fn: Any, items: list[Any], remote: bool) -> list[Any]:
    """``[fn(x) for x in items]``, in order; with ``remote`` (the items are on an object store) in
    ``CONCURRENCY`` threads, so that the round trips overlap instead of adding up."""
    if not remote or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(CONCURRENCY, len(items))) as pool:
        return list(pool.map(fn, items))


def read_many(paths: list[str | os.PathLike]) -> list[bytes]:
    """The bytes of several files (on one filesystem), in order. An object store's are fetched
    concurrently: a few round trips for all of them, not one or two each."""
    locs = [path(p) for p in paths]
    if not locs or not is_remote(locs[0]):
        return [loc.read_bytes() for loc in locs]
    # From byte 0 to the end: one GET each (without a range, s3fs asks for each object's size first).
    starts = [0] * len(locs)
    return list(locs[0].fs.cat_ranges([loc.path for loc in locs], starts, None, on_error="raise"))


def footers(paths: list[str | os.PathLike]) -> list[pq.FileMetaData]:
    """``read_metadata`` of several Parquet files (on one filesystem), in order; an object store's
    footers are fetched concurrently, one ranged GET each."""
    locs = [path(p) for p in paths]
    if not locs or not is_remote(locs[0]):
        return [read_metadata(p) for p in paths]
    tails = locs[0].fs.cat_ranges([loc.path for loc in locs], -FOOTER_READ, None, on_error="raise")
    return [_footer_of(tail) or read_metadata(p) for tail, p in zip(tails, paths, strict=True)]


# -- a local folder put on an object store, so that no reader takes a half upload for a whole one ---
# (Added for exports: an object store has no rename, so a folder built locally is uploaded file by
# file, and what makes it look finished goes up last.)


def put_file(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the local file ``local`` at ``dest`` (a URI) whole: the object appears when all of it
    is there (one PUT, or a multipart upload completed at the end), never in part."""
    d = path(dest)
    _put_file(d.fs, os.fspath(local), d.path)


def _put_file(fs: Any, lpath: str, rpath: str) -> None:  # one place for every upload (tests stub it)
    fs.put_file(lpath, rpath)


def put_tree(
    local: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    last: tuple[str, ...] | list[str] = (),
    marker: str | None = None,
    replace: bool = True,
) -> list[str]:
    """Put the files of the local folder ``local`` under ``dest`` (a URI), so that a reader never
    takes a half upload for a finished one. In order:

    1. ``dest/<marker>`` (when given) is put: an upload into this folder is under way;
    2. with ``replace``, what ``dest`` already holds is deleted, its ``last`` files first (what made
       it look finished), the marker kept;
    3. every other file of ``local`` goes up (``CONCURRENCY`` at a time: :func:`each`), each whole;
    4. the files named in ``last`` (relative paths) go up one by one, in that order: a reader that
       waits for the last of them sees everything it refers to already there;
    5. the marker is deleted.

    A run killed before 4 ends leaves the marker and none of ``last`` (a caller's rerun sees the
    marker, clears the folder and puts it again). Returns the relative paths put."""
    d = path(dest)
    if not is_remote(d):
        raise ValueError(f"{display(dest)}: put_tree uploads to a URI; a local folder is renamed into place")
    fs = d.fs
    base = d.path.rstrip("/")
    files = files_under(local)
    if marker:
        import json
        import socket
        import time

        note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        put_bytes(d / marker, json.dumps(note).encode())
    if replace:
        old = [rel for rel in files_under(d) if rel != marker]
        first = [rel for rel in last if rel in old]
        for rel in first:
            remove_file(d / rel)
        rest = [f"{base}/{rel}" for rel in old if rel not in first]
        if rest:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(rest)
    later = [rel for rel in last if rel in files]
    bulk = [rel for rel in files if rel not in later and rel != marker]
    each(lambda rel: _put_file(fs, str(Path(local) / rel), f"{base}/{rel}"), bulk, remote=True)
    for rel in later:
        _put_file(fs, str(Path(local) / rel), f"{base}/{rel}")
    if marker:
        remove_file(d / marker)
    return bulk + later
