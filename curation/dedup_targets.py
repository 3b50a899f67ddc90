"""What the pairs say a row is about: dedup never folds two near copies whose targets disagree.

Folding a near duplicate rewrites its pairs onto the kept row, so "X matches Y" becomes "X' matches Y".
That is only true when X and X' do not differ in what matters to their pairs. The pairs themselves
say when they do:

* a query's targets are the documents of its ``positive`` pairs (by content: subset, normalised text
  and image bytes, so a document stored twice under two ids is one target). Two near-copy queries
  disagree when those sets differ: the same question about two near-identical pictures with answers
  "yes" and "no" (or "brown" and "green") is a conflict in the data, not a copy to drop. Dedup puts
  the set's hash (``t_sig``) in the group it compares within, so such rows are never folded, and
  counts them (``near_duplicate_conflicts``, with examples, in the stage's stats).
* a document's targets are the queries that name it. Different queries naming two near-identical
  pictures is the normal case (each caption names its own copy of a photo), not a disagreement:
  folding makes both queries name one copy, which is what they meant. Two documents disagree only
  when the pairs tell them apart: one query calls one of them relevant (``positive`` or
  ``false_negative``) and the other irrelevant (``negative`` or ``hard_negative``). Such a pair is
  refused as near (``contradicts``) and counted as a conflict.

Exact duplicates (the same content) are folded whatever their pairs say: their pairs all state
something about that very content.

Everything here works on 64-bit keys: ``item_keys`` gives each row of queries or corpus its content
identity, ``targets_by_owner`` turns (owner id, target key, relevant?, irrelevant?) rows into one row
per owner: ``t_sig`` (the hash of its relevant set, 0 for none), ``t_pos`` and ``t_neg`` (sorted key
lists); the dedup scan table of a table gets these columns by id (``attach_targets``).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation.hamming import _mix

RELEVANT = ("positive", "false_negative")
IRRELEVANT = ("negative", "hard_negative")
TARGET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("t_sig", pa.uint64()),
        pa.field("t_pos", pa.list_(pa.uint64())),
        pa.field("t_neg", pa.list_(pa.uint64())),
    ]
)
_SALT = np.uint64(0x2545F4914F6CDD1D)


def item_keys(subset: pa.Array | pa.ChunkedArray, key_a: np.ndarray, key_b: np.ndarray) -> np.ndarray:
    """The content identity of rows (subset + the 16-byte content key) as one uint64 each."""
    codes = _strings(subset).fill_null("\0null").hash(seed=0).to_numpy().astype(np.uint64)
    return _mix(_mix(codes ^ _mix(np.asarray(key_a, np.uint64))) ^ np.asarray(key_b, np.uint64))


def set_hash(owner: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One nonzero uint64 per run of equal ``owner`` (sorted) over its (unique) ``values``: the same
    set gives the same hash in any order."""
    if not len(owner):
        return np.zeros(0, np.uint64)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    sums = np.add.reduceat(_mix(values ^ _SALT), starts)
    counts = np.diff(np.r_[starts, len(owner)]).astype(np.uint64)
    sig = _mix(sums ^ _mix(counts))
    sig[sig == 0] = 1
    return sig


def targets_by_owner(
    owner: pa.Array | pa.ChunkedArray, value: np.ndarray, relevant: np.ndarray, irrelevant: np.ndarray
) -> pa.Table:
    """One row per owner id (``TARGET_SCHEMA``, sorted by id) from one row per (owner, target) pair."""
    frame = pl.DataFrame(
        {
            "id": _strings(owner),
            "v": pl.Series(np.asarray(value, np.uint64), dtype=pl.UInt64),
            "pos": np.asarray(relevant, bool),
            "neg": np.asarray(irrelevant, bool),
        }
    ).filter(pl.col("pos") | pl.col("neg"))
    if frame.height == 0:
        return TARGET_SCHEMA.empty_table()

    def lists(flag: str, name: str) -> pl.DataFrame:
        return (
            frame.filter(pl.col(flag))
            .select("id", "v")
            .unique()
            .sort("id", "v")
            .group_by("id", maintain_order=True)
            .agg(pl.col("v").alias(name))
        )

    pos, neg = lists("pos", "t_pos"), lists("neg", "t_neg")
    out = pos.join(neg, on="id", how="full", coalesce=True).sort("id")
    t_pos = out.get_column("t_pos").to_arrow().cast(pa.list_(pa.uint64()))
    t_neg = out.get_column("t_neg").to_arrow().cast(pa.list_(pa.uint64()))
    filled = pc.fill_null(t_pos, pa.scalar([], pa.list_(pa.uint64())))
    lengths = np.asarray(pc.list_value_length(filled).to_numpy(zero_copy_only=False), np.int64)
    flat = np.asarray(pc.list_flatten(filled).to_numpy(zero_copy_only=False), np.uint64)
    sig = np.zeros(out.height, np.uint64)
    has = lengths > 0
    sig[has] = set_hash(np.repeat(np.arange(out.height), lengths), flat)
    return pa.table(
        {
            "id": out.get_column("id").to_arrow().cast(pa.string()),
            "t_sig": pa.array(sig, pa.uint64()),
            "t_pos": filled,
            "t_neg": pc.fill_null(t_neg, pa.scalar([], pa.list_(pa.uint64()))),
        },
        schema=TARGET_SCHEMA,
    )


