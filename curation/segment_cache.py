"""A cache on object storage: immutable Parquet segments, one per written batch, under one prefix.

A SQLite file cannot be shared over a network, and an object store cannot append to an object. So a
cache whose location is a URI (``s3://bucket/run/cache/judgments``) is a folder of segments: every
batch a writer stores becomes its own object ``seg-<random>.parquet``, put whole, never changed. Any
number of processes on any number of nodes write side by side (no segment is ever written twice),
a killed writer loses at most the batch it was putting, and a reader loads the keys of every segment
there (in one listing and one read per segment) and sees every batch that was finished before it
opened. A key stored twice keeps the later segment's value (segments are read in the order they
were written: the name starts with the time).

The judgment cache (``curation.judge.cache``) and the embedding cache (``mining.embed_cache``) use it
for URIs; local paths keep SQLite, which is faster for lookups of a few keys in a large cache.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pyarrow as pa

from assay.curation import storage
from assay.curation.dataset import atomic_write_parquet

SEGMENT_PREFIX = "seg-"


class SegmentCache:
    """Rows of ``schema`` (whose first column is the key, of any type) in segments under ``root``."""

    def __init__(self, root: str | os.PathLike, schema: pa.Schema):
        self.root = storage.path(root)
        self.schema = schema
        self.key = schema.names[0]
        self._rows: dict[object, dict[str, object]] | None = None

    def segments(self) -> list[str]:
        return [
            n for n in storage.names(self.root) if n.startswith(SEGMENT_PREFIX) and n.endswith(".parquet")
        ]

    def _load(self) -> dict[object, dict[str, object]]:
        if self._rows is None:
            self._rows = {}
            for name in self.segments():
                for row in storage.read_table(self.root / name).to_pylist():
                    self._rows[row[self.key]] = row
        return self._rows

    def get(self, key: object) -> dict[str, object] | None:
        return self._load().get(key)

    def items(self) -> Iterator[tuple[object, dict[str, object]]]:
        return iter(self._load().items())

    def put(self, rows: list[dict[str, object]]) -> None:
        """Store one batch as a new segment (all of it, or none of it)."""
        if not rows:
            return
        name = f"{SEGMENT_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        atomic_write_parquet(self.root / name, pa.Table.from_pylist(rows, schema=self.schema))
        if self._rows is not None:
            for row in rows:
                self._rows[row[self.key]] = row

    def close(self) -> None:
        self._rows = None
