"""The shared setup of assay's SQLite caches (the judgment cache and the embedding cache)."""

from __future__ import annotations

import sqlite3

import pytest

from assay.curation.judge.cache import JudgmentCache, cache_root
from assay.curation.sqlite_cache import SQLiteCache


class Notes(SQLiteCache):
    def __init__(self, path, **kwargs):
        super().__init__(path, "CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, note TEXT)", **kwargs)


def test_a_cache_file_is_created_in_wal_mode_and_keeps_what_was_committed(tmp_path):
    path = tmp_path / "new" / "folder" / "notes.sqlite"
    with Notes(path, mmap_bytes=2**20) as notes:
        assert notes._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert notes._db.execute("PRAGMA mmap_size").fetchone() == (2**20,)
        with notes._db:
            notes._db.execute("INSERT INTO notes VALUES ('a', 'b')")
    with pytest.raises(sqlite3.ProgrammingError):  # closed on leaving the block
        notes._db.execute("SELECT 1")
    with Notes(path) as again:  # opened again: the schema is not recreated over the data
        assert again._db.execute("SELECT note FROM notes").fetchall() == [("b",)]


def test_the_judgment_cache_uses_it_and_the_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "caches"))
    assert cache_root() == tmp_path / "caches"
    with JudgmentCache(cache_root() / "judgments.sqlite") as cache:
        assert isinstance(cache, SQLiteCache) and cache.count() == 0
        assert cache._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
