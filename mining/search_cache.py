"""Search results by content: mining again with the same vectors searches nothing.

A kNN search is a function of its inputs alone: the query vectors, the corpus vectors in order, the
method and its parameters. The cache keys a result on exactly those (blake2b over a format version,
the parameters, and the bytes and shapes of the query matrix and of every corpus block with its
offset), so a hit is the result the search would return, bit for bit, and any change (one vector, a
row moved, another checkpoint, another method) is a miss. Re-mining a dataset with the checkpoint it
was mined with (new rules, a new margin, a resumed loop) then costs the embedding-cache reads and the
selection, not the search: on 10,000 x 10,000 vectors of 384 dimensions the search is about half of
a cached run (docs/BENCHMARKS.md, issue 19).

Depth. An entry holds the deepest search made for its key. Exact search (``exact``, ``torch``) is
exact under a total order (score desc, id asc; see ``mining.knn``), so the first k columns of a
deeper result are the depth-k result, ids, order and scores: a lookup at any depth up to the stored
one hits. An approximate search (``ivf``, ``hnsw``) hits only at the depth it was made with (HNSW's
beam widens with k).

Storage: one Parquet file per key, ``<root>/<key>.parquet`` (``ids`` and ``scores`` as fixed-size
lists, one row per query; depth, method, rows searched and backend in the schema's metadata),
written whole under a temporary name (``curation.dataset.atomic_write_parquet``: a killed run leaves
no half file), on local disk or object storage alike. Its size is ``12 x queries x depth`` bytes (6
MB for 10,000 queries at depth 49), next to the ``4 x rows x dim`` of the vectors in the embedding
cache. A file that cannot be read as an entry (truncated by hand, another version) is a miss, and
is replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from assay.curation import storage
from assay.curation.dataset import atomic_write_parquet
from assay.mining.knn import KnnResult, search

FORMAT = "assay-search-cache-v1"
#: Methods whose depth-k result is the prefix of any deeper one (see the module docstring).
PREFIX_METHODS = {"exact", "torch"}
#: Corpus blocks up to this many bytes in all are kept from the hashing pass for a search that
#: misses; beyond it the search reads them again (``blocks``).
HOLD_BYTES = 256 * 2**20

__all__ = ["SearchCache", "cached_search"]


def _hasher(queries: np.ndarray, params: dict[str, Any]) -> Any:
    """A key's hash with the format, the parameters and the queries in it; the blocks follow."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([FORMAT, params], sort_keys=True, default=str).encode())
    _add(h, -1, queries)
    return h


def _add(h: Any, offset: int, x: np.ndarray) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    h.update(np.asarray([offset, *x.shape], np.int64).tobytes())
    h.update(memoryview(x).cast("B"))


class SearchCache:
    """Search results under ``root`` (a folder or a URI), by key (see the module docstring)."""

    def __init__(self, root: str | Any):
        self.root = root

    def _path(self, key: str) -> str:
        return storage.join(self.root, f"{key}.parquet")

    def get(self, key: str, k: int) -> KnnResult | None:
        """The stored result's first ``k`` columns, or None (no entry, too shallow, unreadable)."""
        path = self._path(key)
        if not storage.is_file(path):
            return None
        try:
            table = storage.read_table(path)
            meta = {m.decode(): v.decode() for m, v in (table.schema.metadata or {}).items()}
            depth, method = int(meta["depth"]), meta["method"]
            ids = table.column("ids").combine_chunks().flatten().to_numpy().reshape(-1, depth)
            scores = table.column("scores").combine_chunks().flatten().to_numpy().reshape(-1, depth)
        except (OSError, KeyError, ValueError, pa.ArrowException):
            return None
        exact = set(method.split("+")) <= PREFIX_METHODS
        if depth < k or (depth != k and not exact):
            return None
        return KnnResult(
            np.ascontiguousarray(scores[:, :k], dtype=np.float32),
            np.ascontiguousarray(ids[:, :k], dtype=np.int64),
            method,
            int(meta["searched"]),
            meta.get("backend", ""),
        )

    def put(self, key: str, result: KnnResult) -> None:
        depth = result.ids.shape[1]
        table = pa.table(
            {
                "ids": pa.FixedSizeListArray.from_arrays(pa.array(result.ids.reshape(-1)), depth),
                "scores": pa.FixedSizeListArray.from_arrays(pa.array(result.scores.reshape(-1)), depth),
            }
        )
        meta = {
            "depth": str(depth),
            "method": result.method,
            "searched": str(result.searched),
            "backend": result.backend,
            "format": FORMAT,
        }
        atomic_write_parquet(self._path(key), table.replace_schema_metadata(meta))


def cached_search(
    cache: SearchCache | None,
    queries: np.ndarray,
    blocks: Callable[[bool], Iterable[tuple[int, np.ndarray]]],
    k: int,
    *,
    lookup: bool = True,
    **params: Any,
) -> tuple[KnnResult, bool]:
    """``knn.search(queries, blocks(True), k, **params)``, from ``cache`` when it holds the result.

    ``blocks(first)`` yields the corpus blocks; ``first`` is True for the one pass that must see
    every block (the caller records what it needs from it). With a cache, that pass hashes the
    blocks for the key; on a miss the search runs on the blocks kept from it (up to ``HOLD_BYTES``)
    or on a second pass, ``blocks(False)``, and its result is stored. ``lookup=False`` (the caller
    knows it cannot hit: its queries were just encoded) searches the first pass as it is hashed and
    stores the result: one pass, whatever the corpus size. Without a cache, the search reads the
    first pass. Returns the result and whether it came from the cache."""
    if cache is None:
        return search(queries, blocks(True), k, **params), False
    h = _hasher(queries, params)
    held: list[tuple[int, np.ndarray]] | None = [] if lookup else None
    seen = 0

    def hashed() -> Iterator[tuple[int, np.ndarray]]:
        nonlocal held, seen
        for offset, x in blocks(True):
            _add(h, offset, x)
            seen += x.nbytes
            if held is not None and seen <= HOLD_BYTES:
                held.append((offset, x))
            else:
                held = None
            yield offset, x

    if not lookup:
        result = search(queries, hashed(), k, **params)  # search() reads every block: h is whole
        cache.put(h.hexdigest(), result)
        return result, False
    for _ in hashed():
        pass
    key = h.hexdigest()
    hit = cache.get(key, k)
    if hit is not None:
        return hit, True
    result = search(queries, held if held is not None else blocks(False), k, **params)
    cache.put(key, result)
    return result, False
