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
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assay.curation.judge.scoring import JudgeItem, Score
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
    """Cached judgments of one judge (``model_id``) under one prompt id at a time (see module docs)."""

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