def pair_targets(
    pairs: pa.Table,
    queries: tuple[pa.Array, np.ndarray],
    corpus: tuple[pa.Array, np.ndarray],
) -> dict[str, pa.Table]:
    """The targets of queries and of corpus rows (``TARGET_SCHEMA`` each) from pairs (query_id, doc_id,
    label) and the (ids, ``item_keys``) of both tables. Pairs naming an id that no row has are left
    out (validate refuses them)."""
    q_ids, q_keys = queries
    c_ids, c_keys = corpus
    q_pos = pc.index_in(pairs.column("query_id"), value_set=q_ids)
    d_pos = pc.index_in(pairs.column("doc_id"), value_set=c_ids)
    known = pc.and_(pc.is_valid(q_pos), pc.is_valid(d_pos))
    t = pa.table({"q": q_pos, "d": d_pos, "label": pairs.column("label")}).filter(known)
    q = np.asarray(t.column("q").to_numpy(zero_copy_only=False), np.int64)
    d = np.asarray(t.column("d").to_numpy(zero_copy_only=False), np.int64)
    relevant = np.asarray(pc.is_in(t.column("label"), pa.array(RELEVANT)).to_numpy(zero_copy_only=False))
    irrelevant = np.asarray(pc.is_in(t.column("label"), pa.array(IRRELEVANT)).to_numpy(zero_copy_only=False))
    positive = np.asarray(pc.equal(t.column("label"), "positive").to_numpy(zero_copy_only=False), bool)
    return {
        # a query's signature is over its positive (gold) documents only
        "queries": targets_by_owner(q_ids.take(pa.array(q)), c_keys[d], positive, np.zeros(len(q), bool)),
        "corpus": targets_by_owner(c_ids.take(pa.array(d)), q_keys[q], relevant, irrelevant),
    }


def attach_targets(side: pa.Table, targets: pa.Table | None) -> pa.Table:
    """``side`` (a dedup scan table with ``id``) with ``t_sig``, ``t_pos`` and ``t_neg`` of its rows'
    ids (0 and empty lists for ids without targets)."""
    n = side.num_rows
    empty = pa.scalar([], pa.list_(pa.uint64()))
    if targets is None or targets.num_rows == 0 or n == 0:
        cols = {"t_sig": pa.array(np.zeros(n, np.uint64)), "t_pos": empty_lists(n), "t_neg": empty_lists(n)}
    else:
        at = pc.index_in(side.column("id"), value_set=targets.column("id"))
        cols = {
            "t_sig": pc.fill_null(targets.column("t_sig").take(at), 0),
            "t_pos": pc.fill_null(targets.column("t_pos").take(at), empty),
            "t_neg": pc.fill_null(targets.column("t_neg").take(at), empty),
        }
    for name in ("t_sig", "t_pos", "t_neg"):
        if name in side.column_names:
            side = side.drop_columns([name])
    for name, col in cols.items():
        side = side.append_column(name, col)
    return side


def empty_lists(n: int) -> pa.Array:
    """``n`` empty list<uint64> values (built from offsets: no Python list per row)."""
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.uint64()))


class Contradictions:
    """Which pairs of corpus rows a query tells apart (relevant to one, irrelevant to the other)."""

    def __init__(self, t_pos: pa.Array | pa.ChunkedArray, t_neg: pa.Array | pa.ChunkedArray):
        self.pos_off, self.pos_val = _csr(t_pos)
        neg_off, neg_val = _csr(t_neg)
        self.has_neg = np.diff(neg_off) > 0
        rows = np.repeat(np.arange(len(neg_off) - 1, dtype=np.uint64), np.diff(neg_off))
        self.neg_keys = np.sort(_mix(_mix(rows) ^ neg_val))
        self.any = bool(len(neg_val))

    def has_targets(self) -> np.ndarray:
        return (np.diff(self.pos_off) > 0) | self.has_neg

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether rows a[k] and b[k] are told apart by some query, per k."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        out = np.zeros(len(a), bool)
        if not self.any or not len(a):
            return out
        for x, y in ((a, b), (b, a)):
            lengths = self.pos_off[x + 1] - self.pos_off[x]
            k = np.repeat(np.arange(len(x)), lengths)
            if not len(k):
                continue
            starts = np.repeat(self.pos_off[x], lengths)
            within = np.arange(len(k)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            values = self.pos_val[starts + within]
            keys = _mix(_mix(y[k].astype(np.uint64)) ^ values)
            at = np.minimum(np.searchsorted(self.neg_keys, keys), max(len(self.neg_keys) - 1, 0))
            hit = self.neg_keys[at] == keys if len(self.neg_keys) else np.zeros(len(keys), bool)
            out[np.unique(k[hit])] = True
        return out


def _strings(col: pa.Array | pa.ChunkedArray) -> pl.Series:
    col = col.cast(pa.string()) if isinstance(col, pa.Array | pa.ChunkedArray) else pa.array(col, pa.string())
    return pl.Series("s", col, dtype=pl.String)


def _csr(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list<uint64> column (nulls as empty lists)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks else pa.array([], pa.list_(pa.uint64()))
    lists = pc.fill_null(lists, pa.scalar([], pa.list_(pa.uint64())))
    lengths = np.asarray(pc.list_value_length(lists).to_numpy(zero_copy_only=False), np.int64)
    values = np.asarray(pc.list_flatten(lists).to_numpy(zero_copy_only=False), np.uint64)
    return np.r_[0, np.cumsum(lengths)].astype(np.int64), values
