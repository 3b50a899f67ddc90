"""The embedding cache: a row is encoded once per encoder, template and content.

Key of one row's vector: sha256 over (encoder ``model_id``, ``template_id``, side, instruction, the
row's exact text, the sha256 of its image bytes). ``model_id`` carries the weights' content hash, so
a checkpoint after more training misses the cache (nothing stale is reused), and the same
checkpoint re-mining a dataset encodes nothing. Content, not ids, is the key: the same text or image
under another id, in another dataset, or after dedup/filter reshuffled the shards, still hits.

One SQLite file per encoder (``<root>/<model_id>.sqlite``, vectors as float32 blobs; opened by
``curation.sqlite_cache``), written one transaction per encoded batch: a killed run keeps every
batch it finished, lookups are by primary key, and memory stays bounded by the batch, not by the
corpus. Reading an image to hash it is the cost of a hit; encoding is the cost of a miss.

A root that is a URI (``s3://bucket/run/cache/embeddings``: a run on several nodes, which share no
disk) holds one folder of Parquet segments per encoder instead (``<root>/<model_id>/seg-*.parquet``,
``curation.segment_cache``: columns ``key`` and ``vector``, binary), one segment per encoded batch,
so any number of nodes add to it side by side and a killed run keeps every batch it finished, as
with SQLite. A process reads the segments once, when it first looks a key up.

``embed_table`` takes the rows as an Arrow table: keys are hashed from its columns, vectors are read
with one query per 500 keys into one array, and row dicts are built only for the rows to encode, so
a fully cached subset costs a hash and a primary-key lookup per row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.content_key import image_data
from assay.curation.schema import resolve_image_cell
from assay.curation.segment_cache import SegmentCache
from assay.curation.sqlite_cache import SQLiteCache
from assay.mining.encoders import Encoder, Side

MMAP_BYTES = 2**30  # of the SQLite file read through a memory map (virtual memory, not RAM)
#: A cache on object storage: one segment per encoded batch (``curation.segment_cache``).
SEGMENT_SCHEMA = pa.schema([("key", pa.binary()), ("vector", pa.binary())])


def _key_prefix(encoder: Encoder, side: Side) -> Any:
    h = hashlib.sha256()
    for part in (encoder.model_id, encoder.template_id, side):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h


def row_key(
    encoder: Encoder, side: Side, row: Mapping[str, Any], data_root: str | os.PathLike | None
) -> bytes:
    """The cache key of one row's vector (see the module docstring)."""
    h = _key_prefix(encoder, side)
    h.update((row.get("instruction") or "").encode("utf-8", "surrogatepass") + b"\0")
    text = row.get("text")
    h.update(b"t" + text.encode("utf-8", "surrogatepass") if text is not None else b"-")
    h.update(b"\0")
    image = row.get("image")
    if image is not None:
        if hasattr(image, "tobytes"):  # a PIL image
            raw = f"{image.mode}{image.size}".encode() + image.tobytes()
        else:
            cell = image if isinstance(image, Mapping) else {"bytes": image, "path": None}
            data = image_data(cell, data_root)
            if data.data is None:
                raise ValueError(f"image {data.path!r} cannot be read: {data.error}")
            raw = data.data
        h.update(b"i" + hashlib.sha256(raw).digest())
    return h.digest()[:20]


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def table_rows(
    table: pa.Table, data_root: str | os.PathLike | None, indices: Sequence[int] | None = None
) -> list[dict]:
    """Rows of ``table`` (all, or those at ``indices``) as dicts, image paths resolved under the data root."""
    rows = (table if indices is None else table.take(pa.array(indices, pa.int64()))).to_pylist()
    if data_root is not None:
        for r in rows:
            if r.get("image") is not None:
                r["image"] = resolve_image_cell(r["image"], data_root)
    return rows


def table_keys(
    encoder: Encoder, side: Side, table: pa.Table, data_root: str | os.PathLike | None
) -> list[bytes]:
    """:func:`row_key` of every row of ``table`` (columns ``text`` and, if present, ``instruction`` and
    ``image``): the same keys, hashed from the columns; only rows with an image become dicts."""
    prefix = _key_prefix(encoder, side)
    instructions, texts = _column(table, "instruction"), _column(table, "text")
    with_image: set[int] = set()
    if "image" in table.column_names and table.column("image").null_count < table.num_rows:
        with_image = set(pc.indices_nonzero(pc.is_valid(table.column("image"))).to_pylist())
    keys: list[bytes] = []
    for i, (instruction, text) in enumerate(zip(instructions, texts, strict=True)):
        if i in with_image:
            # the row as stored: row_key resolves its image path under the data root (a URI too)
            (row,) = table_rows(table, None, [i])
            if data_root is not None:
                resolve_image_cell(row["image"], data_root)  # refuses a path that leaves the root
            keys.append(row_key(encoder, side, row, data_root))
            continue
        h = prefix.copy()  # sha256 of the concatenation = row_key's successive updates
        tail = b"t" + text.encode("utf-8", "surrogatepass") + b"\0" if text is not None else b"-\0"
        h.update((instruction or "").encode("utf-8", "surrogatepass") + b"\0" + tail)
        keys.append(h.digest()[:20])
    return keys


