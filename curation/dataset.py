"""Reading datasets shard by shard, and writing them so that nothing is ever half-written.

A reader never loads a table whole: ``Dataset.iter_batches`` streams record batches shard by shard.
A writer puts every file under a temporary name and renames it when complete (``atomic_write``);
on an object store, which has no rename, it puts each file whole in one request. ``manifest.json``
is written last and lists every shard: a directory with a manifest is a finished dataset, readers
take the shards the manifest names and nothing else (a dead attempt's leftovers are never read),
and a directory without one is an unfinished run that the same stage can resume. A dataset's root
may be a local folder or a URI (``curation/storage.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from assay.curation import storage
from assay.curation.schema import DATA_TABLES, NULL_KEY, QUARANTINE, SCHEMA_VERSION, SCHEMAS

MANIFEST = "manifest.json"
PROGRESS = "_progress"
TMP_PREFIX = ".tmp-"


class DatasetError(Exception):
    """A dataset directory that cannot be used as asked; the message says which and why."""


class AlreadyComplete(DatasetError):
    """The output already holds this very run, finished (same stage, inputs and settings)."""

    def __init__(self, root: Any, manifest: Manifest):
        super().__init__(
            f"{storage.display(root)} is already complete (same inputs and settings): nothing to do"
        )
        self.manifest = manifest


def code_version() -> str:
    """The assay version, plus the git commit when running from a checkout."""
    from assay.curation import __version__

    try:
        here = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    if storage.is_remote(path):
        storage.put_bytes(path, data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        tmp.write_bytes(data)
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def atomic_write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """Write a Parquet file under a temporary name, fsync it, then rename it into place (on an
    object store: write it in memory, then put it whole)."""
    if storage.is_remote(path):
        storage.put_bytes(path, storage.parquet_bytes(table))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link, or a copy across filesystems.

    Shards never change once written, so a stage that passes a table through unchanged (and every
    stage carrying its ancestors' quarantine) shares the bytes instead of copying them. On an
    object store: a server-side copy.
    """
    if storage.is_remote(dst):
        storage.copy_file(src, dst)
        return
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or one without links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:  # a full disk, say: no half copy left behind
        tmp.unlink(missing_ok=True)
        raise


