"""Dedup's scan rows as arrays: what the plan (curation.dedup_plan) decides from.

:class:`ScanRows` holds one content table's scan (curation.dedup_scan: ids, subsets, content keys,
pHashes, colour thumbnails, notes, and the targets of curation.dedup_targets) as numpy arrays in
dataset order; :class:`EvalRows` the rows of one table of every eval dataset, concatenated, for
decontamination. Ids stay in Arrow (compact); only the ids of removed rows become Python strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation.dedup_targets import Contradictions, empty_lists
from assay.curation.near_image import THUMB_BYTES, colour_distance, fitting_grid

__all__ = ["EvalRows", "ScanRows", "as_numpy"]


def as_numpy(col: pa.ChunkedArray | pa.Array, dtype: Any, fill: Any = 0) -> np.ndarray:
    """An Arrow column as a numpy array of ``dtype``, nulls as ``fill``."""
    return np.asarray(col.fill_null(fill).to_numpy(zero_copy_only=False), dtype=dtype)


class ScanRows:
    """One content table's scan as numpy arrays in dataset order; ids stay in Arrow (compact), and
    only the ids of removed rows ever become Python strings."""

    def __init__(self, side: pa.Table):
        self.n = n = side.num_rows
        column = lambda name, t: side.column(name) if n else pa.chunked_array([], t)  # noqa: E731
        self.ids = column("id", pa.string()).combine_chunks()
        self.shard = as_numpy(column("shard", pa.int32()), np.int32)
        self.row = as_numpy(column("row", pa.int64()), np.int64)
        subset = pc.dictionary_encode(column("subset", pa.string()).combine_chunks(), null_encoding="encode")
        self.subset = np.asarray(subset.indices.to_numpy(zero_copy_only=False), np.int64)
        self.key_a = as_numpy(column("key_a", pa.uint64()), np.uint64)
        self.key_b = as_numpy(column("key_b", pa.uint64()), np.uint64)
        self.text_key = as_numpy(column("text_key", pa.uint64()), np.uint64)
        phash = column("phash", pa.uint64())
        self.has_phash = np.asarray(phash.is_valid().to_numpy(zero_copy_only=False), bool)
        self.phash = as_numpy(phash, np.uint64)
        self.notes = column("note", pa.string()).combine_chunks()
        self.has_image = as_numpy(column("has_image", pa.bool_()), bool, False)
        thumb = column("thumb", pa.binary(THUMB_BYTES)).combine_chunks()
        if n and thumb.null_count < n:
            filled = pc.fill_null(thumb, pa.scalar(bytes(THUMB_BYTES), pa.binary(THUMB_BYTES)))
            raw = np.frombuffer(filled.buffers()[1], np.uint8)
            start = filled.offset * THUMB_BYTES
            self.thumb = raw[start : start + n * THUMB_BYTES].reshape(n, THUMB_BYTES)
        else:
            self.thumb = np.zeros((n, THUMB_BYTES), np.uint8)
        self.side = as_numpy(column("side", pa.int32()), np.int64)
        # What the pairs say each row is about (curation.dedup_targets); absent: nothing.
        has_targets = n and "t_sig" in side.column_names
        self.t_sig = as_numpy(side.column("t_sig"), np.uint64) if has_targets else np.zeros(n, np.uint64)
        empty = empty_lists(n)
        self.contradicts = Contradictions(
            side.column("t_pos") if has_targets else empty, side.column("t_neg") if has_targets else empty
        )

    def colour(self, a: np.ndarray, b: np.ndarray, other: EvalRows | None = None) -> np.ndarray:
        """The colour distance (near_image.colour_distance) of rows a and rows b (of ``other``)."""
        o = other or self
        return colour_distance(self.thumb[a], o.thumb[b], self.side[a], o.side[b])

    def same_picture(self) -> list[np.ndarray]:
        """Columns equal for rows whose thumbnails (at the grid that fits) are equal: with an equal
        group and pHash, such rows are near duplicates of each other without a comparison."""
        words = self.thumb.view(np.uint64).reshape(self.n, THUMB_BYTES // 8)
        return [words[:, k] for k in range(words.shape[1])] + [fitting_grid(self.side)]

    def id(self, i: int) -> str:
        return self.ids[int(i)].as_py()

    def note_stats(self) -> dict[str, Any]:
        noted = np.flatnonzero(np.asarray(self.notes.is_valid().to_numpy(zero_copy_only=False), bool))
        unreadable = int(pc.sum(pc.starts_with(self.notes, "unreadable")).as_py() or 0)
        return {
            "images_hashed": int(self.has_phash.sum()),
            "images_unreadable": unreadable,
            "images_not_phashed": len(noted) - unreadable,
            "notes": [f"{self.id(i)!r}: {self.notes[int(i)].as_py()}" for i in noted[:5]],
        }


class EvalRows:
    """The rows of one table of every ``against`` dataset, concatenated in the order given."""

    def __init__(self, parts: list[tuple[str, pa.Table]]):
        rows = [(name, ScanRows(side)) for name, side in parts]
        self.names = [name for name, _ in rows]
        self.starts = np.cumsum([0] + [r.n for _, r in rows])
        self.n = int(self.starts[-1])
        self.ids = pa.concat_arrays([r.ids for _, r in rows]) if rows else pa.array([], pa.string())

        def cat(attr: str, dtype: Any) -> np.ndarray:
            return np.concatenate([getattr(r, attr) for _, r in rows]) if rows else np.zeros(0, dtype)

        self.key_a, self.key_b = cat("key_a", np.uint64), cat("key_b", np.uint64)
        self.text_key, self.phash = cat("text_key", np.uint64), cat("phash", np.uint64)
        self.has_phash = cat("has_phash", bool)
        self.side = cat("side", np.int64)
        self.thumb = (
            np.concatenate([r.thumb for _, r in rows]) if rows else np.zeros((0, THUMB_BYTES), np.uint8)
        )

    def describe(self, i: int, table: str) -> str:
        name = self.names[int(np.searchsorted(self.starts, i, side="right")) - 1]
        return f"{table} row {self.ids[int(i)].as_py()!r} of eval dataset {name}"
