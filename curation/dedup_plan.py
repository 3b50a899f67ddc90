"""Dedup's plan: from the scan rows (ids and hashes, never the content), the fate of every row and pair.

:func:`plan_content_rows` decides the rows of queries or corpus, in three steps, each over what the
step before kept:

1. contamination: content equal to an eval row (any subset), or, with near on, the same text and an
   image near in structure and colour. First, so that a duplicate is never redirected to a
   contaminated row;
2. exact duplicates: the first of each (subset, content key) is kept;
3. near duplicates: within (subset, normalised text), images near in structure (pHash) and colour,
   and targets that agree (curation.dedup_targets); near copies whose targets disagree are kept and
   reported as conflicts.

:func:`plan_pair_rows` then rewrites pairs to the kept rows and quarantines the pairs that name a
contaminated row or repeat an earlier pair. What the reasons mean is told in curation.dedup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation.dedup_rows import EvalRows, ScanRows, as_numpy
from assay.curation.hamming import first_occurrence, greedy_near_duplicates, near_pairs, popcount
from assay.curation.near_image import COLOUR_DISTANCE
from assay.curation.schema import CORPUS, QUERIES
from assay.curation.shardstage import plan_table

__all__ = [
    "CONFLICTS",
    "CONTAMINATED",
    "DUPLICATE_PAIR",
    "EXACT",
    "NEAR",
    "REFERENCES_REMOVED",
    "plan_content_rows",
    "plan_pair_rows",
]

EXACT = "exact_duplicate"
NEAR = "near_duplicate_image"
CONTAMINATED = "contaminated"
DUPLICATE_PAIR = "duplicate_pair"
REFERENCES_REMOVED = "references_removed_row"
#: near copies (structure and colour) whose targets disagree: counted and reported, never folded
CONFLICTS = "near_duplicate_conflicts"

# A content row's fate, as stored in _Fates.reason.
_KEPT, _CONTAMINATED, _EXACT_COPY, _NEAR_COPY = 0, 1, 2, 3


def plan_content_rows(
    table: str,
    side: pa.Table,
    evals: EvalRows | None,
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
    rows, colour = ScanRows(side), COLOUR_DISTANCE
    fates = _Fates(rows.n)
    # contamination first, so that a duplicate is never redirected to a contaminated row
    if evals is not None and evals.n and rows.n:
        _mark_contaminated(fates, rows, evals, text_only=text_only)
        if near:
            _mark_near_contaminated(fates, rows, evals, distance, colour)
    _mark_exact_duplicates(fates, rows)
    conflicts: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if near:
        conflicts = _mark_near_duplicates(fates, table, rows, distance, colour)
    canon = fates.canonical()
    decisions = _content_decisions(table, rows, evals, fates, canon)
    return decisions, canon, _content_stats(table, rows, fates, conflicts), conflicts[0]


def plan_pair_rows(
    rows: pa.Table, shard_names: list[str], content: dict[str, tuple[pa.Array, np.ndarray]]
) -> tuple[pa.Table, dict[str, int]]:
    """The dedup decisions of pairs (``shard``, ``row``, ``query_id``, ``doc_id`` in dataset order;
    ``shard`` indexes ``shard_names``): rewrites to the kept rows, references_removed_row and
    duplicate_pair. ``content`` maps queries and corpus to (ids, the canonical row of each as an
    index into ids, -1 when contaminated) and must hold every id the pairs name. Any part of the
    pairs holding every pair of each canonical (query, doc) it holds decides as the whole does.
    Only the pairs that change become Python objects."""
    query = _PairIds.resolve(rows.column("query_id").combine_chunks(), *content[QUERIES])
    doc = _PairIds.resolve(rows.column("doc_id").combine_chunks(), *content[CORPUS])
    removed = query.gone | doc.gone
    good = np.flatnonzero(~removed)
    first = good[first_occurrence(query.code[good], doc.code[good])]
    dup_mask = first != good
    rewrite = good[~dup_mask & (query.changed[good] | doc.changed[good])]
    shard, row = as_numpy(rows.column("shard"), np.int64), as_numpy(rows.column("row"), np.int64)

    refs = np.flatnonzero(removed)
    dups = good[dup_mask]
    decisions = pa.concat_tables(
        [
            _decisions(
                shard[refs],
                row[refs],
                "quarantine",
                [REFERENCES_REMOVED] * len(refs),
                _reference_details(refs, query, doc),
            ),
            _decisions(
                shard[dups],
                row[dups],
                "quarantine",
                [DUPLICATE_PAIR] * len(dups),
                _duplicate_details(dups, first[dup_mask], query, doc, shard_names, shard, row),
            ),
            _decisions(
                shard[rewrite],
                row[rewrite],
                "rewrite",
                [None] * len(rewrite),
                [None] * len(rewrite),
                set_query_id=query.new_ids(rewrite, unchanged_as_null=True),
                set_doc_id=doc.new_ids(rewrite, unchanged_as_null=True),
            ),
        ]
    )
    stats = {
        "rows": rows.num_rows,
        "rewritten": len(rewrite),
        DUPLICATE_PAIR: int(dup_mask.sum()),
        REFERENCES_REMOVED: int(removed.sum()),
    }
    return decisions, stats


def _reference_details(refs: np.ndarray, query: _PairIds, doc: _PairIds) -> list[str]:
    """For each pair in ``refs``: the ids it names that were removed as contaminated."""
    return [
        " and ".join(
            f"{name} {ids.old[r].as_py()!r}"
            for name, ids in (("query_id", query), ("doc_id", doc))
            if ids.gone[r]
        )
        + f": removed as {CONTAMINATED}"
        for r in refs.tolist()
    ]


def _duplicate_details(
    dups: np.ndarray,
    firsts: np.ndarray,
    query: _PairIds,
    doc: _PairIds,
    shard_names: list[str],
    shard: np.ndarray,
    row: np.ndarray,
) -> list[str]:
    """For each pair in ``dups``: the (query, doc) it names after rewriting, and where the first such pair is."""
    new_q = query.new_ids(dups, unchanged_as_null=False).to_pylist()
    new_d = doc.new_ids(dups, unchanged_as_null=False).to_pylist()
    return [
        f"same pair ({qid!r}, {did!r}) as pairs/{shard_names[int(shard[f])]} row {int(row[f])}"
        for qid, did, f in zip(new_q, new_d, firsts.tolist(), strict=True)
    ]


def _decisions(
    shard: np.ndarray,
    row: np.ndarray,
    action: str,
    reasons: list[str | None],
    details: list[str | None],
    *,
    set_query_id: pa.Array | None = None,
    set_doc_id: pa.Array | None = None,
) -> pa.Table:
    """Plan rows: (shard, row) of each row or pair decided, what to do and why, and the ids a rewrite sets."""
    plan = plan_table(row, action, reasons, details, set_query_id=set_query_id, set_doc_id=set_doc_id)
    return plan.add_column(0, "shard", pa.array(shard, pa.int32()))


# --- queries and corpus ----------------------------------------------------------------------------


class _Fates:
    """What happens to each row of a content table: ``reason`` (_KEPT, _CONTAMINATED, _EXACT_COPY or
    _NEAR_COPY), ``witness`` (the eval row it copies, or the kept row it duplicates; -1 when kept) and
    ``near_eval`` (contaminated by a near image rather than the same content)."""

    def __init__(self, n: int):
        self.reason = np.zeros(n, np.int8)
        self.witness = np.full(n, -1, np.int64)
        self.near_eval = np.zeros(n, bool)

    def mark(self, rows: np.ndarray, reason: int, witness: np.ndarray) -> None:
        self.reason[rows], self.witness[rows] = reason, witness

    def kept(self) -> np.ndarray:
        return self.reason == _KEPT

    def canonical(self) -> np.ndarray:
        """The row each row stands for: itself when kept, the kept row for a duplicate (following an
        exact duplicate of a near duplicate to the kept one), -1 for a contaminated row."""
        canon = np.arange(len(self.reason))
        dup = self.reason >= _EXACT_COPY
        canon[dup] = self.witness[dup]
        canon = canon[canon]
        canon[self.reason == _CONTAMINATED] = -1
        return canon


def _mark_contaminated(fates: _Fates, rows: ScanRows, evals: EvalRows, *, text_only: bool) -> None:
    """Rows whose content equals an eval row's (any subset). The eval rows' pairs are not read: a
    copy of a test input is a leak whatever its answer."""
    first = first_occurrence(
        np.concatenate([evals.key_a, rows.key_a]), np.concatenate([evals.key_b, rows.key_b])
    )[evals.n :]
    hit = first < evals.n
    if not text_only:  # rows without an image are exempt (label-like texts shared by design)
        hit &= rows.has_image
    fates.mark(hit, _CONTAMINATED, first[hit])


def _mark_near_contaminated(
    fates: _Fates, rows: ScanRows, evals: EvalRows, distance: int, colour: int
) -> None:
    """Rows left with the same text as an eval row and an image near it in structure and colour."""
    cand = np.flatnonzero(fates.kept() & rows.has_phash)
    ev = np.flatnonzero(evals.has_phash)
    if not len(cand) or not len(ev):
        return
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
        r = cand[j[firsts]]
        fates.mark(r, _CONTAMINATED, ev[i[firsts]])
        fates.near_eval[r] = True


def _mark_exact_duplicates(fates: _Fates, rows: ScanRows) -> None:
    """Among the rows left, the first of each (subset, content key) is kept, whatever its pairs say
    (they all state something about this very content)."""
    alive = np.flatnonzero(fates.kept())
    if len(alive):
        first = alive[first_occurrence(rows.subset[alive], rows.key_a[alive], rows.key_b[alive])]
        dup = first != alive
        fates.mark(alive[dup], _EXACT_COPY, first[dup])


def _mark_near_duplicates(
    fates: _Fates, table: str, rows: ScanRows, distance: int, colour: int
) -> tuple[np.ndarray, np.ndarray]:
    """Among the exact-unique rows: within (subset, normalised text), images near in structure (pHash)
    and colour, and targets that agree (curation.dedup_targets): queries compare only within the same
    set of positive documents, documents never fold when a query tells them apart. Returns the
    conflicts (see :func:`_conflicts`)."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    cand = np.flatnonzero(fates.kept() & rows.has_phash)
    if not len(cand):
        return empty
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
    fates.mark(cand[hit], _NEAR_COPY, cand[w[hit]])
    if table == QUERIES or contradicts.any:
        return _conflicts(table, rows, np.flatnonzero(fates.kept() & rows.has_phash), distance, colour)
    return empty


