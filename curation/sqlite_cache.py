"""The one way assay opens a cache file: SQLite in WAL mode, one transaction per written batch.

The judgment cache (``curation.judge.cache``) and the embedding cache (``mining.embed_cache``) are
both a table in one SQLite file, written one batch per transaction so that a run killed at any moment
keeps every batch it finished. ``SQLiteCache`` is their shared setup: the file's folder is created,
the connection waits up to a minute for another writer (two processes may share a cache), the journal
is a write-ahead log (readers do not block the writer) with ``synchronous=NORMAL`` (a committed batch
survives a killed process; a power cut may lose the last ones, which a rerun computes again), and
the schema is created if the file is new. A subclass adds its lookups and writes on ``self._db``.

Example::

    >>> import tempfile
    >>> class Notes(SQLiteCache):
    ...     def __init__(self, path):
    ...         super().__init__(path, "CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, note TEXT)")
    >>> with Notes(Path(tempfile.mkdtemp()) / "sub" / "notes.sqlite") as notes:
    ...     with notes._db:
    ...         _ = notes._db.execute("INSERT INTO notes VALUES ('a', 'b')")
    ...     notes._db.execute("SELECT note FROM notes").fetchall()
    [('b',)]
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Self

#: How long a connection waits for another process's write before giving up (seconds).
BUSY_TIMEOUT_S = 60


def cache_root() -> Path:
    """Where assay keeps its caches by default: ``$ASSAY_CACHE_DIR``, else ``~/.cache/assay``."""
    return Path(os.environ.get("ASSAY_CACHE_DIR") or Path.home() / ".cache" / "assay")


class SQLiteCache:
    """A cache in one SQLite file (see the module docstring); a context manager that closes it.

    ``schema``: the statements that create the cache's tables (``CREATE TABLE IF NOT EXISTS ...``).
    ``mmap_bytes``: how much of the file to read through a memory map (0: none), for caches whose
    hits are read in bulk."""

    def __init__(self, path: str | os.PathLike, schema: str, *, mmap_bytes: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if mmap_bytes:
            self._db.execute(f"PRAGMA mmap_size={int(mmap_bytes)}")
        self._db.executescript(schema)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
