"""The judgment cache: a judged pair is never judged again by the same judge under the same prompt.

Key: ``(model_id, prompt_id, query_id, doc_id)`` (DESIGN.md). ``model_id`` carries the judge's
weights hash and ``prompt_id`` the template version, so a new checkpoint or an edited prompt misses the
cache. Each entry also stores ``content`` (a hash of the rendered prompt and the images' identities):
ids can be given by users, and the same ids in another dataset may name other content, in which case
the entry is stale and the pair is judged afresh.

SQLite in WAL mode (``curation.sqlite_cache``), one transaction per batch of results: a run killed
at any moment keeps every batch it finished and loses none it did not, so a rerun judges exactly the
pairs still missing.
Failed judgments are stored too (with their error) so a run can report them; ``lookup`` treats them
as misses, so the next run tries them again.

A cache whose location is a URI (``s3://bucket/cache/judgments``) is no SQLite file (none can be
shared over a network) but a folder of immutable Parquet segments (``curation.segment_cache``), one
folder per judge model and one segment per stored batch: ``JudgmentCache(uri)`` gives a
:class:`SegmentJudgmentCache`, with the same ``lookup`` and ``store``. Any process on any node can
write it; a batch lands whole or not at all, as in SQLite, so a rerun judges only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from assay.curation import storage
from assay.curation.judge.scoring import JudgeItem, Score
from assay.curation.segment_cache import SegmentCache
from assay.curation.sqlite_cache import SQLiteCache, cache_root

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    model_id TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    query_id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    content TEXT NOT NULL,
    margin REAL,
    error TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (model_id, prompt_id, query_id, doc_id)
)
"""


def default_cache_path() -> Path:
    """``$ASSAY_CACHE_DIR/judgments.sqlite``, else ``~/.cache/assay/judgments.sqlite``."""
    return cache_root() / "judgments.sqlite"


def _image_identity(value: Any) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return b"b:" + hashlib.sha1(value["bytes"]).digest()
        return b"p:" + str(value.get("path")).encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray)):
        return b"b:" + hashlib.sha1(value).digest()
    if isinstance(value, (str, os.PathLike)):
        return b"p:" + os.fspath(value).encode("utf-8", "surrogatepass")
    return (
        b"o:" + hashlib.sha1(value.tobytes()).digest() if hasattr(value, "tobytes") else repr(value).encode()
    )


def content_hash(item: JudgeItem) -> str:
    """What was shown to the judge: the rendered parts, the labels, each image's bytes hash or path."""
    h = hashlib.sha1()
    for p in item.parts:
        h.update(p["type"].encode() + b"\0" + p.get("text", "").encode("utf-8", "surrogatepass") + b"\0")
    h.update("\0".join(item.labels).encode() + b"\1")
    for img in item.images:
        h.update(_image_identity(img) + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Key:
    query_id: str
    doc_id: str
    content: str


class JudgmentCache(SQLiteCache):
    """Cached judgments of one judge (``model_id``) under one prompt id at a time (see module docs).
    A URI gives a :class:`SegmentJudgmentCache` (segments on object storage), a path SQLite."""

    def __new__(cls, path: str | os.PathLike) -> JudgmentCache:
        if cls is JudgmentCache and storage.is_remote(path):
            return object.__new__(SegmentJudgmentCache)
        return object.__new__(cls)

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, _SCHEMA)

    def lookup(
        self, model_id: str, prompt_id: str, keys: Sequence[Key], *, failures: bool = False
    ) -> dict[Key, Score]:
        """The current (same content) judgments among ``keys``: successes, and failures if asked."""
        found: dict[Key, Score] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            by_ids = {(k.query_id, k.doc_id): k for k in chunk}
            marks = ",".join("(?,?)" for _ in chunk)
            rows = self._db.execute(
                "SELECT query_id, doc_id, content, margin, error FROM judgments WHERE model_id=? AND "
                f"prompt_id=? AND (query_id, doc_id) IN (VALUES {marks})",
                [model_id, prompt_id, *(v for k in chunk for v in (k.query_id, k.doc_id))],
            ).fetchall()
            for qid, did, content, margin, error in rows:
                key = by_ids[(qid, did)]
                score = Score(margin=margin, error=error)
                if content == key.content and (score.ok or failures):
                    found[key] = score
        return found

    def store(self, model_id: str, prompt_id: str, results: Iterable[tuple[Key, Score]]) -> None:
        """Write one batch of results in one transaction (all of it lands, or none of it)."""
        now = time.time()
        rows = [
            (model_id, prompt_id, k.query_id, k.doc_id, k.content, s.margin, s.error, now) for k, s in results
        ]
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO judgments (model_id, prompt_id, query_id, doc_id, content, margin, "
                "error, created) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )

    def count(self, model_id: str | None = None) -> int:
        if model_id is None:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM judgments WHERE model_id=?", [model_id]).fetchone()[0]


#: A judgment as one row of a segment; ``key`` is (prompt id, query id, doc id) within a model's folder.
SEGMENT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("prompt_id", pa.string()),
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("content", pa.string()),
        ("margin", pa.float64()),
        ("error", pa.string()),
        ("created", pa.float64()),
    ]
)