class EmbeddingCache(SQLiteCache):
    """Vectors of one encoder, by row key. ``embed`` returns cached vectors and encodes the rest."""

    def __init__(self, root: str | os.PathLike, encoder: Encoder):
        self.encoder = encoder
        # a file or object name: no "/", and no "#" (a URL fragment to fsspec) from a fast mode's id
        name = encoder.model_id.replace("/", "_").replace("@", "-").replace("#", "+")
        self._segments: SegmentCache | None = None
        if storage.is_remote(root):  # several nodes, no shared disk: Parquet segments, not SQLite
            self.root = storage.path(root)
            self.path = self.root / name
            self._segments = SegmentCache(self.path, SEGMENT_SCHEMA)
        else:
            self.root = Path(root)
            super().__init__(
                self.root / f"{name}.sqlite",
                "CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, dim INTEGER, vec BLOB)",
                mmap_bytes=MMAP_BYTES,  # reads without a copy per page: hits cost half
            )
        self.hits = 0
        self.encoded = 0

    def close(self) -> None:
        if self._segments is not None:
            self._segments.close()
        else:
            super().close()

    def _store(self, blobs: list[tuple[bytes, int, bytes]]) -> None:
        """Keep one encoded batch's (key, dim, vector) rows, all or none."""
        if self._segments is not None:
            self._segments.put([{"key": k, "vector": v} for k, _, v in blobs])
            return
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors (key, dim, vec) VALUES (?,?,?)", blobs)

    def _lookup(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        if self._segments is not None:
            got = ((k, self._segments.get(k)) for k in keys)
            return {k: row["vector"] for k, row in got if row is not None}
        found: dict[bytes, bytes] = {}
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            marks = ",".join("?" for _ in chunk)
            found.update(
                self._db.execute(f"SELECT key, vec FROM vectors WHERE key IN ({marks})", chunk).fetchall()
            )
        return found

    def embed(
        self,
        rows: Sequence[Mapping[str, Any]],
        side: Side,
        *,
        data_root: str | os.PathLike | None = None,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """(len(rows), dim) float32 vectors, in order; only rows not in the cache are encoded."""
        keys = [row_key(self.encoder, side, r, data_root) for r in rows]
        return self._embed(keys, lambda idx: [rows[i] for i in idx], side, batch_size, progress)

    def embed_table(
        self,
        table: pa.Table,
        side: Side,
        *,
        data_root: str | os.PathLike | None = None,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """:meth:`embed` of the rows of an Arrow table (image paths resolved under ``data_root``)."""
        keys = table_keys(self.encoder, side, table, data_root)
        return self._embed(keys, lambda idx: table_rows(table, data_root, idx), side, batch_size, progress)

    def _embed(
        self,
        keys: Sequence[bytes],
        rows_at: Callable[[list[int]], list[Mapping[str, Any]]],
        side: Side,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> np.ndarray:
        found = self._lookup(keys)
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)  # one encode per content
        hits = sum(k in found for k in keys)
        self.hits += hits
        if progress and hits:
            progress(hits)
        # Fixed batches of the distinct contents, in table order, each committed whole: a resumed
        # run encodes exactly the batches an uninterrupted one would. (A row's vector can depend on
        # the other rows of its batch, through padding, by float rounding: re-batching only the rows
        # still missing gave a killed-and-resumed mine different near-tie negatives.) A batch that
        # is partly cached (contents shared with another table) is encoded whole, and only its
        # missing vectors are added.
        distinct = list(first)
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start : start + batch_size]
            missing = {k for k in batch if k not in found}
            if not missing:
                continue
            vecs = self.encoder.encode(rows_at([first[k] for k in batch]), side)
            if vecs.shape[0] != len(batch) or not np.isfinite(vecs).all():
                raise ValueError(
                    f"encoder {self.encoder.model_id} returned bad vectors for {len(batch)} rows"
                )
            blobs = [
                (k, vecs.shape[1], vecs[j].astype(np.float32).tobytes())
                for j, k in enumerate(batch)
                if k in missing
            ]
            self._store(blobs)
            found.update((key, blob) for key, _, blob in blobs)
            self.encoded += len(blobs)
            if progress:
                progress(len(blobs))
        if not keys:
            return np.zeros((0, self.encoder.dim), np.float32)
        ordered = [found[k] for k in keys]
        sizes = set(map(len, ordered))
        dim = self.encoder.dim or min(sizes) // 4  # an encoder may not know its dimension
        if sizes != {4 * dim}:
            raise ValueError(
                f"{storage.display(self.path)}: cached vectors of {sorted(s // 4 for s in sizes)} "
                f"dimensions, the encoder's are {dim}; delete it to rebuild the cache"
            )
        # one copy: the blobs joined, read as one (n, dim) array
        return np.frombuffer(b"".join(ordered), dtype=np.float32).reshape(len(keys), dim).copy()
