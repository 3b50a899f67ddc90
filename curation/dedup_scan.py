"""Dedup's scan: what it keeps of each row of one shard (ids, content keys, pHash, colour thumbnail),
never the content itself, as a side table (``ROW_SCAN_SCHEMA``). Runs per shard in executor tasks
(curation.dedup)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from assay.curation import storage
from assay.curation.content_key import image_data, image_sha256, key_from_sha, text_key, text_only_keys
from assay.curation.dataset import atomic_write_parquet
from assay.curation.near_image import THUMB_BYTES, image_signature
from assay.curation.schema import ID_COLUMN, PAIRS

#: What the scan keeps of a query or corpus row: ids and hashes, never content.
ROW_SCAN_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("subset", pa.string()),
        pa.field("key_a", pa.uint64()),  # the 16-byte content key (text + image, no subset)
        pa.field("key_b", pa.uint64()),
        pa.field("text_key", pa.uint64()),  # normalised text only; 0 = no text
        pa.field("phash", pa.uint64()),  # null: no image, undecodable, or near-duplicates off
        pa.field("note", pa.string()),  # why an image was compared by path or not hashed
        pa.field("has_image", pa.bool_()),
        pa.field("thumb", pa.binary(THUMB_BYTES)),  # the 8x8 RGB colour thumbnail (with phash)
        pa.field("side", pa.int32()),  # the image's shorter side in pixels (with phash)
    ]
)
PAIR_SCAN_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("query_id", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("label", pa.string()),
    ]
)
SCAN_BATCH_ROWS = 256


def scan_shard(task: dict[str, Any]) -> pa.Table:
    """The scan side table of one shard (``task`` as built by curation.shardstage)."""
    table, src = task["table"], task["src"]
    pf = storage.parquet_file(src)
    if table == PAIRS:
        t = pf.read(columns=["query_id", "doc_id", "label"])
        return pa.table(
            {
                "row": pa.array(np.arange(t.num_rows), pa.int64()),
                "query_id": t.column("query_id").cast(pa.string()),
                "doc_id": t.column("doc_id").cast(pa.string()),
                "label": t.column("label").cast(pa.string()),
            },
            schema=PAIR_SCAN_SCHEMA,
        )
    near = bool(task["config"]["near"])
    if _no_images(pf):
        return _scan_text_only(pf.read(columns=[ID_COLUMN[table], "subset", "text"]), near)
    # Batches bound the memory a shard of large inline images takes.
    batches = pf.iter_batches(
        batch_size=SCAN_BATCH_ROWS, columns=[ID_COLUMN[table], "subset", "text", "image"]
    )
    return _scan_batches(batches, task["data_root"], near)


def _scan_batches(batches: Iterable[pa.RecordBatch], data_root: str, near: bool) -> pa.Table:
    """The row-by-row scan of batches of (id, subset, text, image)."""
    columns: list[list[Any]] = [[] for _ in ROW_SCAN_SCHEMA.names]
    # An image file shared by many rows (one picture, many questions) is read and hashed once.
    by_path: dict[str, tuple[Any, ...]] = {}
    row = 0
    for batch in batches:
        ids, subsets, texts, images = (batch.column(i).to_pylist() for i in range(4))
        for rid, subset, text, image in zip(ids, subsets, texts, images, strict=True):
            path = image.get("path") if image and image.get("bytes") is None else None
            if path is not None and path in by_path:
                sha, note, ph, has_image, thumb, side = by_path[path]
            else:
                img = image_data(image, data_root)
                sha, note = image_sha256(img)
                ph, has_image, thumb, side = None, img.source is not None, None, None
                if near and img.data is not None:
                    sig = image_signature(img.data)
                    ph, thumb, side = sig.phash, sig.thumb, sig.side
                    if sig.why:
                        note = sig.why
                if path is not None:
                    by_path[path] = (sha, note, ph, has_image, thumb, side)
            key = key_from_sha(text, sha, note)
            a, b = key.parts()
            values = (row, rid, subset, a, b, text_key(key.text), ph, note, has_image, thumb, side)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            row += 1
    return pa.Table.from_arrays(
        [pa.array(c, f.type) for c, f in zip(columns, ROW_SCAN_SCHEMA, strict=True)], schema=ROW_SCAN_SCHEMA
    )


def _no_images(pf: pq.ParquetFile) -> bool:
    """True when the Parquet statistics show every image cell of the shard empty (no read needed)."""
    meta = pf.metadata
    leaves = [
        i for i in range(meta.num_columns) if meta.schema.column(i).path in ("image.bytes", "image.path")
    ]
    if len(leaves) != 2:
        return False
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for i in leaves:
            st = group.column(i).statistics
            if st is None or not st.has_null_count or st.null_count != group.num_rows:
                return False
    return True


def _scan_text_only(t: pa.Table, near: bool) -> pa.Table:
    """The scan of rows (id, subset, text) without images: the same keys as the row-by-row path,
    vectorised."""
    n = t.num_rows
    keys, tkeys = text_only_keys(t.column("text"), with_text_key=near)
    return pa.table(
        {
            "row": pa.array(np.arange(n), pa.int64()),
            "id": t.column(0).cast(pa.string()),
            "subset": t.column("subset").cast(pa.string()),
            "key_a": pa.array(keys[:, 0], pa.uint64()),
            "key_b": pa.array(keys[:, 1], pa.uint64()),
            "text_key": pa.array(tkeys, pa.uint64()),
            "phash": pa.nulls(n, pa.uint64()),
            "note": pa.nulls(n, pa.string()),
            "has_image": pa.array(np.zeros(n, bool)),
            "thumb": pa.nulls(n, pa.binary(THUMB_BYTES)),
            "side": pa.nulls(n, pa.int32()),
        },
        schema=ROW_SCAN_SCHEMA,
    )


def eval_scan_task(task: dict[str, Any]) -> dict[str, Any]:
    """Scan one shard of an eval dataset into ``task["scan_out"]`` (an executor task)."""
    side = scan_shard(task)
    atomic_write_parquet(task["scan_out"], side)
    return {"table": task["table"], "shard": task["shard"], "rows": side.num_rows}
