"""Dedup: drop exact and near-duplicate rows, and rows that copy an evaluation dataset.

What counts as a duplicate
    Rows are compared within one table (queries with queries, corpus with corpus) and one subset.
    * exact_duplicate: same normalised text and same image bytes (curation.content_key).
    * near_duplicate_image: same normalised text (or both without text), images near in structure
      AND colour (curation.near_image: 64-bit pHashes at most ``phash_distance`` bits apart, found by
      pigeonhole banding (curation.hamming), never all pairs; and 8x8 colour thumbnails within
      ``COLOUR_DISTANCE`` of 255 in every cell and channel, at the grid that fits the smaller
      picture), AND targets that agree (curation.dedup_targets): two queries only when they have the
      same positive documents, two documents only when no query calls one relevant and the other
      irrelevant. Near copies whose targets disagree are not duplicates but a conflict in the data:
      they are kept, and counted in the stats (``near_duplicate_conflicts``, with examples).
      ``phash_distance`` negative or ``near=False``: no near duplicates at all.
    * contaminated: the row's content (normalised text and image bytes, whatever the subset) equals
      a row of the same table of an ``against`` dataset, or, with near on, has the same text and an
      image near (structure and colour) one of theirs, whatever its answer. Only ``decontaminate``
      tables are checked: queries by default, because corpus documents such as class names are
      shared by design between train and test.

What happens to them
    The first occurrence in dataset order (shard, then row) is kept; the others go to quarantine,
    whole, with the reason and a detail naming the kept row (or the eval row). Pairs that name a
    removed duplicate are rewritten to name the kept row (an exact copy has the same content; a near
    copy a near-identical picture, the same text and the same targets, so no pair comes to state
    what no input row said);
    pairs that thereby become the same (query_id, doc_id) as an earlier pair go to quarantine as
    duplicate_pair; pairs that name a contaminated row go to quarantine as references_removed_row.
    Nothing is lost.

How it runs
    curation.shardstage: scan (per shard, through the executor: read images, sha256, pHash, colour
    thumbnail), plan (in this process, over ids, hashes and thumbnails only: about 350 bytes a row
    at peak, plus the pairs' ids and labels for the targets), apply (per shard,
    atomic writes). Eval datasets are scanned the same way, through the same executor. A killed
    run resumes to the same output when rerun.

Example::

    from assay.curation.dataset import Dataset
    from assay.curation.dedup import dedup

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

from assay.curation.content_key import CONTENT_KEY_VERSION
from assay.curation.dataset import PROGRESS, Dataset, Manifest
from assay.curation.dedup_scan import ROW_SCAN_SCHEMA, eval_scan_task, scan_shard
from assay.curation.dedup_targets import Contradictions, attach_targets, empty_lists, item_keys, pair_targets
from assay.curation.executor import Executor, LocalExecutor
from assay.curation.hamming import (
    MAX_DISTANCE,
    first_occurrence,
    greedy_near_duplicates,
    near_pairs,
    popcount,
)
from assay.curation.near_image import COLOUR_DISTANCE, GRID, THUMB_BYTES, colour_distance, fitting_grid
from assay.curation.schema import CORPUS, PAIRS, QUERIES
from assay.curation.shardstage import PLAN_SCHEMA, read_scans, run_shard_stage, split_by_shard

STAGE = "dedup"
EXACT = "exact_duplicate"
NEAR = "near_duplicate_image"
CONTAMINATED = "contaminated"
DUPLICATE_PAIR = "duplicate_pair"
REFERENCES_REMOVED = "references_removed_row"
#: near copies (structure and colour) whose targets disagree: counted and reported, never folded
CONFLICTS = "near_duplicate_conflicts"
CONTENT_TABLES = (QUERIES, CORPUS)
DEFAULT_DECONTAMINATE = (QUERIES,)


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
        thumb = column("thumb", pa.binary(THUMB_BYTES)).combine_chunks()
        if n and thumb.null_count < n:
            filled = pc.fill_null(thumb, pa.scalar(bytes(THUMB_BYTES), pa.binary(THUMB_BYTES)))
            raw = np.frombuffer(filled.buffers()[1], np.uint8)
            start = filled.offset * THUMB_BYTES
            self.thumb = raw[start : start + n * THUMB_BYTES].reshape(n, THUMB_BYTES)
        else:
            self.thumb = np.zeros((n, THUMB_BYTES), np.uint8)
        self.side = _np(column("side", pa.int32()), np.int64)
        # What the pairs say each row is about (curation.dedup_targets); absent: nothing.
        has_targets = n and "t_sig" in side.column_names
        self.t_sig = _np(side.column("t_sig"), np.uint64) if has_targets else np.zeros(n, np.uint64)
        empty = empty_lists(n)
        self.contradicts = Contradictions(
            side.column("t_pos") if has_targets else empty, side.column("t_neg") if has_targets else empty
        )

    def colour(self, a: np.ndarray, b: np.ndarray, other: _EvalRows | None = None) -> np.ndarray:
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
        self.side = cat("side", np.int64)
        self.thumb = (
            np.concatenate([r.thumb for _, r in rows]) if rows else np.zeros((0, THUMB_BYTES), np.uint8)
        )

    def describe(self, i: int, table: str) -> str:
        name = self.names[int(np.searchsorted(self.starts, i, side="right")) - 1]
        return f"{table} row {self.ids[int(i)].as_py()!r} of eval dataset {name}"


def _plan_content_table(
    table: str,
    rows: _Rows,
    evals: _EvalRows | None,
    near: bool,
    distance: int,
    text_only: bool = True,
    colour: int = COLOUR_DISTANCE,
) -> tuple[pa.Table, np.ndarray, dict[str, Any], np.ndarray]:
    """Decide the fate of every row of queries or corpus.

    Returns the decisions (shard, row, plan columns), the canonical row of every row (itself when kept,
    the kept row for a duplicate, -1 for a contaminated row), the stats of this table and the rows
    that are near copies of an earlier kept row whose targets disagree (kept: conflicts).
    """
    n = rows.n
    idx = np.arange(n)
    reason = np.zeros(n, np.int8)  # 0 kept, 1 contaminated, 2 exact, 3 near
    witness = np.full(n, -1, np.int64)
    near_eval = np.zeros(n, bool)

    # 1. contamination: content equal to an eval row (any subset), or, with near on, same text and an
    # image near in structure and colour. First, so that a duplicate is never redirected to a
    # contaminated row. The eval rows' pairs are not read: a copy of a test input is a leak whatever
    # its answer.
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
                ok = rows.colour(cand[j], ev[i], evals) <= colour
                i, j = i[ok], j[ok]
                if len(j):
                    firsts = np.r_[True, j[1:] != j[:-1]]  # sorted by (j, i): the earliest eval row
                    r, e = cand[j[firsts]], ev[i[firsts]]
                    reason[r], witness[r], near_eval[r] = 1, e, True

    # 2. exact duplicates among the rest: the first of each (subset, content key) is kept, whatever
    # its pairs say (they all state something about this very content).
    alive = np.flatnonzero(reason == 0)
    if len(alive):
        first = alive[first_occurrence(rows.subset[alive], rows.key_a[alive], rows.key_b[alive])]
        dup = first != alive
        reason[alive[dup]], witness[alive[dup]] = 2, first[dup]

    # 3. near duplicates among the exact-unique rows: within (subset, normalised text), images near in
    # structure (pHash) and colour, and targets that agree (curation.dedup_targets): queries compare
    # only within the same set of positive documents, documents never fold when a query tells them apart.
    conflicts: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if near:
        cand = np.flatnonzero((reason == 0) & rows.has_phash)
        if len(cand):
            sig = rows.t_sig[cand] if table == QUERIES else np.zeros(len(cand), np.uint64)
            group = first_occurrence(rows.subset[cand], rows.text_key[cand], sig)
            same = [c[cand] for c in rows.same_picture()]
            contradicts = rows.contradicts
            if table != QUERIES and contradicts.any:
                # a row a query names may be told apart from another: it is compared, never merged blind
                same.append(np.where(contradicts.has_targets()[cand], cand + 1, 0))

            def accept(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                ok = rows.colour(cand[a], cand[b]) <= colour
                if table != QUERIES:
                    ok &= ~contradicts(cand[a], cand[b])
                return ok

            w = greedy_near_duplicates(rows.phash[cand], group, distance, accept=accept, same=same)
            hit = w >= 0
            reason[cand[hit]], witness[cand[hit]] = 3, cand[w[hit]]
            if table == QUERIES or contradicts.any:
                kept = np.flatnonzero((reason == 0) & rows.has_phash)
                conflicts = _conflicts(table, rows, kept, distance, colour)

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
                f"image within {int(popcount(rows.phash[r] ^ evals.phash[w]))} bits (pHash) and "
                f"{int(rows.colour(np.array([r]), np.array([w]), evals)[0])} (colour) of, same text as"
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
            details.append(f"{_how_near(rows, r, w)} of kept row {rows.id(w)!r}, same text and targets")
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
    later, earlier = conflicts
    stats = {
        "rows": n,
        EXACT: int((reason == 2).sum()),
        NEAR: int((reason == 3).sum()),
        CONTAMINATED: int((reason == 1).sum()),
        CONFLICTS: len(later),
        "conflict_examples": [
            f"{rows.id(j)!r} and {rows.id(i)!r}: {_how_near(rows, j, i)}, same text; "
            + (
                "other positive documents"
                if table == QUERIES
                else "a query calls one relevant, the other not"
            )
            for j, i in zip(later[:5].tolist(), earlier[:5].tolist(), strict=True)
        ],
        **rows.note_stats(),
    }
    return decisions, canon, stats, later


def _how_near(rows: _Rows, a: int, b: int) -> str:
    bits = int(popcount(rows.phash[a] ^ rows.phash[b]))
    colour = int(rows.colour(np.array([a]), np.array([b]))[0])
    return f"image within {bits} bits (pHash) and {colour} (colour)"


def _conflicts(
    table: str, rows: _Rows, kept: np.ndarray, distance: int, colour: int
) -> tuple[np.ndarray, np.ndarray]:
    """The kept rows (and, for each, the earliest such row) that are near an earlier kept row of the
    same subset and text in structure and colour, but whose targets disagree: conflicts in the data,
    reported, never folded. Returns (rows, earlier rows), in row order."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not len(kept):
        return empty
    group = first_occurrence(rows.subset[kept], rows.text_key[kept])
    i, j = near_pairs(rows.phash[kept], distance, group)
    if not len(i):
        return empty
    a, b = kept[i], kept[j]
    ok = rows.colour(a, b) <= colour
    if table == QUERIES:  # a query without positives is unlabelled, not in conflict
        ok &= (rows.t_sig[a] != rows.t_sig[b]) & (rows.t_sig[a] != 0) & (rows.t_sig[b] != 0)
    else:
        ok &= rows.contradicts(a, b)
    a, b = a[ok], b[ok]
    firsts = np.r_[True, b[1:] != b[:-1]] if len(b) else np.zeros(0, bool)  # sorted by (j, i)
    return b[firsts], a[firsts]


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
) -> tuple[pa.Table, np.ndarray, dict[str, Any], np.ndarray]:
    """The dedup decisions of rows of queries or corpus, from their scan rows in dataset order.

    ``side`` holds ``ROW_SCAN_SCHEMA`` plus ``shard`` (int32) and, with ``near``, the rows' targets
    (``t_sig``, ``t_pos``, ``t_neg``: curation.dedup_targets.attach_targets): all of a table's rows,
    or any part of them that holds, with every row it holds, every row of the same subset and
    content key (and, with ``near``, of the same subset and ``text_key``): a partition on those keys
    decides exactly as the whole table does. Returns (the decisions of the removed rows: shard, row
    and the plan columns; the canonical row of every row, as an index into ``side``, -1 when
    contaminated; counts; the conflicting rows, kept: near copies whose targets disagree).
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
            self.executor.map(eval_scan_task, tasks, desc=f"{STAGE}: scan eval")
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

    def _targets(self, scans: dict[str, list[tuple[str, Path]]]) -> dict[str, pa.Table]:
        """What the pairs say each query and document is about (curation.dedup_targets)."""
        p_scans = scans.get(PAIRS, [])
        if not self.near or not p_scans:
            return {}
        keys = {}
        for table in CONTENT_TABLES:
            t_scans = scans.get(table, [])
            side = read_scans(t_scans, columns=["id", "subset", "key_a", "key_b"]) if t_scans else None
            if side is None or side.num_rows == 0:
                keys[table] = (pa.array([], pa.string()), np.zeros(0, np.uint64))
                continue
            a, b = (_np(side.column(c), np.uint64) for c in ("key_a", "key_b"))
            ids = side.column("id").combine_chunks().cast(pa.string())
            keys[table] = (ids, item_keys(side.column("subset"), a, b))
        pairs = read_scans(p_scans, columns=["query_id", "doc_id", "label"])
        return pair_targets(pairs, keys[QUERIES], keys[CORPUS])

    def __call__(self, scans: dict[str, list[tuple[str, Path]]]) -> dict[tuple[str, str], pa.Table]:
        evals = self._eval_rows()
        targets = self._targets(scans)
        plans: dict[tuple[str, str], pa.Table] = {}
        content: dict[str, tuple[pa.Array, np.ndarray]] = {}
        for table in CONTENT_TABLES:
            t_scans = scans.get(table, [])
            side = read_scans(t_scans, columns=ROW_SCAN_SCHEMA.names) if t_scans else pa.table({})
            rows = _Rows(attach_targets(side, targets.get(table)) if side.num_rows else side)
            decisions, canon, stats, _ = _plan_content_table(
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
                read_scans(p_scans, columns=["row", "query_id", "doc_id"]), p_scans, content
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
        "colour": f"{GRID}x{GRID} RGB thumbnail, cells of >= 4x4 pixels" if near else None,
        "colour_distance": COLOUR_DISTANCE if near else None,
        "near_targets": "queries: same positive documents; corpus: no query tells them apart"
        if near
        else None,
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
