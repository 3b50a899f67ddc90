"""Dedup: drop exact and near-duplicate rows, and rows that copy an evaluation dataset.

What counts as a duplicate
    Rows are compared within one table (queries with queries, corpus with corpus) and one subset.
    * exact_duplicate: same normalised text and same image bytes (curation.content_key).
    * near_duplicate_image: same normalised text (or both without text) and images whose 64-bit
      pHash differ in at most ``phash_distance`` bits (0: equal hashes only; negative or
      ``near=False``: off). Found by pigeonhole banding (curation.hamming), never all pairs.
    * contaminated: the row's content (normalised text and image bytes, whatever the subset) equals
      a row of the same table of an ``against`` dataset, or, with near on, has the same text and an
      image within ``phash_distance`` of one. Only ``decontaminate`` tables are checked: queries by
      default, because corpus documents such as class names are shared by design between train and test.

What happens to them
    The first occurrence in dataset order (shard, then row) is kept; the others go to quarantine,
    whole, with the reason and a detail naming the kept row (or the eval row). Pairs that name a
    removed duplicate are rewritten to name the kept row; pairs that thereby become the same
    (query_id, doc_id) as an earlier pair go to quarantine as duplicate_pair; pairs that name a
    contaminated row go to quarantine as references_removed_row. Nothing is lost.

How it runs
    curation.shardstage: scan (per shard, through the executor: read images, sha256, pHash), plan
    (in this process, over ids and hashes only: about 150 bytes a row at peak), apply (per shard,
    atomic writes). Eval datasets are scanned the same way, through the same executor. A killed
    run resumes to the same output when rerun.

Example::

    from curation.dataset import Dataset
    from curation.dedup import dedup

    manifest = dedup(Dataset("data/train"), "data/train-dedup", against=[Dataset("data/eval")])
    print(manifest.quarantine_reasons)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.content_key import (
    CONTENT_KEY_VERSION,
    image_data,
    image_sha256,
    key_from_sha,
    perceptual_hash,
    text_key,
    text_only_keys,
)
from curation.dataset import PROGRESS, Dataset, Manifest, atomic_write_parquet
from curation.executor import Executor, LocalExecutor
from curation.hamming import MAX_DISTANCE, first_occurrence, greedy_near_duplicates, near_pairs, popcount
from curation.schema import CORPUS, ID_COLUMN, PAIRS, QUERIES
from curation.shardstage import PLAN_SCHEMA, read_scans, run_shard_stage, split_by_shard

STAGE = "dedup"
EXACT = "exact_duplicate"
NEAR = "near_duplicate_image"
CONTAMINATED = "contaminated"
DUPLICATE_PAIR = "duplicate_pair"
REFERENCES_REMOVED = "references_removed_row"
CONTENT_TABLES = (QUERIES, CORPUS)
DEFAULT_DECONTAMINATE = (QUERIES,)

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
    ]
)
PAIR_SCAN_SCHEMA = pa.schema(
    [pa.field("row", pa.int64()), pa.field("query_id", pa.string()), pa.field("doc_id", pa.string())]
)
SCAN_BATCH_ROWS = 256


# ---------------------------------------------------------------------------------------------------
# scan: one shard at a time, in executor tasks


def scan_shard(task: dict[str, Any]) -> pa.Table:
    """The scan side table of one shard (``task`` as built by curation.shardstage)."""
    table, src = task["table"], task["src"]
    pf = pq.ParquetFile(src)
    if table == PAIRS:
        t = pf.read(columns=["query_id", "doc_id"])
        return pa.table(
            {
                "row": pa.array(np.arange(t.num_rows), pa.int64()),
                "query_id": t.column("query_id"),
                "doc_id": t.column("doc_id"),
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


def scan_rows(table: str, data: pa.Table, data_root: str, near: bool) -> pa.Table:
    """The scan side table (``ROW_SCAN_SCHEMA``) of rows of queries or corpus already in memory, in
    their order (``row`` is the position in ``data``): the same keys and hashes as ``scan_shard``."""
    columns = [ID_COLUMN[table], "subset", "text", "image"]
    image = data.column("image")
    no_images = data.num_rows == 0 or (
        pc.sum(
            pc.or_(pc.is_valid(pc.struct_field(image, [0])), pc.is_valid(pc.struct_field(image, [1])))
        ).as_py()
        in (0, None)
    )
    if no_images:
        return _scan_text_only(data.select(columns[:3]), near)
    return _scan_batches(data.select(columns).to_batches(max_chunksize=SCAN_BATCH_ROWS), data_root, near)


def _scan_batches(batches: Iterable[pa.RecordBatch], data_root: str, near: bool) -> pa.Table:
    """The row-by-row scan of batches of (id, subset, text, image)."""
    columns: list[list[Any]] = [[] for _ in ROW_SCAN_SCHEMA.names]
    # An image file shared by many rows (one picture, many questions) is read and hashed once.
    by_path: dict[str, tuple[bytes | None, str | None, int | None, bool]] = {}
    row = 0
    for batch in batches:
        ids, subsets, texts, images = (batch.column(i).to_pylist() for i in range(4))
        for rid, subset, text, image in zip(ids, subsets, texts, images, strict=True):
            path = image.get("path") if image and image.get("bytes") is None else None
            if path is not None and path in by_path:
                sha, note, ph, has_image = by_path[path]
            else:
                img = image_data(image, data_root)
                sha, note = image_sha256(img)
                ph, has_image = None, img.source is not None
                if near and img.data is not None:
                    ph, why = perceptual_hash(img.data)
                    if why:
                        note = why
                if path is not None:
                    by_path[path] = (sha, note, ph, has_image)
            key = key_from_sha(text, sha, note)
            a, b = key.parts()
            values = (row, rid, subset, a, b, text_key(key.text), ph, note, has_image)
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
        },
        schema=ROW_SCAN_SCHEMA,
    )


def _eval_scan_task(task: dict[str, Any]) -> dict[str, Any]:
    side = scan_shard(task)
    atomic_write_parquet(task["scan_out"], side)
    return {"table": task["table"], "shard": task["shard"], "rows": side.num_rows}


# ---------------------------------------------------------------------------------------------------
# plan: in the driver, over ids and hashes


def _np(col: pa.ChunkedArray | pa.Array, dtype: Any, fill: Any = 0) -> np.ndarray:
    return np.asarray(col.fill_null(fill).to_numpy(zero_copy_only=False), dtype=dtype)


class _Rows:
    """One content table's scan as numpy arrays in dataset order; ids stay in Arrow (compact), and
    only the ids of removed rows ever become Python strings."""

    def __init__(self, side: pa.Table):
        self.n = n = side.num_rows
        column = lambda name, t: side.column(name) if n else pa.chunked_array([], t)  # noqa: E731
        self.ids = column("id", pa.string()).combine_chunks()
        self.shard = _np(column("shard", pa.int32()), np.int32)
        self.row = _np(column("row", pa.int64()), np.int64)
        subset = pc.dictionary_encode(column("subset", pa.string()).combine_chunks(), null_encoding="encode")
        self.subset = np.asarray(subset.indices.to_numpy(zero_copy_only=False), np.int64)
        self.key_a = _np(column("key_a", pa.uint64()), np.uint64)
        self.key_b = _np(column("key_b", pa.uint64()), np.uint64)
        self.text_key = _np(column("text_key", pa.uint64()), np.uint64)
        phash = column("phash", pa.uint64())
        self.has_phash = np.asarray(phash.is_valid().to_numpy(zero_copy_only=False), bool)
        self.phash = _np(phash, np.uint64)
        self.notes = column("note", pa.string()).combine_chunks()
        self.has_image = _np(column("has_image", pa.bool_()), bool, False)

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


class _EvalRows:
    """The rows of one table of every ``against`` dataset, concatenated in the order given."""

    def __init__(self, parts: list[tuple[str, pa.Table]]):
        rows = [(name, _Rows(side)) for name, side in parts]
        self.names = [name for name, _ in rows]
        self.starts = np.cumsum([0] + [r.n for _, r in rows])
        self.n = int(self.starts[-1])
        self.ids = pa.concat_arrays([r.ids for _, r in rows]) if rows else pa.array([], pa.string())

        def cat(attr: str, dtype: Any) -> np.ndarray:
            return np.concatenate([getattr(r, attr) for _, r in rows]) if rows else np.zeros(0, dtype)

        self.key_a, self.key_b = cat("key_a", np.uint64), cat("key_b", np.uint64)
        self.text_key, self.phash = cat("text_key", np.uint64), cat("phash", np.uint64)
        self.has_phash = cat("has_phash", bool)

    def describe(self, i: int, table: str) -> str:
        name = self.names[int(np.searchsorted(self.starts, i, side="right")) - 1]
        return f"{table} row {self.ids[int(i)].as_py()!r} of eval dataset {name}"


def _plan_content_table(
    table: str, rows: _Rows, evals: _EvalRows | None, near: bool, distance: int, text_only: bool = True
) -> tuple[pa.Table, np.ndarray, dict[str, Any]]:
    """Decide the fate of every row of queries or corpus.

    Returns the decisions (shard, row, plan columns), the canonical row of every row (itself when kept,
    the kept row for a duplicate, -1 for a contaminated row) and the stats of this table.
    """
    n = rows.n
    idx = np.arange(n)
    reason = np.zeros(n, np.int8)  # 0 kept, 1 contaminated, 2 exact, 3 near
    witness = np.full(n, -1, np.int64)
    near_eval = np.zeros(n, bool)

    # 1. contamination: content equal to an eval row (any subset), or, with near on, same text and a
    # pHash within distance. First, so that a duplicate is never redirected to a contaminated row.
    if evals is not None and evals.n and n:
        first = first_occurrence(
            np.concatenate([evals.key_a, rows.key_a]), np.concatenate([evals.key_b, rows.key_b])
        )[evals.n :]
        hit = first < evals.n
        if not text_only:  # rows without an image are exempt (label-like texts shared by design)
            hit &= rows.has_image
        reason[hit], witness[hit] = 1, first[hit]
        if near:
            cand = np.flatnonzero((reason == 0) & rows.has_phash)
            ev = np.flatnonzero(evals.has_phash)
            if len(cand) and len(ev):
                i, j = near_pairs(
                    rows.phash[cand],
                    distance,
                    rows.text_key[cand],
                    against=evals.phash[ev],
                    against_groups=evals.text_key[ev],
                )
                if len(j):
                    firsts = np.r_[True, j[1:] != j[:-1]]  # sorted by (j, i): the earliest eval row
                    r, e = cand[j[firsts]], ev[i[firsts]]
                    reason[r], witness[r], near_eval[r] = 1, e, True

    # 2. exact duplicates among the rest: the first of each (subset, content key) is kept.
    alive = np.flatnonzero(reason == 0)
    if len(alive):
        first = alive[first_occurrence(rows.subset[alive], rows.key_a[alive], rows.key_b[alive])]
        dup = first != alive
        reason[alive[dup]], witness[alive[dup]] = 2, first[dup]

    # 3. near-duplicate images among the exact-unique rows, within (subset, normalised text).
    if near:
        cand = np.flatnonzero((reason == 0) & rows.has_phash)
        if len(cand):
            group = first_occurrence(rows.subset[cand], rows.text_key[cand])
            w = greedy_near_duplicates(rows.phash[cand], group, distance)
            hit = w >= 0
            reason[cand[hit]], witness[cand[hit]] = 3, cand[w[hit]]

    canon = idx.copy()
    dup = reason >= 2
    canon[dup] = witness[dup]
    canon = canon[canon]  # an exact duplicate of a row that is itself a near duplicate: to the kept one
    canon[reason == 1] = -1

    removed = np.flatnonzero(reason > 0)
    details, reasons = [], []
    for r in removed.tolist():
        w = int(witness[r])
        if reason[r] == 1:
            how = (
                f"image within {int(popcount(rows.phash[r] ^ evals.phash[w]))} bits (pHash) of, same text as"
                if near_eval[r]
                else "same text and image as"
            )
            details.append(f"{how} {evals.describe(w, table)}")
            reasons.append(CONTAMINATED)
        elif reason[r] == 2:
            d = f"same text and image as {rows.id(w)!r}"
            if canon[r] != w:
                d += f" (itself a near duplicate); kept row: {rows.id(canon[r])!r}"
            details.append(d)
            reasons.append(EXACT)
        else:
            bits = int(popcount(rows.phash[r] ^ rows.phash[w]))
            details.append(f"image within {bits} bits (pHash) of kept row {rows.id(w)!r}, same text")
            reasons.append(NEAR)
    decisions = pa.table(
        {
            "shard": pa.array(rows.shard[removed], pa.int32()),
            "row": pa.array(rows.row[removed], pa.int64()),
            "action": pa.array(["quarantine"] * len(removed), pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
            "set_query_id": pa.nulls(len(removed), pa.string()),
            "set_doc_id": pa.nulls(len(removed), pa.string()),
        }
    )
    stats = {
        "rows": n,
        EXACT: int((reason == 2).sum()),
        NEAR: int((reason == 3).sum()),
        CONTAMINATED: int((reason == 1).sum()),
        **rows.note_stats(),
    }
    return decisions, canon, stats


def _plan_pairs(
    rows: pa.Table, scans: list[tuple[str, Path]], content: dict[str, tuple[pa.Array, np.ndarray]]
) -> tuple[pa.Table, dict[str, int]]:
    """Rewrite pairs to the kept rows; quarantine those naming contaminated rows, and repeats.

    ``content`` maps queries and corpus to (ids, canonical row of each row: -1 when contaminated).
    Only the pairs that change become Python objects.
    """
    n = rows.num_rows
    old: dict[str, pa.Array] = {}
    code: dict[str, np.ndarray] = {}
    canon_of: dict[str, np.ndarray] = {}
    gone: dict[str, np.ndarray] = {}
    changed: dict[str, np.ndarray] = {}
    for col, table in (("query_id", QUERIES), ("doc_id", CORPUS)):
        id_array, canon = content[table]
        old[col] = values = rows.column(col).combine_chunks()
        pos_arr = pc.index_in(values, value_set=id_array)
        known = np.asarray(pos_arr.is_valid().to_numpy(zero_copy_only=False), bool)
        pos = _np(pos_arr, np.int64)
        c = np.where(known, canon[pos] if len(canon) else -1, -1)
        gone[col] = known & (c < 0)
        changed[col] = known & (c >= 0) & (c != pos)
        canon_of[col] = c
        # Ids that name no row (validate's business) keep a code of their own, after the row numbers.
        if known.all():
            code[col] = c
        else:
            other = _np(pc.dictionary_encode(values).indices, np.int64) + len(canon)
            code[col] = np.where(known & (c >= 0), c, other)
    removed = gone["query_id"] | gone["doc_id"]
    good = np.flatnonzero(~removed)
    first = good[first_occurrence(code["query_id"][good], code["doc_id"][good])]
    dup_mask = first != good
    rewrite = good[~dup_mask & (changed["query_id"][good] | changed["doc_id"][good])]
    shard_col = _np(rows.column("shard"), np.int64)
    row_col = _np(rows.column("row"), np.int64)

    def new_ids(col: str, at: np.ndarray, *, unchanged_as_null: bool) -> pa.Array:
        """The id each pair in ``at`` names after rewriting (null where it stays, if asked)."""
        ids = content[QUERIES if col == "query_id" else CORPUS][0]
        moved = changed[col][at]
        stays = (
            pa.nulls(len(at), pa.string()) if unchanged_as_null else old[col].take(pa.array(at, pa.int64()))
        )
        if not moved.any():
            return stays
        target = ids.take(pa.array(np.where(moved, canon_of[col][at], 0), pa.int64()))
        return pc.if_else(pa.array(moved), target, stays)

    def part(
        at: np.ndarray,
        action: str,
        reason: str | None,
        details: list[str] | None = None,
        set_ids: bool = False,
    ) -> pa.Table:
        k = len(at)
        return pa.table(
            {
                "shard": pa.array(shard_col[at], pa.int32()),
                "row": pa.array(row_col[at], pa.int64()),
                "action": pa.array([action] * k, pa.string()),
                "reason": pa.array([reason] * k, pa.string()),
                "detail": pa.array(details if details is not None else [None] * k, pa.string()),
                "set_query_id": new_ids("query_id", at, unchanged_as_null=True)
                if set_ids
                else pa.nulls(k, pa.string()),
                "set_doc_id": new_ids("doc_id", at, unchanged_as_null=True)
                if set_ids
                else pa.nulls(k, pa.string()),
            }
        )

    refs = np.flatnonzero(removed)
    ref_details = [
        " and ".join(f"{col} {old[col][r].as_py()!r}" for col in ("query_id", "doc_id") if gone[col][r])
        + f": removed as {CONTAMINATED}"
        for r in refs.tolist()
    ]
    dups, dup_firsts = good[dup_mask], first[dup_mask]
    new_q = new_ids("query_id", dups, unchanged_as_null=False).to_pylist()
    new_d = new_ids("doc_id", dups, unchanged_as_null=False).to_pylist()
    dup_details = [
        f"same pair ({qid!r}, {did!r}) as pairs/{scans[int(shard_col[f])][0]} row {int(row_col[f])}"
        for qid, did, f in zip(new_q, new_d, dup_firsts.tolist(), strict=True)
    ]
    decisions = pa.concat_tables(
        [
            part(refs, "quarantine", REFERENCES_REMOVED, ref_details),
            part(dups, "quarantine", DUPLICATE_PAIR, dup_details),
            part(rewrite, "rewrite", None, set_ids=True),
        ]
    )
    stats = {
        "rows": n,
        "rewritten": len(rewrite),
        DUPLICATE_PAIR: int(dup_mask.sum()),
        REFERENCES_REMOVED: int(removed.sum()),
    }
    return decisions, stats


def eval_rows(parts: list[tuple[str, pa.Table]]) -> _EvalRows:
    """The rows of one table of the eval datasets, from (dataset name, scan side table) in order."""
    return _EvalRows(parts)


def plan_content_rows(
    table: str,
    side: pa.Table,
    evals: _EvalRows | None,
    *,
    near: bool,
    distance: int,
    text_only: bool = True,
) -> tuple[pa.Table, np.ndarray, dict[str, Any]]:
    """The dedup decisions of rows of queries or corpus, from their scan rows in dataset order.

    ``side`` holds ``ROW_SCAN_SCHEMA`` plus ``shard`` (int32): all of a table's rows, or any part of
    them that holds, with every row it holds, every row of the same subset and content key (and, with
    ``near``, of the same subset and ``text_key``): a partition on those keys decides exactly as the
    whole table does. Returns (the decisions of the removed rows: shard, row and the plan columns; the
    canonical row of every row, as an index into ``side``, -1 when contaminated; counts).
    """
    return _plan_content_table(table, _Rows(side), evals, near, distance, text_only)


def plan_pair_rows(
    rows: pa.Table, shard_names: list[str], content: dict[str, tuple[pa.Array, np.ndarray]]
) -> tuple[pa.Table, dict[str, int]]:
    """The dedup decisions of pairs (``shard``, ``row``, ``query_id``, ``doc_id`` in dataset order;
    ``shard`` indexes ``shard_names``): rewrites to the kept rows, references_removed_row and
    duplicate_pair. ``content`` maps queries and corpus to (ids, the canonical row of each as an
    index into ids, -1 when contaminated) and must hold every id the pairs name. Any part of the
    pairs holding every pair of each canonical (query, doc) it holds decides as the whole does."""
    return _plan_pairs(rows, [(name, Path(name)) for name in shard_names], content)


def _plan_part(part: pa.Table) -> pa.Table:
    return part.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)


class _Planner:
    """The plan step of dedup (a callable for run_shard_stage). Scans the eval datasets through the
    executor first (resumable, like the main scan), then decides every row from ids and hashes."""

    def __init__(
        self,
        out: Path,
        *,
        near: bool,
        distance: int,
        against: list[Dataset],
        decontaminate: tuple[str, ...],
        config: dict[str, Any],
        executor: Executor,
    ):
        self.out, self.near, self.distance = out, near, distance
        self.against, self.decontaminate = against, decontaminate
        self.config, self.executor = config, executor
        self.stats: dict[str, Any] = {}

    def _eval_rows(self) -> dict[str, _EvalRows]:
        if not self.against:
            return {}
        progress = self.out / PROGRESS / "eval-scan"
        scans: dict[tuple[int, str], list[tuple[str, Path]]] = {}
        tasks = []
        for k, ev in enumerate(self.against):
            for table in self.decontaminate:
                scans[(k, table)] = []
                for name in ev.shards(table):
                    scan_out = progress / f"{k:02d}" / table / name
                    scans[(k, table)].append((name, scan_out))
                    if not scan_out.exists():
                        tasks.append(
                            {
                                "table": table,
                                "shard": name,
                                "src": str(ev.shard_path(table, name)),
                                "data_root": str(ev.data_root.resolve()),
                                "config": self.config,
                                "scan_out": str(scan_out),
                            }
                        )
        if tasks:
            self.executor.map(_eval_scan_task, tasks, desc=f"{STAGE}: scan eval")
        return {
            table: _EvalRows(
                [
                    (str(ev.root), read_scans(scans[(k, table)], columns=ROW_SCAN_SCHEMA.names))
                    for k, ev in enumerate(self.against)
                    if scans[(k, table)]
                ]
            )
            for table in self.decontaminate
        }

    def __call__(self, scans: dict[str, list[tuple[str, Path]]]) -> dict[tuple[str, str], pa.Table]:
        evals = self._eval_rows()
        plans: dict[tuple[str, str], pa.Table] = {}
        content: dict[str, tuple[pa.Array, np.ndarray]] = {}
        for table in CONTENT_TABLES:
            t_scans = scans.get(table, [])
            rows = _Rows(read_scans(t_scans, columns=ROW_SCAN_SCHEMA.names) if t_scans else pa.table({}))
            decisions, canon, stats = _plan_content_table(
                table,
                rows,
                evals.get(table),
                self.near,
                self.distance,
                self.config["decontaminate_text_only"],
            )
            plans.update(split_by_shard(decisions, t_scans, table, _plan_part))
            content[table] = (rows.ids, canon)
            self.stats[table] = stats
            del rows
        p_scans = scans.get(PAIRS, [])
        if p_scans:
            decisions, stats = _plan_pairs(
                read_scans(p_scans, columns=PAIR_SCAN_SCHEMA.names), p_scans, content
            )
            plans.update(split_by_shard(decisions, p_scans, PAIRS, _plan_part))
            self.stats[PAIRS] = stats
        return plans


def _tables(decontaminate: str | Iterable[str]) -> tuple[str, ...]:
    items = decontaminate.split(",") if isinstance(decontaminate, str) else list(decontaminate)
    tables = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    bad = [t for t in tables if t not in CONTENT_TABLES]
    if bad:
        raise ValueError(
            f"decontaminate: unknown table(s) {', '.join(map(repr, bad))}; "
            f"choose from {', '.join(CONTENT_TABLES)}"
        )
    return tuple(t for t in CONTENT_TABLES if t in tables)


def dedup_config(
    source: Dataset,
    out: str | os.PathLike,
    *,
    near: bool = True,
    phash_distance: int = 4,
    against: Iterable[Dataset | str | os.PathLike] = (),
    decontaminate: str | Iterable[str] = DEFAULT_DECONTAMINATE,
    decontaminate_text_only: bool = True,
) -> tuple[dict[str, Any], list[Dataset]]:
    """The settings of a dedup run as its manifest records them, checked, and the eval datasets
    (arguments as for ``dedup``). ``config["near"]`` says whether near duplicates are looked for,
    ``config["phash_distance"]`` within how many bits, ``config["decontaminate"]`` which tables."""
    near = bool(near) and phash_distance is not None and phash_distance >= 0
    if near and phash_distance > MAX_DISTANCE:
        raise ValueError(
            f"phash_distance {phash_distance} is too large: use 0 to {MAX_DISTANCE} (unrelated "
            "images are about 32 bits apart; 4 to 10 catches resized or re-encoded copies)"
        )
    evals = [a if isinstance(a, Dataset) else Dataset(a) for a in against]
    tables = _tables(decontaminate) if evals else ()
    for ev in evals:
        if ev.root.resolve() in (source.root.resolve(), Path(out).resolve()):
            raise ValueError(
                f"{ev.root}: an eval dataset to decontaminate against must not be the "
                "dataset being deduplicated or the output"
            )
    config = {
        "content_key_version": CONTENT_KEY_VERSION,
        "near": near,
        "phash": "imagehash.phash 8x8 (64 bits)" if near else None,
        "phash_distance": int(phash_distance) if near else None,
        "against": [ev.parent_ref() for ev in evals],
        "decontaminate": list(tables),
        "decontaminate_text_only": bool(decontaminate_text_only),
    }
    return config, evals


def dedup(
    source: Dataset,
    out: str | os.PathLike,
    *,
    near: bool = True,
    phash_distance: int = 4,
    against: Iterable[Dataset | str | os.PathLike] = (),
    decontaminate: str | Iterable[str] = DEFAULT_DECONTAMINATE,
    decontaminate_text_only: bool = True,
    executor: Executor | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``source`` without duplicates (and without rows copied from ``against``) to ``out``.

    Args:
        source: the dataset to deduplicate.
        out: the new dataset's directory; a killed run there resumes when called again alike.
        near: find near-duplicate images (pHash). Off as well when ``phash_distance`` is negative.
        phash_distance: the most bits two pHashes may differ in to count as near duplicates (0 to 16).
        against: evaluation datasets; training rows whose content matches one of their rows are removed.
        decontaminate: the tables checked against them ("queries", "corpus", or both).
        decontaminate_text_only: also count rows without an image as contaminated. Turn it off where
            train and eval share short label-like texts by design (easy-vqa's retrieval queries such
            as "a blue circle"), so that only rows carrying an image are checked.
        executor: runs the per-shard scan and write tasks (default: LocalExecutor, in process).
        overwrite: replace whatever ``out`` holds.

    Returns:
        The manifest of the new dataset; ``manifest.extra["dedup"]`` has counts per table.
    """
    config, evals = dedup_config(
        source,
        out,
        near=near,
        phash_distance=phash_distance,
        against=against,
        decontaminate=decontaminate,
        decontaminate_text_only=decontaminate_text_only,
    )
    near, tables, out = config["near"], tuple(config["decontaminate"]), Path(out)
    executor = executor or LocalExecutor()
    planner = _Planner(
        out,
        near=near,
        distance=config["phash_distance"] if near else 0,
        against=evals,
        decontaminate=tables,
        config=config,
        executor=executor,
    )
    # The planner fills planner.stats before the manifest is written.
    return run_shard_stage(
        source,
        out,
        stage=STAGE,
        config=config,
        scan_fn=scan_shard,
        plan_fn=planner,
        executor=executor,
        overwrite=overwrite,
        extra={STAGE: planner.stats},
    )