def _conflicts(
    table: str, rows: ScanRows, kept: np.ndarray, distance: int, colour: int
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


def _content_decisions(
    table: str, rows: ScanRows, evals: EvalRows | None, fates: _Fates, canon: np.ndarray
) -> pa.Table:
    """Quarantine every removed row, with its reason and a detail naming the kept row or the eval row."""
    removed = np.flatnonzero(fates.reason != _KEPT)
    details, reasons = [], []
    for r in removed.tolist():
        w = int(fates.witness[r])
        if fates.reason[r] == _CONTAMINATED:
            how = (
                f"image within {int(popcount(rows.phash[r] ^ evals.phash[w]))} bits (pHash) and "
                f"{int(rows.colour(np.array([r]), np.array([w]), evals)[0])} (colour) of, same text as"
                if fates.near_eval[r]
                else "same text and image as"
            )
            details.append(f"{how} {evals.describe(w, table)}")
            reasons.append(CONTAMINATED)
        elif fates.reason[r] == _EXACT_COPY:
            d = f"same text and image as {rows.id(w)!r}"
            if canon[r] != w:
                d += f" (itself a near duplicate); kept row: {rows.id(canon[r])!r}"
            details.append(d)
            reasons.append(EXACT)
        else:
            details.append(f"{_how_near(rows, r, w)} of kept row {rows.id(w)!r}, same text and targets")
            reasons.append(NEAR)
    return _decisions(rows.shard[removed], rows.row[removed], "quarantine", reasons, details)


def _content_stats(
    table: str, rows: ScanRows, fates: _Fates, conflicts: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    later, earlier = conflicts
    return {
        "rows": rows.n,
        EXACT: int((fates.reason == _EXACT_COPY).sum()),
        NEAR: int((fates.reason == _NEAR_COPY).sum()),
        CONTAMINATED: int((fates.reason == _CONTAMINATED).sum()),
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


def _how_near(rows: ScanRows, a: int, b: int) -> str:
    bits = int(popcount(rows.phash[a] ^ rows.phash[b]))
    colour = int(rows.colour(np.array([a]), np.array([b]))[0])
    return f"image within {bits} bits (pHash) and {colour} (colour)"


# --- pairs -----------------------------------------------------------------------------------------


@dataclass
class _PairIds:
    """One id column of the pairs (query_id or doc_id) against the canonical rows of its table."""

    old: pa.Array  # the ids the pairs name
    ids: pa.Array  # the ids of the table's rows
    canon: np.ndarray  # per pair, the canonical row of the row it names; -1: contaminated or no row
    gone: np.ndarray  # names a contaminated row
    changed: np.ndarray  # names a duplicate: rewritten to the canonical row
    code: np.ndarray  # equal for two pairs when they name the same canonical row (or the same unknown id)

    @classmethod
    def resolve(cls, values: pa.Array, ids: pa.Array, canon: np.ndarray) -> _PairIds:
        pos_arr = pc.index_in(values, value_set=ids)
        known = np.asarray(pos_arr.is_valid().to_numpy(zero_copy_only=False), bool)
        pos = as_numpy(pos_arr, np.int64)
        c = np.where(known, canon[pos] if len(canon) else -1, -1)
        # Ids that name no row (validate's business) keep a code of their own, after the row numbers.
        if known.all():
            code = c
        else:
            other = as_numpy(pc.dictionary_encode(values).indices, np.int64) + len(canon)
            code = np.where(known & (c >= 0), c, other)
        return cls(
            old=values,
            ids=ids,
            canon=c,
            gone=known & (c < 0),
            changed=known & (c >= 0) & (c != pos),
            code=code,
        )

    def new_ids(self, at: np.ndarray, *, unchanged_as_null: bool) -> pa.Array:
        """The id each pair in ``at`` names after rewriting (null where it stays, if asked)."""
        moved = self.changed[at]
        stays = (
            pa.nulls(len(at), pa.string()) if unchanged_as_null else self.old.take(pa.array(at, pa.int64()))
        )
        if not moved.any():
            return stays
        target = self.ids.take(pa.array(np.where(moved, self.canon[at], 0), pa.int64()))
        return pc.if_else(pa.array(moved), target, stays)
