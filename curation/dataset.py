"""Reading datasets shard by shard, and writing them so that nothing is ever half-written.

A reader never loads a table whole: ``Dataset.iter_batches`` streams record batches shard by shard.
A writer puts every file under a temporary name and renames it when complete (``atomic_write``);
``manifest.json`` is written last, so a directory with a manifest is a finished dataset and one
without is an unfinished run that the same stage can resume.
"""

from __future__ import annotations

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

from assay.curation.schema import DATA_TABLES, NULL_KEY, QUARANTINE, SCHEMA_VERSION, SCHEMAS

MANIFEST = "manifest.json"
PROGRESS = "_progress"
TMP_PREFIX = ".tmp-"


class DatasetError(Exception):
    """A dataset directory that cannot be used as asked; the message says which and why."""


class AlreadyComplete(DatasetError):
    """The output already holds this very run, finished (same stage, inputs and settings)."""

    def __init__(self, root: Path, manifest: Manifest):
        super().__init__(f"{root} is already complete (same inputs and settings): nothing to do")
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
    """Write a Parquet file under a temporary name, fsync it, then rename it into place."""
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
    stage carrying its ancestors' quarantine) shares the bytes instead of copying them.
    """
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
    """Delete temporary files a killed run left behind; returns how many."""
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
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)


class Dataset:
    """A finished dataset directory, read shard by shard."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            if (self.root / PROGRESS).exists():
                raise DatasetError(
                    f"{self.root} is an unfinished run (no {MANIFEST}, a {PROGRESS}/ folder): "
                    "rerun the stage that writes it to resume, or delete the folder"
                )
            raise DatasetError(f"{self.root} is not an assay dataset: {MANIFEST} not found")
        try:
            obj = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{mpath}: unreadable manifest ({e})") from e
        if not isinstance(obj, dict) or obj.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(
                f"{mpath}: schema_version {obj.get('schema_version') if isinstance(obj, dict) else '?'}"
                f" is not supported (this assay reads version {SCHEMA_VERSION})"
            )
        self.manifest = Manifest.from_json(obj)

    @property
    def data_root(self) -> Path:
        """Where relative image paths are resolved; the dataset directory unless the manifest says."""
        if self.manifest.data_root:
            p = Path(self.manifest.data_root)
            return p if p.is_absolute() else (self.root / p)
        return self.root

    def shards(self, table: str) -> list[str]:
        """Shard file names of ``table``, in order."""
        d = self.root / table
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))

    def shard_path(self, table: str, name: str) -> Path:
        return self.root / table / name

    def read_shard(self, table: str, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.shard_path(table, name), columns=columns)

    def check_shards(self) -> None:
        """Every shard of every table must be a Parquet file whose footer can be read: a truncated
        or foreign file is an error that names it. Stages call this before they write anything
        (rows can be refused; a file cannot)."""
        for table in SCHEMAS:
            for name in self.shards(table):
                path = self.shard_path(table, name)
                try:
                    pq.read_metadata(path)
                except (pa.ArrowInvalid, OSError) as e:
                    raise DatasetError(
                        f"{path}: not a readable Parquet file ({e}); the dataset {self.root} is "
                        "damaged: rerun the stage that wrote it"
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
            pf = pq.ParquetFile(self.shard_path(table, name))
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def num_rows(self, table: str) -> int:
        return sum(pq.ParquetFile(self.shard_path(table, n)).metadata.num_rows for n in self.shards(table))

    def parent_ref(self) -> dict[str, Any]:
        """How a child dataset's manifest refers to this one."""
        mbytes = (self.root / MANIFEST).read_bytes()
        return {
            "path": str(self.root.resolve()),
            "stage": self.manifest.stage,
            "manifest_sha256": hashlib.sha256(mbytes).hexdigest(),
        }


@dataclass(frozen=True)
class ShardSink:
    """Where one stage's output shards go. Each shard's data and quarantine files are written
    atomically, then a marker ``_progress/done/<table>/<name>.json`` with its counts."""

    root: str
    stage: str
    depth: int

    def marker(self, table: str, name: str) -> Path:
        return Path(self.root) / PROGRESS / "done" / table / f"{name}.json"

    def is_done(self, table: str, name: str) -> bool:
        return self.marker(table, name).is_file()

    def shard_path(self, table: str, name: str) -> Path:
        return Path(self.root) / table / name

    def quarantine_path(self, table: str, name: str) -> Path:
        return Path(self.root) / QUARANTINE / f"q{self.depth:02d}-{self.stage}-{table}-{name}"

    def link_shard(self, table: str, name: str, src: str | os.PathLike) -> dict[str, Any]:
        """Pass an input shard through unchanged (hard link, else copy), then mark it done."""
        link_or_copy(src, self.shard_path(table, name))
        marker = {"table": table, "shard": name, "rows": pq.ParquetFile(src).metadata.num_rows}
        marker |= {"quarantined": 0, "reasons": {}}
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
        rows = 0
        if data is not None and data.num_rows > 0:
            atomic_write_parquet(
                self.shard_path(table, name), data.select(SCHEMAS[table].names).cast(SCHEMAS[table])
            )
            rows = data.num_rows
        qrows = 0
        reasons: dict[str, int] = {}
        if quarantine is not None and quarantine.num_rows > 0:
            atomic_write_parquet(self.quarantine_path(table, name), quarantine.cast(SCHEMAS[QUARANTINE]))
            qrows = quarantine.num_rows
            for r in quarantine.column("reason").to_pylist():
                reasons[r] = reasons.get(r, 0) + 1
        marker = {
            "table": table,
            "shard": name,
            "rows": rows,
            "quarantined": qrows,
            "reasons": reasons,
            **(stats or {}),
        }
        atomic_write_json(self.marker(table, name), marker)
        return marker


class DatasetWriter:
    """Writes one stage's output dataset, shard by shard, resumably.

    Each finished shard leaves a marker ``_progress/done/<table>/<name>.json`` (its counts), written
    after the shard's data and quarantine files. A rerun with the same stage and config skips marked
    shards; ``finish`` adds the counts, carries the parents' quarantine forward, writes the manifest
    and removes ``_progress``.
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
        self.root = Path(root)
        self.stage = stage
        self.config = config
        self.parents = list(parents)
        self.data_root = data_root
        self.run_id = fingerprint(
            {"stage": stage, "config": config, "parents": [p.parent_ref() for p in self.parents]}
        )
        if (self.root / MANIFEST).exists():
            done = json.loads((self.root / MANIFEST).read_text())
            if done.get("run_id") == self.run_id and not overwrite:
                # A run killed after its manifest, while it removed _progress/: finish that cleanup.
                shutil.rmtree(self.root / PROGRESS, ignore_errors=True)
                remove_stale_tmp(self.root)
                raise AlreadyComplete(self.root, Manifest.from_json(done))
            if not overwrite:
                raise DatasetError(
                    f"{self.root} already holds a finished dataset made by other inputs or settings; "
                    "choose a new folder or pass --overwrite to replace it"
                )
            shutil.rmtree(self.root)
        run_file = self.root / PROGRESS / "run.json"
        if run_file.exists():
            prev = json.loads(run_file.read_text())
            if prev.get("run_id") != self.run_id:
                if not overwrite:
                    raise DatasetError(
                        f"{self.root} holds an unfinished '{prev.get('stage')}' run with other inputs or "
                        "settings; rerun that command to resume it, or pass --overwrite to start over"
                    )
                shutil.rmtree(self.root)
        elif self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise DatasetError(f"{self.root} exists and is not empty; choose a new folder or --overwrite")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.root)
        atomic_write_json(run_file, {"run_id": self.run_id, "stage": stage, "config": config})

    @property
    def progress_dir(self) -> Path:
        return self.root / PROGRESS

    @property
    def sink(self) -> ShardSink:
        """A small picklable handle that task functions (in other processes) write shards through."""
        return ShardSink(str(self.root), self.stage, len(self.lineage_of_parents()))

    def is_done(self, table: str, name: str) -> bool:
        return self.sink.is_done(table, name)

    def markers(self) -> list[dict[str, Any]]:
        done = self.progress_dir / "done"
        return [json.loads(p.read_text()) for p in sorted(done.rglob("*.json"))] if done.exists() else []

    def lineage_of_parents(self) -> list[dict[str, Any]]:
        return list(self.parents[0].manifest.lineage) if self.parents else []

    def finish(self, extra: dict[str, Any] | None = None) -> Manifest:
        """Add up the shard markers, carry quarantine forward, write manifest.json last."""
        counts = {t: 0 for t in DATA_TABLES}
        reasons: dict[str, int] = {}
        for m in self.markers():
            counts[m["table"]] = counts.get(m["table"], 0) + m["rows"]
            for r, n in m.get("reasons", {}).items():
                key = f"{self.stage}:{r}"
                reasons[key] = reasons.get(key, 0) + n
        # The parents' refused rows stay visible in every descendant: nothing is lost.
        for parent in self.parents:
            pq_dir = parent.root / QUARANTINE
            if pq_dir.is_dir():
                for src in sorted(pq_dir.glob("*.parquet")):
                    dst = self.root / QUARANTINE / src.name
                    if not dst.exists():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        link_or_copy(src, dst)
            for r, n in parent.manifest.quarantine_reasons.items():
                reasons[r] = reasons.get(r, 0) + n
        qdir = self.root / QUARANTINE
        counts[QUARANTINE] = (
            sum(pq.ParquetFile(p).metadata.num_rows for p in qdir.glob("*.parquet")) if qdir.is_dir() else 0
        )
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        step = {
            "stage": self.stage,
            "created": created,
            "config": self.config,
            "counts": counts,
            "path": str(self.root.resolve()),
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
        )
        atomic_write_json(self.root / MANIFEST, manifest.to_json())
        shutil.rmtree(self.progress_dir, ignore_errors=True)
        return manifest


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
