"""Documents beyond the dataset's own to mine against: ``mine_dataset(..., corpus=[POOL, ...])``.

Labelled pairs are few (say 100k) and the documents to mine negatives from are many (millions), as
with sentence-transformers' ``mine_hard_negatives(..., corpus=...)``. A pool is any assay dataset;
only its corpus table is read (queries and pairs, empty or not, are not). Its documents join the
mining pool of the subset they name. The rules:

- Subsets: a pool document whose subset DATASET has no queries in is ignored and counted
  (``ignored``, per subset); one of a subset DATASET has but the run does not mine (``subsets=``)
  is left out and counted (``not_mined``).
- Ids: a doc id names one document across DATASET and every pool. A pool row whose id is already
  used (by DATASET's corpus, an earlier pool, or earlier in the same pool) with the same subset,
  instruction, text and image bytes is the same document: it is searched once, as its first copy
  (``same_doc``: the common case of a pool that also holds the labelled documents, and of a later
  round whose input already holds the documents an earlier round copied). The same id with other
  content is an error that names both rows and the id: pairs refer to documents by id, so two
  documents cannot share one, and renaming one behind the user's back would break the id they know
  it by. Ids are checked only for the pool rows that take part (mined subsets).
- A pool document with a gold positive's content under another id is never that query's negative,
  as in DATASET's own corpus; other content duplicates are ordinary documents.
- The output stays self-contained: every pool document its pairs refer to (the mined negatives, and
  a gold positive DATASET's corpus lacks) is copied into its corpus, in shards after DATASET's
  linked ones. The rest of the pool is not: a pool of millions is not copied into every round's
  output; the next round passes the pool again, and the documents copied earlier then meet their
  pool copies as the same document. Image paths are relative to a pool's own data root, so copied
  rows carry their image bytes inline (path dropped) unless the pool shares the output's data root.

Nothing loads a pool at once: one pass reads its ``doc_id`` and ``subset`` columns shard by shard to
count and to find ids used twice (64-bit hashes of the ids are held, then the few rows they point
to are compared), each subset's mining streams the pool's shards through the embedding cache and
the kNN search as it does DATASET's corpus, and the copy reads back only the shards holding a
picked document.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.content_key import image_data
from assay.curation.dataset import Dataset, ShardSink, shard_name
from assay.curation.schema import CORPUS, IMAGE_TYPE, ROW_COLUMNS

# Documents copied from pools go to the output in shards of at most these (a shard goes over by at
# most the picks of one pool shard).
COPY_SHARD_ROWS = 50_000
COPY_SHARD_BYTES = 64 * 2**20
IDENTITY = ("subset", "instruction", "text", "image")


class PoolError(ValueError):
    """A corpus pool that cannot be mined against as given."""


@dataclass
class CorpusSource:
    """DATASET's corpus (``is_pool`` False) or one pool's, and what the id check decided for it."""

    dataset: Dataset
    is_pool: bool
    dropped: dict[str, np.ndarray] = field(default_factory=dict)  # shard -> rows that repeat a document
    shard_subsets: dict[str, set[str]] = field(default_factory=dict)  # pools: the subsets of each shard
    documents: int = 0
    same_doc: int = 0
    not_mined: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    negatives: int = 0
    added: int = 0
    picked: pa.Array | None = None  # ids of the documents copied into the output

    def where(self, name: str, row: int) -> str:
        return f"{storage.display(self.dataset.root / CORPUS / name)} row {row}"

    def summary(self) -> dict[str, Any]:
        ref = self.dataset.parent_ref()
        return {
            "path": ref["path"],
            "manifest_sha256": ref["manifest_sha256"],
            "documents": self.documents,
            "searched": self.documents
            - self.same_doc
            - sum(self.not_mined.values())
            - sum(self.ignored.values()),
            "same_doc": self.same_doc,
            "not_mined": dict(sorted(self.not_mined.items())),
            "ignored": dict(sorted(self.ignored.items())),
            "negatives": self.negatives,
            "added": self.added,
        }


class MiningCorpus:
    """The documents one mining run searches: DATASET's corpus, then each pool's, in order.

    ``subsets``: DATASET's subsets (those with queries); ``chosen``: the ones mined. Building it runs
    the id check (see the module docstring) and raises ``PoolError`` on an id naming two documents.
    """

    def __init__(
        self, dataset: Dataset, pools: Sequence[Dataset], *, subsets: Sequence[str], chosen: Sequence[str]
    ):
        self.sources = [CorpusSource(dataset, False)] + [CorpusSource(p, True) for p in pools]
        self.subsets, self.chosen = set(subsets), set(chosen)
        if pools:
            self._check_ids()

    @property
    def pools(self) -> list[CorpusSource]:
        return self.sources[1:]

    def refs(self) -> list[dict[str, Any]]:
        """How the run's config names the pools: path and manifest hash (another pool, another run)."""
        return [p.dataset.parent_ref() for p in self.pools]

    def subset_shards(self, subset: str) -> Iterator[tuple[int, CorpusSource, pa.Table]]:
        """(source index, source, rows) of every corpus shard holding documents of ``subset``: the
        rows of the subset, less the pool rows that repeat a document searched already."""
        for s, src in enumerate(self.sources):
            for name in src.dataset.shards(CORPUS):
                if src.is_pool and subset not in src.shard_subsets.get(name, ()):
                    continue
                t = self._rows(src, name, columns=ROW_COLUMNS[CORPUS])
                t = t.filter(pc.equal(pc.fill_null(t["subset"], ""), subset))
                if t.num_rows:
                    yield s, src, t

    def _rows(self, src: CorpusSource, name: str, columns: list[str]) -> pa.Table:
        t = src.dataset.read_shard(CORPUS, name, columns=columns)
        drop = src.dropped.get(name)
        if drop is None:
            return t
        keep = np.ones(t.num_rows, dtype=bool)
        keep[drop] = False
        return t.filter(pa.array(keep))

    # -- the id check ------------------------------------------------------------------------------

    def _check_ids(self) -> None:
        """Count the pools' documents per subset, and settle every doc id used more than once with a
        pool row among its users: the same document (the later pool rows are dropped) or an error."""
        import polars as pl

        hashes, src_idx, shard_idx, rows = [], [], [], []
        names: list[list[str]] = []
        for s, src in enumerate(self.sources):
            names.append(src.dataset.shards(CORPUS))
            for k, name in enumerate(names[-1]):
                t = src.dataset.read_shard(CORPUS, name, columns=["doc_id", "subset"])
                at = np.arange(t.num_rows, dtype=np.int32)
                if src.is_pool:
                    at = self._count(src, name, t)
                    t = t.take(pa.array(at))
                hashes.append(pl.from_arrow(t["doc_id"]).hash(seed=0).to_numpy())
                src_idx.append(np.full(t.num_rows, s, np.int16))
                shard_idx.append(np.full(t.num_rows, k, np.int32))
                rows.append(at)
        if not hashes:
            return
        ids = pl.DataFrame(
            {
                "h": np.concatenate(hashes),
                "s": np.concatenate(src_idx),
                "k": np.concatenate(shard_idx),
                "r": np.concatenate(rows),
            }
        )
        del hashes, src_idx, shard_idx, rows
        repeated = (
            ids.filter(pl.col("h").is_duplicated())
            .filter(pl.col("s").max().over("h") > 0)  # DATASET's own repeats are validate's business
            .sort(["s", "k", "r"])
        )
        first: dict[str, tuple[tuple[bytes, ...], str]] = {}
        for (s, k), group in repeated.group_by(["s", "k"], maintain_order=True):
            src, name = self.sources[s], names[s][k]
            at = group["r"].to_numpy()
            t = src.dataset.read_shard(CORPUS, name, columns=ROW_COLUMNS[CORPUS]).take(pa.array(at))
            dropped = []
            for r, row in zip(at.tolist(), t.to_pylist(), strict=True):
                ident = _identity(row, src.dataset.data_root)
                seen = first.setdefault(row["doc_id"], (ident, src.where(name, r)))
                if seen[1] == src.where(name, r) or not src.is_pool:
                    continue
                if ident != seen[0]:
                    differ = [f for f, a, b in zip(IDENTITY, ident, seen[0], strict=True) if a != b]
                    raise PoolError(
                        f"doc_id {row['doc_id']!r} names two different documents ({', '.join(differ)} "
                        f"differ): {seen[1]} and {src.where(name, r)}. A doc id must name one document "
                        "across the dataset and its corpus pools: give one of them another id, or leave "
                        "it out of the pool"
                    )
                dropped.append(r)
            if dropped:
                src.dropped[name] = np.asarray(dropped, dtype=np.int64)
                src.same_doc += len(dropped)

    def _count(self, src: CorpusSource, name: str, t: pa.Table) -> np.ndarray:
        """Count a pool shard's rows per subset (mined, not mined, ignored); the rows that take part."""
        path = storage.display(src.dataset.root / CORPUS / name)
        if t["doc_id"].null_count:
            row = pc.indices_nonzero(pc.is_null(t["doc_id"]))[0].as_py()
            raise PoolError(
                f"{path} row {row}: doc_id is missing; a pool's documents need ids "
                "(run `assay validate` on the pool)"
            )
        subset = pc.fill_null(t["subset"], "")
        src.documents += t.num_rows
        src.shard_subsets[name] = set()
        for item in pc.value_counts(subset).to_pylist():
            value, n = item["values"], item["counts"]
            if value in self.chosen:
                src.shard_subsets[name].add(value)
            else:
                tally = src.not_mined if value in self.subsets else src.ignored
                tally[value] = tally.get(value, 0) + n
        in_run = pc.is_in(subset, value_set=pa.array(sorted(self.chosen), pa.string()))
        return pc.indices_nonzero(in_run).to_numpy().astype(np.int32)

    # -- the output ------------------------------------------------------------------------------

    def add_referenced(
        self, sink: ShardSink, doc_ids: pa.Array, negative_ids: pa.Array, out_root: Path, taken: set[str]
    ) -> None:
        """Copy every pool document named in ``doc_ids`` (the ids the output's new pairs refer to) into
        the output's corpus, in new shards named after ``taken`` (DATASET's), and count each pool's
        documents among ``negative_ids``. Deterministic, so a resumed run cuts the same shards and
        skips those already marked done."""
        names = (n for n in map(shard_name, itertools.count(len(taken))) if n not in taken)
        buffer: list[pa.Table] = []
        for rows in self._picked(pc.unique(doc_ids), out_root):
            buffer.append(rows)
            if (
                sum(t.num_rows for t in buffer) >= COPY_SHARD_ROWS
                or sum(t.nbytes for t in buffer) >= COPY_SHARD_BYTES
            ):
                _write(sink, next(names), buffer)
                buffer = []
        if buffer:
            _write(sink, next(names), buffer)
        for src in self.pools:
            src.negatives = int(pc.sum(pc.is_in(negative_ids, value_set=src.picked)).as_py() or 0)

    def _picked(self, wanted: pa.Array, out_root: Path) -> Iterator[pa.Table]:
        """The taking-part rows of each pool shard whose doc_id is in ``wanted``, readable under
        ``out_root``; each source's ``added`` and ``picked`` (ids) are set on the way."""
        chosen = pa.array(sorted(self.chosen), pa.string())
        for src in self.pools:
            ids: list[pa.Array] = []
            for name in src.dataset.shards(CORPUS):
                if not src.shard_subsets.get(name):
                    continue
                t = self._rows(src, name, columns=["doc_id", "subset"])
                hit = pc.and_(
                    pc.is_in(t["doc_id"], value_set=wanted),
                    pc.is_in(pc.fill_null(t["subset"], ""), value_set=chosen),
                )
                at = pc.indices_nonzero(hit)
                if len(at):
                    rows = _portable(
                        self._rows(src, name, columns=ROW_COLUMNS[CORPUS]).take(at), src, name, out_root
                    )
                    ids.append(rows["doc_id"].combine_chunks())
                    yield rows
            src.picked = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
            src.added = len(src.picked)