def staging_dir(path: str | os.PathLike) -> Path:
    """Where a directory output (an export, a checkpoint) is built before :func:`commit_dir` renames
    it into place: the hidden ``.tmp-<name>-<pid>`` beside ``path``. With :func:`atomic_write_bytes`
    for files, the one way an output is committed: nothing is ever seen half-written."""
    if storage.is_remote(path):
        raise DatasetError(
            f"{storage.display(path)}: exports and checkpoints are written to a local folder "
            "(copy them to object storage afterwards); datasets and run folders may be URIs"
        )
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def commit_file(written: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished file ``written`` into place as ``path``, its bytes fsynced first. (The
    folder is not fsynced: this runs for every shard and progress marker, and a rename lost to a
    crash is redone by the resume that follows.)"""
    written, path = Path(written), Path(path)
    _fsync(written)
    os.replace(written, path)


def commit_dir(staging: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished ``staging`` folder into place as ``path``, durably (files and folders
    fsynced first). An existing ``path`` is replaced by two renames (for an instant neither is
    there) and comes back if the second fails."""
    staging, path = Path(staging), Path(path)
    _fsync_tree(staging)
    if path.exists():
        old = path.with_name(f"{TMP_PREFIX}{path.name}-old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, path)
    _fsync(path.parent)


def remove_stale_staging(path: str | os.PathLike) -> int:
    """Remove the staging folders (and files) that killed writers of ``path`` left beside it: those
    of processes no longer alive. Returns how many."""
    if storage.is_remote(path):
        return 0  # nothing is staged on an object store
    path = Path(path)
    n = 0
    for p in path.parent.glob(f"{TMP_PREFIX}{path.name}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        _fsync(p)
    _fsync(path)


def remove_stale_tmp(root: str | os.PathLike) -> int:
    """Delete temporary files a killed run left behind; returns how many (none on an object
    store, where nothing is written under a temporary name)."""
    if storage.is_remote(root):
        return 0
    n = 0
    for p in Path(root).rglob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs, plans)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """What a dataset is and where it came from. Written last; its presence marks completion."""

    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    parents: list[dict[str, Any]] = field(default_factory=list)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    data_root: str | None = None
    schema_version: int = SCHEMA_VERSION
    code_version: str = ""
    created: str = ""
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: table -> its shard file names, and "quarantine" -> the quarantine files: what readers read.
    #: None in a manifest written before the list existed (readers then list the folders).
    files: dict[str, list[str]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "stage": self.stage,
            "created": self.created,
            "code_version": self.code_version,
            "config": self.config,
            "counts": self.counts,
            "quarantine_reasons": self.quarantine_reasons,
            "parents": self.parents,
            "lineage": self.lineage,
            "data_root": self.data_root,
            "extra": self.extra,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)


class Dataset:
    """A finished dataset directory (a local folder or a URI), read shard by shard."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            if (self.root / PROGRESS).exists():
                raise DatasetError(
                    f"{storage.display(self.root)} is an unfinished run (no {MANIFEST}, a {PROGRESS}/ "
                    "folder): rerun the stage that writes it to resume, or delete the folder"
                )
            raise DatasetError(f"{storage.display(self.root)} is not an assay dataset: {MANIFEST} not found")
        try:
            obj = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{storage.display(mpath)}: unreadable manifest ({e})") from e
        if not isinstance(obj, dict) or obj.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(
                f"{storage.display(mpath)}: schema_version "
                f"{obj.get('schema_version') if isinstance(obj, dict) else '?'}"
                f" is not supported (this assay reads version {SCHEMA_VERSION})"
            )
        self.manifest = Manifest.from_json(obj)

    @property
    def data_root(self) -> Any:
        """Where relative image paths are resolved; the dataset directory unless the manifest says."""
        if self.manifest.data_root:
            if storage.is_remote(self.manifest.data_root):
                return storage.path(self.manifest.data_root)
            p = Path(self.manifest.data_root)
            return p if p.is_absolute() else (self.root / p)
        return self.root

    def shards(self, table: str) -> list[str]:
        """Shard file names of ``table``, in order: those the manifest lists (a manifest written
        before it listed them: the Parquet files in the table's folder)."""
        if self.manifest.files is not None:
            return list(self.manifest.files.get(table, []))
        return [
            n for n in storage.names(self.root / table) if n.endswith(".parquet") and not n.startswith(".")
        ]

    def quarantine_files(self) -> list[str]:
        """The quarantine's file names (``quarantine/<name>``), this stage's and its ancestors'."""
        return self.shards(QUARANTINE)

    def shard_path(self, table: str, name: str) -> Any:
        return self.root / table / name

    def read_shard(self, table: str, name: str, columns: list[str] | None = None) -> pa.Table:
        return storage.read_table(self.shard_path(table, name), columns=columns)

    def check_shards(self) -> None:
        """Every shard of every table must be a Parquet file whose footer can be read: a truncated
        or foreign file is an error that names it. Stages call this before they write anything
        (rows can be refused; a file cannot)."""
        paths = [self.shard_path(table, name) for table in SCHEMAS for name in self.shards(table)]
        with contextlib.suppress(pa.ArrowInvalid, OSError):
            storage.footers(paths)  # all together (concurrently on an object store); if one fails,
            return  # the loop below finds which
        for table in SCHEMAS:
            for name in self.shards(table):
                path = self.shard_path(table, name)
                try:
                    storage.read_metadata(path)
                except (pa.ArrowInvalid, OSError) as e:
                    raise DatasetError(
                        f"{storage.display(path)}: not a readable Parquet file ({e}); the dataset "
                        f"{storage.display(self.root)} is damaged: rerun the stage that wrote it"
                    ) from None

    def query_subsets(self) -> dict[str, str]:
        """Each query id's subset (``schema.NULL_KEY`` for a query without one): how pairs, metrics
        and reports find the subset of a pair's query."""
        found: dict[str, str] = {}
        for batch in self.iter_batches("queries", columns=["query_id", "subset"]):
            ids, subsets = (batch.column(i).to_pylist() for i in range(2))
            found.update(
                (q, NULL_KEY if s is None else s) for q, s in zip(ids, subsets, strict=True) if q is not None
            )
        return found

    def iter_batches(
        self, table: str, columns: list[str] | None = None, batch_size: int = 8192
    ) -> Iterator[pa.RecordBatch]:
        """Stream ``table`` in record batches, shard by shard, never holding it whole."""
        for name in self.shards(table):
            pf = storage.parquet_file(self.shard_path(table, name))
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def num_rows(self, table: str) -> int:
        return sum(storage.num_rows(self.shard_path(table, n)) for n in self.shards(table))

    def parent_ref(self) -> dict[str, Any]:
        """How a child dataset's manifest refers to this one."""
        mbytes = (self.root / MANIFEST).read_bytes()
        return {
            "path": storage.absolute(self.root),
            "stage": self.manifest.stage,
            "manifest_sha256": hashlib.sha256(mbytes).hexdigest(),
        }


@dataclass(frozen=True)
class ShardSink:
    """Where one stage's output shards go. Each shard's data and quarantine files are written
    atomically, then a marker ``_progress/done/<table>/<name>.json`` with its counts and the names
    of the files it wrote (the manifest's list is made of them)."""

    root: str
    stage: str
    depth: int

    def marker(self, table: str, name: str) -> Any:
        return storage.path(self.root) / PROGRESS / "done" / table / f"{name}.json"

    def is_done(self, table: str, name: str) -> bool:
        return self.marker(table, name).is_file()

    def shard_path(self, table: str, name: str) -> Any:
        return storage.path(self.root) / table / name

    def quarantine_name(self, table: str, name: str) -> str:
        return f"q{self.depth:02d}-{self.stage}-{table}-{name}"

    def quarantine_path(self, table: str, name: str) -> Any:
        return storage.path(self.root) / QUARANTINE / self.quarantine_name(table, name)

    def link_shard(self, table: str, name: str, src: str | os.PathLike) -> dict[str, Any]:
        """Pass an input shard through unchanged (hard link, else copy), then mark it done."""
        link_or_copy(src, self.shard_path(table, name))
        marker = {"table": table, "shard": name, "rows": storage.num_rows(src), "file": name}
        marker |= {"quarantined": 0, "reasons": {}, "quarantine_file": None}
        atomic_write_json(self.marker(table, name), marker)
        return marker

    def write_shard(
        self,
        table: str,
        name: str,
        data: pa.Table | None,
        quarantine: pa.Table | None = None,
        stats: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one output shard (and its quarantine) atomically, then mark it done."""
        files = []
        rows = 0
        if data is not None and data.num_rows > 0:
            files.append(
                (self.shard_path(table, name), data.select(SCHEMAS[table].names).cast(SCHEMAS[table]))
            )
            rows = data.num_rows
        qrows = 0
        reasons: dict[str, int] = {}
        if quarantine is not None and quarantine.num_rows > 0:
            files.append((self.quarantine_path(table, name), quarantine.cast(SCHEMAS[QUARANTINE])))
            qrows = quarantine.num_rows
            for r in quarantine.column("reason").to_pylist():
                reasons[r] = reasons.get(r, 0) + 1
        # Both files before the marker; on an object store, both at once.
        storage.each(lambda f: atomic_write_parquet(*f), files, storage.is_remote(self.root))
        marker = {
            "table": table,
            "shard": name,
            "rows": rows,
            "file": name if rows else None,
            "quarantined": qrows,
            "quarantine_file": self.quarantine_name(table, name) if qrows else None,
            "reasons": reasons,
            **(stats or {}),
        }
        atomic_write_json(self.marker(table, name), marker)
        return marker


class DatasetWriter:
    """Writes one stage's output dataset, shard by shard, resumably.

    Each finished shard leaves a marker ``_progress/done/<table>/<name>.json`` (its counts and
    files), written after the shard's data and quarantine files. A rerun with the same stage and
    config skips marked shards; ``finish`` adds the counts, carries the parents' quarantine forward,
    writes the manifest (which lists the files the markers name) and removes ``_progress``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        stage: str,
        config: dict[str, Any],
        parents: list[Dataset] = (),
        data_root: str | None = None,
        overwrite: bool = False,
    ):
        self.root = storage.path(root)
        self.stage = stage
        self.config = config
        self.parents = list(parents)
        self.data_root = data_root
        self.run_id = fingerprint(
            {"stage": stage, "config": config, "parents": [p.parent_ref() for p in self.parents]}
        )
        shown = storage.display(self.root)
        if (self.root / MANIFEST).exists():
            done = json.loads((self.root / MANIFEST).read_text())
            if done.get("run_id") == self.run_id and not overwrite:
                # A run killed after its manifest, while it removed _progress/: finish that cleanup.
                storage.remove_tree(self.root / PROGRESS)
                remove_stale_tmp(self.root)
                raise AlreadyComplete(self.root, Manifest.from_json(done))
            if not overwrite:
                raise DatasetError(
                    f"{shown} already holds a finished dataset made by other inputs or settings; "
                    "choose a new folder or pass --overwrite to replace it"
                )
            storage.remove_tree(self.root)
        run_file = self.root / PROGRESS / "run.json"
        if run_file.exists():
            prev = json.loads(run_file.read_text())
            if prev.get("run_id") != self.run_id:
                if not overwrite:
                    raise DatasetError(
                        f"{shown} holds an unfinished '{prev.get('stage')}' run with other inputs or "
                        "settings; rerun that command to resume it, or pass --overwrite to start over"
                    )
                storage.remove_tree(self.root)
        elif storage.names(self.root):
            if not overwrite:
                raise DatasetError(f"{shown} exists and is not empty; choose a new folder or --overwrite")
            storage.remove_tree(self.root)
        storage.makedirs(self.root)
        remove_stale_tmp(self.root)
        atomic_write_json(run_file, {"run_id": self.run_id, "stage": stage, "config": config})

    @property
    def progress_dir(self) -> Any:
        return self.root / PROGRESS

    @property
    def sink(self) -> ShardSink:
        """A small picklable handle that task functions (in other processes) write shards through."""
        return ShardSink(str(self.root), self.stage, len(self.lineage_of_parents()))

    def is_done(self, table: str, name: str) -> bool:
        return self.sink.is_done(table, name)

    def markers(self, known: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every shard marker; those in ``known`` (the ones this run's tasks returned) are not read
        again, only listed."""
        done = self.progress_dir / "done"
        have = {f"{m['table']}/{m['shard']}.json": m for m in known or []}
        names = storage.files_under(done, ".json")
        found = storage.read_many([done / rel for rel in names if rel not in have])
        read = iter(json.loads(data) for data in found)  # read together: one request each is slow on S3
        return [have[rel] if rel in have else next(read) for rel in names]

    def lineage_of_parents(self) -> list[dict[str, Any]]:
        return list(self.parents[0].manifest.lineage) if self.parents else []

    def _files_of(self, marker: dict[str, Any]) -> tuple[str | None, str | None]:
        """The data and quarantine files a shard marker names (a marker written before markers
        named them, by a run this one resumes: the files that are there)."""
        table, shard = marker["table"], marker["shard"]
        if "file" in marker:
            return marker["file"], marker.get("quarantine_file")
        sink = self.sink
        data = shard if sink.shard_path(table, shard).exists() else None
        return data, sink.quarantine_name(table, shard) if marker.get("quarantined") else None

    def finish(
        self, extra: dict[str, Any] | None = None, written: list[dict[str, Any]] | None = None
    ) -> Manifest:
        """Add up the shard markers, carry quarantine forward, write manifest.json last.
        ``written``: the markers this run's shard tasks returned (the rest are read)."""
        counts = {t: 0 for t in DATA_TABLES}
        reasons: dict[str, int] = {}
        files: dict[str, list[str]] = {t: [] for t in DATA_TABLES}
        quarantine: set[str] = set()
        markers = self.markers(written)
        own: list[str] = []  # this stage's quarantine files
        for m in markers:
            counts[m["table"]] = counts.get(m["table"], 0) + m["rows"]
            for r, n in m.get("reasons", {}).items():
                key = f"{self.stage}:{r}"
                reasons[key] = reasons.get(key, 0) + n
            written, refused = self._files_of(m)
            if written:
                files.setdefault(m["table"], []).append(written)
            if refused:
                own.append(refused)
        # The parents' refused rows stay visible in every descendant: nothing is lost.
        present = set(storage.names(self.root / QUARANTINE))  # one listing, not an exists() per file
        inherited: list[list[str]] = []
        for parent in self.parents:
            names = parent.quarantine_files()
            inherited.append(names)
            storage.each(
                lambda name, parent=parent: link_or_copy(
                    parent.root / QUARANTINE / name, self.root / QUARANTINE / name
                ),
                [n for n in names if n not in present],
                storage.is_remote(self.root),
            )
            quarantine.update(names)
            for r, n in parent.manifest.quarantine_reasons.items():
                reasons[r] = reasons.get(r, 0) + n
        hand_made = files.pop(QUARANTINE, [])  # write_dataset's hand-made quarantine table
        quarantine |= set(own) | set(hand_made)
        files = {t: sorted(names) for t, names in files.items()} | {QUARANTINE: sorted(quarantine)}
        if not hand_made and _disjoint([own, *inherited]) and all(_counts_listed(p) for p in self.parents):
            # Each quarantine file is this stage's own (its marker counted it) or one parent's (its
            # manifest counted it), never two of them: add up, no file read.
            counts[QUARANTINE] = sum(m.get("quarantined", 0) for m in markers) + sum(
                p.manifest.counts[QUARANTINE] for p in self.parents
            )
        else:  # files shared between parents, or counts from an older manifest: count the rows
            counts[QUARANTINE] = sum(  # the footers read together (concurrently on an object store)
                m.num_rows for m in storage.footers([self.root / QUARANTINE / n for n in files[QUARANTINE]])
            )
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        step = {
            "stage": self.stage,
            "created": created,
            "config": self.config,
            "counts": counts,
            "path": storage.absolute(self.root),
        }
        manifest = Manifest(
            stage=self.stage,
            config=self.config,
            counts=counts,
            quarantine_reasons=dict(sorted(reasons.items())),
            parents=[p.parent_ref() for p in self.parents],
            lineage=self.lineage_of_parents() + [step],
            data_root=self.data_root,
            code_version=code_version(),
            created=created,
            run_id=self.run_id,
            extra=extra or {},
            files=files,
        )
        atomic_write_json(self.root / MANIFEST, manifest.to_json())
        storage.remove_tree(self.progress_dir)
        return manifest


def _disjoint(groups: list[list[str]]) -> bool:
    return len(set().union(*groups)) == sum(len(g) for g in groups)


def _counts_listed(parent: Dataset) -> bool:
    """Whether a parent's manifest lists its files and counts their quarantined rows."""
    return parent.manifest.files is not None and QUARANTINE in parent.manifest.counts


def write_dataset(
    root: str | os.PathLike,
    tables: dict[str, pa.Table | list[dict[str, Any]]],
    *,
    stage: str = "write",
    config: dict[str, Any] | None = None,
    rows_per_shard: int = 50_000,
    data_root: str | None = None,
    overwrite: bool = False,
) -> Dataset:
    """Write in-memory tables (Arrow tables or lists of row dicts) as a finished dataset.

    For small data, tests and examples; stages stream through ``DatasetWriter`` instead.
    """
    writer = DatasetWriter(root, stage=stage, config=config or {}, data_root=data_root, overwrite=overwrite)
    sink = writer.sink
    for table, rows in tables.items():
        t = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=SCHEMAS[table])
        for i, start in enumerate(range(0, max(t.num_rows, 1), rows_per_shard)):
            if t.num_rows:
                sink.write_shard(table, shard_name(i), t.slice(start, rows_per_shard))
    writer.finish()
    return Dataset(root)