def _segment_key(prompt_id: str, query_id: str, doc_id: str) -> str:
    return json.dumps([prompt_id, query_id, doc_id])


def model_folder(model_id: str) -> str:
    """The folder of one judge model's segments: its id made safe for any store, and a hash of it
    (two ids that read alike once made safe keep folders of their own)."""
    safe = re.sub(r"[^A-Za-z0-9._@=-]+", "_", model_id)[:80]
    return f"{safe}-{hashlib.sha1(model_id.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


class SegmentJudgmentCache(JudgmentCache):
    """The judgment cache on object storage: ``<location>/<model folder>/seg-*.parquet``, written
    one segment per stored batch (``curation.segment_cache.SegmentCache``); see the module docs."""

    def __init__(self, path: str | os.PathLike):
        self.path = storage.path(path)
        self._segments: dict[str, SegmentCache] = {}

    def _model(self, model_id: str) -> SegmentCache:
        if model_id not in self._segments:
            self._segments[model_id] = SegmentCache(self.path / model_folder(model_id), SEGMENT_SCHEMA)
        return self._segments[model_id]

    def lookup(
        self, model_id: str, prompt_id: str, keys: Sequence[Key], *, failures: bool = False
    ) -> dict[Key, Score]:
        segments = self._model(model_id)
        found: dict[Key, Score] = {}
        for key in keys:
            row = segments.get(_segment_key(prompt_id, key.query_id, key.doc_id))
            if row is None or row["content"] != key.content:
                continue
            score = Score(margin=row["margin"], error=row["error"])
            if score.ok or failures:
                found[key] = score
        return found

    def store(self, model_id: str, prompt_id: str, results: Iterable[tuple[Key, Score]]) -> None:
        """Write one batch of results as one segment (all of it lands, or none of it)."""
        now = time.time()
        rows = [
            {
                "key": _segment_key(prompt_id, k.query_id, k.doc_id),
                "prompt_id": prompt_id,
                "query_id": k.query_id,
                "doc_id": k.doc_id,
                "content": k.content,
                "margin": s.margin,
                "error": s.error,
                "created": now,
            }
            for k, s in results
        ]
        self._model(model_id).put(rows)

    def count(self, model_id: str | None = None) -> int:
        if model_id is not None:
            return sum(1 for _ in self._model(model_id).items())
        folders = (SegmentCache(self.path / name, SEGMENT_SCHEMA) for name in storage.names(self.path))
        return sum(sum(1 for _ in folder.items()) for folder in folders)

    def close(self) -> None:
        for segments in self._segments.values():
            segments.close()
        self._segments = {}