def _write(sink: ShardSink, name: str, parts: list[pa.Table]) -> None:
    if not sink.is_done(CORPUS, name):
        sink.write_shard(CORPUS, name, pa.concat_tables(parts))


def _identity(row: dict[str, Any], root: Path) -> tuple[bytes, ...]:
    """What makes two corpus rows the same document, as one short digest per ``IDENTITY`` field:
    the subset, the instruction and the text exactly, and the image's bytes."""
    image = row.get("image")
    if image:
        data = image_data(image, root)
        pic = ("bytes", data.data) if data.data is not None else ("unreadable", data.path)
    else:
        pic = None
    values = ((row.get("subset") or ""), row.get("instruction"), row.get("text"), pic)
    return tuple(hashlib.sha256(repr(v).encode("utf-8", "surrogatepass")).digest()[:16] for v in values)


def _portable(rows: pa.Table, src: CorpusSource, name: str, out_root: Path) -> pa.Table:
    """Pool rows as the output can read them: image paths resolve under the pool's data root, so a
    pool with another data root gives its path images as inline bytes."""
    root = src.dataset.data_root
    if storage.absolute(root) == storage.absolute(out_root) or rows["image"].null_count == rows.num_rows:
        return rows
    cells = rows["image"].to_pylist()
    for i, cell in enumerate(cells):
        if cell and cell.get("bytes") is None and cell.get("path") is not None:
            data = image_data(cell, root)
            if data.data is None:
                where = storage.display(src.dataset.root / CORPUS / name)
                raise PoolError(
                    f"{where}: doc_id {rows['doc_id'][i].as_py()!r}: image "
                    f"{data.path!r} cannot be read ({data.error}), so it cannot be copied into the output"
                )
            cells[i] = {"bytes": data.data, "path": None}
    return rows.set_column(rows.schema.get_field_index("image"), "image", pa.array(cells, IMAGE_TYPE))
