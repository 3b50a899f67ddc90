"""The curation DAG's validate-then-targets steps (pipelines/dag.py): what validate says of each id,
for the pairs (``valid_map``, ``join_valid``), and what the validated pairs say each query and
document is about, for dedup (``pair_target_rows``, ``item_targets``: curation.dedup_targets)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation.dedup_targets import IRRELEVANT, RELEVANT, attach_targets, item_keys, targets_by_owner
from assay.curation.schema import CORPUS, QUERIES
from assay.pipelines.dag_steps import attach, is_null, strings


def valid_map(batch: pa.Table, table: str) -> pa.Table:
    """What validate says of the ids of one table, for the pairs: a kept row's id (``ok``, its
    ``ckey``: the content identity, curation.dedup_targets.item_keys) or a conflicting id's first
    row (``conflict``)."""
    batch = batch.filter(pc.equal(batch.column("_t"), table))
    for name, typ in (
        ("v_rep", pa.bool_()),
        ("key_a", pa.uint64()),
        ("key_b", pa.uint64()),
        ("subset", pa.string()),
    ):
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, typ))
    ok = is_null(batch.column("reason"))
    rep = np.asarray(pc.fill_null(batch.column("v_rep"), False).to_numpy(zero_copy_only=False), bool)
    batch = batch.filter(pa.array(ok | rep))
    ok = is_null(batch.column("reason"))
    a, b = (
        np.asarray(pc.fill_null(batch.column(c), 0).to_numpy(zero_copy_only=False), np.uint64)
        for c in ("key_a", "key_b")
    )
    return pa.table(
        {
            "id": batch.column("id"),
            "ok": pa.array(ok),
            "conflict": pa.array(~ok),
            "ckey": pa.array(item_keys(batch.column("subset"), a, b), pa.uint64()),
        }
    )


def item_targets(left: pa.Table, right: pa.Table | None) -> pa.Table:
    """The item rows of a partition by (table, id) with their targets (``t_sig``, ``t_pos``,
    ``t_neg``: curation.dedup_targets) from the target rows of the pairs (``pair_target_rows``)."""
    out = []
    for t in (QUERIES, CORPUS):
        part = left.filter(pc.equal(left.column("_t"), t))
        if not part.num_rows:
            continue
        targets = None
        if right is not None:
            mine = right.filter(pc.equal(right.column("_r__t"), t))
            if mine.num_rows:
                targets = targets_by_owner(
                    mine.column("_r_id"),
                    np.asarray(mine.column("_r_v").to_numpy(zero_copy_only=False), np.uint64),
                    np.asarray(mine.column("_r_rel").to_numpy(zero_copy_only=False), bool),
                    np.asarray(mine.column("_r_irr").to_numpy(zero_copy_only=False), bool),
                )
        out.append(attach_targets(part, targets))
    return pa.concat_tables(out) if out else left


def pair_target_rows(batch: pa.Table) -> pa.Table:
    """Of every pair validate keeps, one row for its query (the document's content identity, if
    positive) and one for its document (the query's, relevant or irrelevant): curation.dedup_targets."""
    batch = batch.filter(is_null(batch.column("v_reason")))
    label = batch.column("label")
    n = batch.num_rows
    positive = np.asarray(
        pc.fill_null(pc.equal(label, "positive"), False).to_numpy(zero_copy_only=False), bool
    )
    rel = np.asarray(pc.is_in(label, pa.array(RELEVANT)).to_numpy(zero_copy_only=False), bool)
    irr = np.asarray(pc.is_in(label, pa.array(IRRELEVANT)).to_numpy(zero_copy_only=False), bool)
    return pa.table(
        {
            "_t": strings([QUERIES] * n + [CORPUS] * n),
            "id": pa.concat_arrays(
                [batch.column("query_id").combine_chunks(), batch.column("doc_id").combine_chunks()]
            ).cast(pa.string()),
            "v": pa.concat_arrays(
                [batch.column("dv_ckey").combine_chunks(), batch.column("qv_ckey").combine_chunks()]
            ).cast(pa.uint64()),
            "rel": pa.array(np.r_[positive, rel]),
            "irr": pa.array(np.r_[np.zeros(n, bool), irr]),
        }
    )


_VALID_COLUMNS = {"ok": pa.bool_(), "conflict": pa.bool_(), "ckey": pa.uint64()}


def join_valid(left: pa.Table, right: pa.Table | None, column: str, prefix: str) -> pa.Table:
    """What validate says of the id in ``column`` (``valid_map``): ``<prefix>ok``, ``conflict``, ``ckey``."""
    valid = is_null(left.column("v_reason"))
    return attach(left, right, [column], ["id"], _VALID_COLUMNS, prefix, valid)
