"""The embedding cache: a row is encoded once per encoder, template and content.

Key of one row's vector: sha256 over (encoder ``model_id``, ``template_id``, side, instruction, the
row's exact text, the sha256 of its image bytes). ``model_id`` carries the weights' content hash, so
a checkpoint after more training misses the cache (nothing stale is reused), and the same
checkpoint re-mining a dataset encodes nothing. Content, not ids, is the key: the same text or image
under another id, in another dataset, or after dedup/filter reshuffled the shards, still hits.

One SQLite file per encoder (``<root>/<model_id>.sqlite``, vectors as float32 blobs), written one
transaction per encoded batch: a killed run keeps every batch it finished, lookups are by primary
key, and memory stays bounded by the batch, not by the corpus. Reading an image to hash it is the
cost of a hit; encoding is the cost of a miss.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curation.content_key import image_data
from mining.encoders import Encoder, Side


def row_key(
    encoder: Encoder, side: Side, row: Mapping[str, Any], data_root: str | os.PathLike | None
) -> bytes:
    """The cache key of one row's vector (see the module docstring)."""
    h = hashlib.sha256()
    for part in (encoder.model_id, encoder.template_id, side, row.get("instruction") or ""):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
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


class EmbeddingCache:
    """Vectors of one encoder, by row key. ``embed`` returns cached vectors and encodes the rest."""

    def __init__(self, root: str | os.PathLike, encoder: Encoder):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.encoder = encoder
        name = encoder.model_id.replace("/", "_").replace("@", "-")
        self.path = self.root / f"{name}.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, dim INTEGER, vec BLOB)")
        self._db.commit()
        self.hits = 0
        self.encoded = 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _lookup(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            marks = ",".join("?" for _ in chunk)
            for key, dim, blob in self._db.execute(
                f"SELECT key, dim, vec FROM vectors WHERE key IN ({marks})", chunk
            ):
                found[bytes(key)] = np.frombuffer(blob, dtype=np.float32, count=dim)
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
        found = self._lookup(keys)
        self.hits += sum(k in found for k in keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        if progress and len(rows) > len(todo):
            progress(len(rows) - len(todo))
        seen: set[bytes] = set()
        todo = [i for i in todo if not (keys[i] in seen or seen.add(keys[i]))]  # one encode per content
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            vecs = self.encoder.encode([rows[i] for i in chunk], side)
            if vecs.shape[0] != len(chunk) or not np.isfinite(vecs).all():
                raise ValueError(
                    f"encoder {self.encoder.model_id} returned bad vectors for {len(chunk)} rows"
                )
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO vectors (key, dim, vec) VALUES (?,?,?)",
                    [
                        (keys[i], vecs.shape[1], vecs[j].astype(np.float32).tobytes())
                        for j, i in enumerate(chunk)
                    ],
                )
            for j, i in enumerate(chunk):
                found[keys[i]] = vecs[j]
            self.encoded += len(chunk)
            if progress:
                progress(len(chunk))
        if not rows:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
