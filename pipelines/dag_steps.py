"""The functions the operators of the curation DAG (pipelines/dag.py) run: one input shard, one batch
or one hash partition at a time, each handing its rows to the curation/ function that decides them.

Column conventions: ``_t`` (table), ``_shard`` (index into the input's shard names) and ``_row`` (row in
that shard) place every row; ``v_*`` are validate's reason and detail, ``d_*`` dedup's, ``f_keep`` the
filter expression's verdict; ``q_*`` / ``d_*`` on pairs describe the row a pair's query / doc id names
(``*_canon_*``: the row dedup keeps for it), ``qc_`` / ``dc_`` the rows the judge reads, ``j_*`` the judge's
results. A decision row (``decide_items``, ``finish_pairs``) says what ``write_shard`` does with one input
row: quarantine it (``stage``, ``reason``, ``detail``), drop it (``drop``: the filter) or keep it (with
the pairs' new values).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assay.curation.dataset import PROGRESS, ShardSink, atomic_write_parquet
from assay.curation.dedup import CONFLICTS, plan_content_rows, plan_pair_rows
from assay.curation.dedup import STAGE as DEDUP
from assay.curation.dedup_scan import scan_rows, scan_shard
from assay.curation.filter import REASON_FILTER, keep_mask, pair_filter_reasons
from assay.curation.filter_expr import parse_filter
from assay.curation.judge.cache import Key
from assay.curation.judge.scoring import Score
from assay.curation.judge.stage import FAILURES_SCHEMA, JudgeReport, apply_verdicts, positive_reference
from assay.curation.judge.verdicts import VerdictRule
from assay.curation.schema import CORPUS, LABELS, PAIRS, PAIRS_SCHEMA, QUERIES, ROW_COLUMNS, SCHEMAS
from assay.curation.shardstage import PLAN_SCHEMA, apply_plan
from assay.curation.validate import STAGE as VALIDATE
from assay.curation.validate import (
    ValidateConfig,
    check_rows,
    conform_columns,
    item_decisions,
    pair_decisions,
)

STAGE = "curate"
PART, SIDE = "_part", "_side"


# ---------------------------------------------------------------------------------------------------
# settings the workers need (picklable)


@dataclass(frozen=True)
class CurateRun:
    source_root: str
    source_name: str
    data_root: str
    out: str
    depth: int  # the quarantine files' number of validate; dedup's is depth + 1
    names: dict[str, list[str]]  # table -> input shard names
    validate: ValidateConfig
    near: bool
    distance: int
    text_only: bool
    parts: int
    where: str | None = None
    targets: tuple[str, ...] = ()
    judge: bool = False
    labels: tuple[str, ...] = LABELS
    rule: VerdictRule = field(default_factory=VerdictRule)

    def shard_path(self, table: str, shard: int) -> str:
        return os.path.join(self.source_root, table, self.names[table][shard])


def conformed(table: str, raw: pa.Table) -> pa.Table | None:
    """A shard as the format's schema (what validate writes for its kept rows); None: wrong types."""
    conf, problem = conform_columns(table, raw)
    return None if problem else conf.select(SCHEMAS[table].names).cast(SCHEMAS[table])


def strings(values: Iterable[Any]) -> pa.Array:
    return pa.array(list(values), pa.string())


def in_order(t: pa.Table) -> pa.Table:
    return t.sort_by([("_shard", "ascending"), ("_row", "ascending")])


def is_null(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), bool)


def _place(shard: pa.ChunkedArray | pa.Array, row: pa.ChunkedArray | pa.Array) -> np.ndarray:
    shards = np.asarray(shard.to_numpy(zero_copy_only=False), np.int64)
    return (shards << 32) | np.asarray(row.to_numpy(zero_copy_only=False), np.int64)


def locate(t: pa.Table, shard: pa.ChunkedArray | pa.Array, row: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The indices in ``t`` (``in_order``) of the rows at (shard, row)."""
    return np.searchsorted(_place(t.column("_shard"), t.column("_row")), _place(shard, row))


# ---------------------------------------------------------------------------------------------------
# partitioned joins: hash, union, groupby(partition).map_groups


def key_frame(t: pa.Table, keys: Sequence[str], valid: np.ndarray | None = None) -> pl.DataFrame:
    """The key columns as a polars frame (k0, k1, ...; integers as Int64), null where not ``valid``."""
    cols = {}
    for i, k in enumerate(keys):
        col = t.column(k)
        if pa.types.is_signed_integer(col.type):  # positions: int32 on one side, int64 on the other
            col = col.cast(pa.int64())
        if valid is not None:
            col = pc.if_else(pa.array(valid), col, pa.scalar(None, col.type))
        cols[f"k{i}"] = col
    return (
        pl.from_arrow(pa.table(cols)) if t.num_rows else pl.DataFrame({f"k{i}": [] for i in range(len(keys))})
    )


def tag_partition(
    batch: pa.Table, keys: list[str], parts: int, side: int, valid: str | None = None
) -> pa.Table:
    """Add the partition of each row (a stable hash of its keys; rows without keys are spread)."""
    n = batch.num_rows
    ok = np.ones(n, bool)
    if valid is not None:
        ok &= np.asarray(pc.fill_null(batch.column(valid), False).to_numpy(zero_copy_only=False), bool)
    for k in keys:
        ok &= ~is_null(batch.column(k))
    part = np.arange(n, dtype=np.int64) % parts
    if ok.any():
        frame = key_frame(batch.filter(pa.array(ok)), keys)
        part[ok] = (frame.hash_rows(seed=0).to_numpy() % np.uint64(parts)).astype(np.int64)
    return batch.append_column(PART, pa.array(part)).append_column(SIDE, pa.array(np.full(n, side, np.int8)))


def attach(
    left: pa.Table,
    right: pa.Table | None,
    left_on: list[str],
    right_on: list[str],
    columns: dict[str, pa.DataType],
    prefix: str,
    valid: np.ndarray | None = None,
) -> pa.Table:
    """Left join in memory: add ``prefix + c`` for each right column ``c`` of ``columns`` (right keys
    are unique; rows not ``valid`` match nothing) and ``prefix + 'known'``, whether a row matched."""
    n = left.num_rows
    idx = np.full(n, -1, np.int64)
    if right is not None and right.num_rows and n:
        lk = key_frame(left, left_on, valid).with_row_index("li")
        rk = key_frame(right, [f"_r_{k}" for k in right_on]).with_row_index("ri")
        on = [f"k{i}" for i in range(len(left_on))]
        joined = lk.join(rk, on=on, how="left", maintain_order="left").sort("li")
        if joined.height != n:
            raise ValueError(f"join on {right_on}: the right side repeats a key")
        idx = joined.get_column("ri").fill_null(-1).to_numpy().astype(np.int64)
    known = idx >= 0
    take = pa.array(np.where(known, idx, 0), mask=~known)
    for c, typ in columns.items():
        if right is not None and right.num_rows:
            col = right.column(f"_r_{c}").take(take).cast(typ)
        else:
            col = pa.nulls(n, typ)
        left = left.append_column(prefix + c, col)
    return left.append_column(prefix + "known", pa.array(known))


# ---------------------------------------------------------------------------------------------------
# read: one task per input shard


def scan_items(task: pa.Table, run: CurateRun) -> pa.Table:
    """Row checks, dedup keys and the filter's verdict of one queries or corpus shard."""
    t, k = task.column("table")[0].as_py(), task.column("shard")[0].as_py()
    raw = pq.read_table(run.shard_path(t, k))
    checks = check_rows(t, raw, run.data_root, run.validate)
    ok = is_null(checks.column("reason"))
    conf = conformed(t, raw) if ok.any() else None
    rows = np.arange(raw.num_rows, dtype=np.int64)
    parts = []
    if conf is not None:
        good = conf.filter(pa.array(ok))
        side = scan_rows(t, good, run.data_root, run.near).drop_columns(["row"])
        if run.where and t in run.targets:
            flt = parse_filter(run.where)
            keep = keep_mask(flt, good.select(list(flt.columns)))
        else:
            keep = pa.array(np.ones(good.num_rows, bool))
        parts.append(
            side.append_column("_row", pa.array(rows[ok]))
            .append_column("reason", pa.nulls(good.num_rows, pa.string()))
            .append_column("detail", pa.nulls(good.num_rows, pa.string()))
            .append_column("content", checks.column("content").filter(pa.array(ok)))
            .append_column("f_keep", keep)
        )
    else:
        ok[:] = False
    bad = checks.filter(pa.array(~ok))
    parts.append(
        pa.table(
            {
                "id": bad.column("id"),
                "_row": pa.array(rows[~ok]),
                "reason": bad.column("reason"),
                "detail": bad.column("detail"),
            }
        )
    )
    out = pa.concat_tables(parts, promote_options="default")
    n = out.num_rows
    return (
        out.append_column("_t", strings([t] * n))
        .append_column("_shard", pa.array(np.full(n, k, np.int32)))
        .append_column("_ok", pc.is_null(out.column("reason")))
    )


def scan_pairs(task: pa.Table, run: CurateRun) -> pa.Table:
    """Row checks and the values (for the rows that pass) of one pairs shard."""
    k = task.column("shard")[0].as_py()
    raw = pq.read_table(run.shard_path(PAIRS, k))
    checks = check_rows(PAIRS, raw, run.data_root, run.validate)
    ok = is_null(checks.column("reason"))
    conf = conformed(PAIRS, raw) if ok.any() else None
    n = raw.num_rows
    if conf is None:
        conf = pa.table({f.name: pa.nulls(n, f.type) for f in PAIRS_SCHEMA})
    mask = pa.array(ok)
    # Refused rows keep no values (they may not even be UTF-8); their reason says why.
    cols = {f.name: pc.if_else(mask, conf.column(f.name), pa.scalar(None, f.type)) for f in PAIRS_SCHEMA}
    return pa.table(
        {
            "_shard": pa.array(np.full(n, k, np.int32)),
            "_row": pa.array(np.arange(n, dtype=np.int64)),
            "v_reason": checks.column("reason"),
            "v_detail": checks.column("detail"),
            "_ok": pa.array(ok),
            **cols,
        }
    )


def scan_content(task: pa.Table, run: CurateRun) -> pa.Table:
    """The rows of one queries or corpus shard as the judge reads them (ROW_COLUMNS), by position."""
    t, k = task.column("table")[0].as_py(), task.column("shard")[0].as_py()
    conf = conformed(t, pq.read_table(run.shard_path(t, k)))
    if conf is None:
        return pa.table({"_shard": pa.array([], pa.int32()), "_row": pa.array([], pa.int64())})
    n = conf.num_rows
    out = conf.select(ROW_COLUMNS[t])
    return out.append_column("_shard", pa.array(np.full(n, k, np.int32))).append_column(
        "_row", pa.array(np.arange(n, dtype=np.int64))
    )


def scan_eval(task: pa.Table, config: dict[str, Any]) -> pa.Table:
    """dedup's scan of one shard of an eval dataset (``task``: eval, table, shard, src, data_root)."""
    spec = {c: task.column(c)[0].as_py() for c in task.column_names}
    side = scan_shard({**spec, "config": config})
    n = side.num_rows
    return (
        side.append_column("eval", pa.array(np.full(n, spec["eval"], np.int64)))
        .append_column("table", strings([spec["table"]] * n))
        .append_column("shard", pa.array(np.full(n, spec["shard_index"], np.int32)))
    )


# ---------------------------------------------------------------------------------------------------
# queries and corpus: validate (duplicate ids), then dedup


def validate_ids(left: pa.Table, right: None, run: CurateRun) -> pa.Table:
    """validate's duplicate and conflicting ids of a partition by id; ``v_rep`` marks the first row
    of each conflicting id (the one row per id that tells the pairs naming it so)."""
    out = []
    for t in (QUERIES, CORPUS):
        part = in_order(left.filter(pc.equal(left.column("_t"), t)))
        if not part.num_rows:
            continue
        if "content" not in part.column_names:  # a shard none of whose rows passed the row checks
            part = part.append_column("content", pa.nulls(part.num_rows, pa.uint64()))
        frame = pl.from_arrow(part.select(["_shard", "_row", "id", "reason", "detail", "content"]))
        rejected, _, conflicting = item_decisions(
            t, frame.rename({"_shard": "shard", "_row": "row"}), run.names[t]
        )
        reason = np.array(part.column("reason").to_pylist(), dtype=object)
        detail = np.array(part.column("detail").to_pylist(), dtype=object)
        at = rejected.get_column("order").to_numpy()
        reason[at] = rejected.get_column("reason").to_list()
        detail[at] = rejected.get_column("detail").to_list()
        ids = part.column("id")
        first = np.asarray(
            pl.from_arrow(pa.table({"id": ids})).get_column("id").is_first_distinct().to_numpy(), bool
        )
        rep = first & np.asarray(pc.is_in(ids, value_set=conflicting.to_arrow().cast(pa.string())), bool)
        part = part.set_column(part.column_names.index("reason"), "reason", strings(reason))
        part = part.set_column(part.column_names.index("detail"), "detail", strings(detail))
        part = part.append_column("v_rep", pa.array(rep))
        out.append(part.set_column(part.column_names.index("_ok"), "_ok", pc.is_null(part.column("reason"))))
    return pa.concat_tables(out)


def dedup_partition(batch: pa.Table, run: CurateRun) -> pa.Table:
    """Partition rows by what dedup compares within: (table, subset, text key) with near duplicates
    on (same content implies same text), else (table, subset, content key); refused rows anywhere."""
    keys = ["_t", "_subset", "text_key"] if run.near else ["_t", "_subset", "key_a", "key_b"]
    # A null subset is a subset too: hash it as a string no subset holds.
    batch = batch.append_column("_subset", pc.fill_null(batch.column("subset"), "\0null"))
    return tag_partition(batch, keys, run.parts, side=0, valid="_ok").drop_columns(["_subset", SIDE])


_SIDE_COLUMNS = ["id", "subset", "key_a", "key_b", "text_key", "phash", "note", "has_image", "thumb", "side"]
_TARGET_COLUMNS = ["t_sig", "t_pos", "t_neg"]


def dedup_items(group: pa.Table, run: CurateRun, evals: dict[str, Any], tables: tuple[str, ...]) -> pa.Table:
    out = []
    for t in (QUERIES, CORPUS):
        part = in_order(group.filter(pc.equal(group.column("_t"), t)))
        if not part.num_rows:
            continue
        kept_mask = is_null(part.column("reason"))
        kept = part.filter(pa.array(kept_mask))
        n = kept.num_rows
        d_reason = np.full(n, None, object)
        d_detail = np.full(n, None, object)
        canon = np.zeros(0, np.int64)
        conflict = np.zeros(n, bool)
        if n:
            columns = _SIDE_COLUMNS + [c for c in _TARGET_COLUMNS if c in kept.column_names]
            side = kept.select(["_shard", "_row", *columns]).rename_columns(["shard", "row", *columns])
            ev = evals.get(t) if t in tables else None
            decisions, canon, _, conflicts = plan_content_rows(
                t, side, ev, near=run.near, distance=run.distance, text_only=run.text_only
            )
            at = locate(kept, decisions.column("shard"), decisions.column("row"))
            d_reason[at] = decisions.column("reason").to_pylist()
            d_detail[at] = decisions.column("detail").to_pylist()
            conflict[conflicts] = True
        alive = canon >= 0
        take = pa.array(np.where(alive, canon, 0), mask=~alive)
        decided = pa.table(
            {
                "_t": kept.column("_t"),
                "_shard": kept.column("_shard"),
                "_row": kept.column("_row"),
                "id": kept.column("id"),
                "v_reason": pa.nulls(n, pa.string()),
                "v_detail": pa.nulls(n, pa.string()),
                "d_reason": strings(d_reason),
                "d_detail": strings(d_detail),
                "f_keep": kept.column("f_keep"),
                "d_conflict": pa.array(conflict),
                "canon_id": kept.column("id").take(take),
                "canon_shard": kept.column("_shard").take(take),
                "canon_row": kept.column("_row").take(take),
                "canon_keep": kept.column("f_keep").take(take),
            }
        )
        refused = part.filter(pa.array(~kept_mask))
        m = refused.num_rows
        out.append(decided)
        out.append(
            pa.table(
                {
                    "_t": refused.column("_t"),
                    "_shard": refused.column("_shard"),
                    "_row": refused.column("_row"),
                    "id": refused.column("id"),
                    "v_reason": refused.column("reason"),
                    "v_detail": refused.column("detail"),
                    "d_reason": pa.nulls(m, pa.string()),
                    "d_detail": pa.nulls(m, pa.string()),
                    "f_keep": pa.nulls(m, pa.bool_()),
                    "d_conflict": pa.array(np.zeros(m, bool)),
                    "canon_id": pa.nulls(m, pa.string()),
                    "canon_shard": pa.nulls(m, pa.int32()),
                    "canon_row": pa.nulls(m, pa.int64()),
                    "canon_keep": pa.nulls(m, pa.bool_()),
                }
            )
        )
    return pa.concat_tables(out)


def id_map(batch: pa.Table, table: str) -> pa.Table:
    """The rows validate keeps of one table: id -> canonical row (null when contaminated)."""
    mine = pc.and_(pc.equal(batch.column("_t"), table), pc.is_null(batch.column("v_reason")))
    return batch.filter(mine).select(["id", "canon_id", "canon_shard", "canon_row", "canon_keep"])


# ---------------------------------------------------------------------------------------------------
# pairs


_MAP_COLUMNS = {
    "canon_id": pa.string(),
    "canon_shard": pa.int32(),
    "canon_row": pa.int64(),
    "canon_keep": pa.bool_(),
}


def _row_types(table: str) -> dict[str, pa.DataType]:
    schema = SCHEMAS[table]
    return {c: schema.field(c).type for c in ROW_COLUMNS[table]}


def join_ids(left: pa.Table, right: pa.Table | None, column: str, prefix: str) -> pa.Table:
    valid = is_null(left.column("v_reason"))
    return attach(left, right, [column], ["id"], _MAP_COLUMNS, prefix, valid)


def validate_pairs(batch: pa.Table) -> pa.Table:
    def flag(name: str) -> pa.Array:
        return pa.array(
            np.asarray(pc.fill_null(batch.column(name), False).to_numpy(zero_copy_only=False), bool)
        )

    frame = pl.from_arrow(
        pa.table(
            {
                "id": batch.column("query_id"),
                "doc_id": batch.column("doc_id"),
                "reason": batch.column("v_reason"),
                "detail": batch.column("v_detail"),
                "q_ok": flag("qv_ok"),
                "d_ok": flag("dv_ok"),
                "q_conflict": flag("qv_conflict"),
                "d_conflict": flag("dv_conflict"),
            }
        )
    )
    decided = pair_decisions(frame)
    for col, name in (("v_reason", "reason"), ("v_detail", "detail")):
        values = decided.get_column(name).to_arrow().cast(pa.string())
        batch = batch.set_column(batch.column_names.index(col), col, values)
    return batch.set_column(batch.column_names.index("_ok"), "_ok", pc.is_null(batch.column("v_reason")))


def _content_map(
    ids: pa.ChunkedArray, canon_ids: pa.ChunkedArray, gone: np.ndarray
) -> tuple[pa.Array, np.ndarray]:
    """(ids, canonical index of each) for dedup.plan_pair_rows, from the pairs' ids and canonical ids."""
    frame = pl.DataFrame({"id": pl.from_arrow(ids), "canon": pl.from_arrow(canon_ids), "gone": gone})
    per_id = frame.unique("id", keep="first", maintain_order=True)
    targets = per_id.filter(~pl.col("gone")).select(pl.col("canon").alias("id"))
    all_ids = pl.concat([per_id.select("id"), targets]).unique(maintain_order=True).get_column("id")
    id_array = all_ids.to_arrow().cast(pa.string())  # polars hands out large_string
    canon = np.arange(len(all_ids), dtype=np.int64)
    pos = {v: i for i, v in enumerate(all_ids.to_list())}
    for rid, c, g in per_id.iter_rows():
        canon[pos[rid]] = -1 if g else pos[c]
    return id_array, canon


def dedup_pairs(left: pa.Table, right: pa.Table | None, run: CurateRun) -> pa.Table:
    """dedup of the pairs of a partition by canonical query (duplicate pairs, references to removed
    rows, rewrites), then the query rows of the pairs to judge."""
    left = in_order(left)
    n = left.num_rows
    d_reason = np.full(n, None, object)
    d_detail = np.full(n, None, object)
    final_q = np.array(left.column("query_id").to_pylist(), dtype=object)
    final_d = np.array(left.column("doc_id").to_pylist(), dtype=object)
    ok = is_null(left.column("v_reason"))
    if ok.any():
        pairs = left.filter(pa.array(ok))
        q_gone = is_null(pairs.column("q_canon_shard"))
        d_gone = is_null(pairs.column("d_canon_shard"))
        content = {
            QUERIES: _content_map(pairs.column("query_id"), pairs.column("q_canon_id"), q_gone),
            CORPUS: _content_map(pairs.column("doc_id"), pairs.column("d_canon_id"), d_gone),
        }
        rows = pa.table(
            {
                "shard": pairs.column("_shard"),
                "row": pairs.column("_row"),
                "query_id": pairs.column("query_id"),
                "doc_id": pairs.column("doc_id"),
            }
        )
        decisions, _ = plan_pair_rows(rows, run.names[PAIRS], content)
        at = locate(left, decisions.column("shard"), decisions.column("row"))
        cols = ("action", "reason", "detail", "set_query_id", "set_doc_id")
        for i, action, reason, detail, sq, sd in zip(
            at.tolist(), *(decisions.column(c).to_pylist() for c in cols), strict=True
        ):
            if action == "quarantine":
                d_reason[i], d_detail[i] = reason, detail
            else:  # rewrite: the ids of the rows dedup keeps
                final_q[i] = sq if sq is not None else final_q[i]
                final_d[i] = sd if sd is not None else final_d[i]
    alive = ok & np.equal(d_reason, None)
    selected = alive & np.array([lab in run.labels for lab in left.column("label").to_pylist()], bool)
    left = (
        left.append_column("d_reason", strings(d_reason))
        .append_column("d_detail", strings(d_detail))
        .append_column("final_query_id", strings(final_q))
        .append_column("final_doc_id", strings(final_d))
        .append_column("j_selected", pa.array(selected & run.judge))
    )
    if not run.judge:
        return left
    return attach(
        left,
        right,
        ["q_canon_shard", "q_canon_row"],
        ["_shard", "_row"],
        _row_types(QUERIES),
        "qc_",
        selected,
    )


def attach_docs(left: pa.Table, right: pa.Table | None) -> pa.Table:
    valid = np.asarray(left.column("j_selected").to_numpy(zero_copy_only=False), bool)
    return attach(
        left, right, ["d_canon_shard", "d_canon_row"], ["_shard", "_row"], _row_types(CORPUS), "dc_", valid
    )


# ---------------------------------------------------------------------------------------------------
# verdicts and the filter, then one decision row per pair


def finish_pairs(left: pa.Table, right: None = None, *, run: CurateRun) -> pa.Table:
    n = left.num_rows
    ok = is_null(left.column("v_reason")) & is_null(left.column("d_reason"))
    values = {f.name: left.column(f.name) for f in PAIRS_SCHEMA}
    values["query_id"], values["doc_id"] = left.column("final_query_id"), left.column("final_doc_id")
    table = pa.table(values).cast(PAIRS_SCHEMA)
    fallback = np.zeros(n, bool)
    judged = np.asarray(pc.fill_null(left.column("j_selected"), False).to_numpy(zero_copy_only=False), bool)
    if run.judge and judged.any():
        rows = np.flatnonzero(judged).tolist()
        keys = [
            Key(q, d, c)
            for q, d, c in zip(
                *(
                    left.column(c).take(rows).to_pylist()
                    for c in ("final_query_id", "final_doc_id", "j_content")
                ),
                strict=True,
            )
        ]
        margins, errors = (left.column(c).take(rows).to_pylist() for c in ("j_margin", "j_error"))
        scores = [Score(margin=m, error=e) for m, e in zip(margins, errors, strict=True)]
        labels = table.column("label").take(rows).to_pylist()
        positive_p = positive_reference(labels, keys, scores, {}) if run.rule.needs_positive else {}
        report = JudgeReport(model_id="", rule=str(run.rule))
        table, _ = apply_verdicts(
            table, rows, keys, [None] * len(rows), scores, positive_p, run.rule, True, report
        )
        if run.rule.needs_positive:
            for r, key, score in zip(rows, keys, scores, strict=True):
                fallback[r] = score.ok and key.query_id not in positive_p
    drop = np.full(n, None, object)
    if run.where and ok.any():
        flt = parse_filter(run.where)
        alive = table.filter(pa.array(ok))
        applies = PAIRS in run.targets
        keep = keep_mask(flt, alive.select(list(flt.columns)) if applies else alive, applies)
        frame = pl.from_arrow(
            pa.table(
                {
                    "keep": keep,
                    "q_kept": left.column("q_canon_keep").filter(pa.array(ok)),
                    "d_kept": left.column("d_canon_keep").filter(pa.array(ok)),
                }
            )
        )
        drop[ok] = np.array(pair_filter_reasons(frame).get_column("reason").to_list(), dtype=object)
    v_reason = left.column("v_reason").to_pylist()
    stage = [
        VALIDATE if v is not None else (DEDUP if d is not None else None)
        for v, d in zip(v_reason, left.column("d_reason").to_pylist(), strict=True)
    ]
    reason = pc.coalesce(left.column("v_reason"), left.column("d_reason"))
    detail = pc.coalesce(left.column("v_detail"), left.column("d_detail"))
    return pa.table(
        {
            "_t": strings([PAIRS] * n),
            "_shard": left.column("_shard"),
            "_row": left.column("_row"),
            "stage": strings(stage),
            "reason": reason,
            "detail": detail,
            "drop": strings(drop),
            "query_id": table.column("query_id"),
            "doc_id": table.column("doc_id"),
            "judged": pa.array(judged),
            "label": table.column("label"),
            "judge_p_yes": table.column("judge_p_yes"),
            "judge_verdict": table.column("judge_verdict"),
            "j_error": left.column("j_error") if run.judge else pa.nulls(n, pa.string()),
            "j_cached": left.column("j_cached") if run.judge else pa.nulls(n, pa.bool_()),
            "j_prompt": left.column("j_prompt") if run.judge else pa.nulls(n, pa.string()),
            "j_fallback": pa.array(fallback),
            "j_relabelled": pc.and_(
                pa.array(judged), pc.not_equal(left.column("label"), table.column("label"))
            ),
            "conflict": pa.array(np.zeros(n, bool)),
        }
    )


def decide_items(batch: pa.Table, run: CurateRun) -> pa.Table:
    n = batch.num_rows
    v, d = batch.column("v_reason").to_pylist(), batch.column("d_reason").to_pylist()
    stage = [
        VALIDATE if a is not None else (DEDUP if b is not None else None) for a, b in zip(v, d, strict=True)
    ]
    keep = batch.column("f_keep").to_pylist()
    tables = batch.column("_t").to_pylist()
    drop = [
        REASON_FILTER if run.where and s is None and t in run.targets and k is False else None
        for s, t, k in zip(stage, tables, keep, strict=True)
    ]
    return pa.table(
        {
            "_t": batch.column("_t"),
            "_shard": batch.column("_shard"),
            "_row": batch.column("_row"),
            "stage": strings(stage),
            "reason": pc.coalesce(batch.column("v_reason"), batch.column("d_reason")),
            "detail": pc.coalesce(batch.column("v_detail"), batch.column("d_detail")),
            "drop": strings(drop if n else []),
            "conflict": pc.fill_null(batch.column("d_conflict"), False),
        }
    )


# ---------------------------------------------------------------------------------------------------
# write: one output shard per input shard


def _plan(rows: pa.Table, mask: np.ndarray) -> pa.Table:
    part = rows.filter(pa.array(mask))
    m = part.num_rows
    return pa.table(
        {
            "row": part.column("_row"),
            "action": strings(["quarantine"] * m),
            "reason": part.column("reason"),
            "detail": part.column("detail"),
            "set_query_id": pa.nulls(m, pa.string()),
            "set_doc_id": pa.nulls(m, pa.string()),
        },
        schema=PLAN_SCHEMA,
    )


def write_shard(group: pa.Table, run: CurateRun) -> pa.Table:
    t, k = group.column("_t")[0].as_py(), group.column("_shard")[0].as_py()
    name = run.names[t][k]
    sink = ShardSink(run.out, STAGE, run.depth)
    if sink.is_done(t, name):
        return pa.table({"marker": [sink.marker(t, name).read_text()]})
    rows = group.sort_by("_row")
    raw = pq.read_table(run.shard_path(t, k))
    if rows.num_rows != raw.num_rows or rows.column("_row").to_pylist() != list(range(raw.num_rows)):
        raise RuntimeError(f"curate: {t}/{name} has {raw.num_rows} rows but {rows.num_rows} decisions")
    stage = np.array(rows.column("stage").to_pylist(), dtype=object)
    source = f"{run.source_name}/{t}/{name}"
    reasons: Counter[str] = Counter()
    quarantined = 0
    for depth, step, table in ((run.depth, VALIDATE, raw), (run.depth + 1, DEDUP, None)):
        mask = stage == step
        if not mask.any():
            continue
        shard = table if table is not None else conformed(t, raw)
        _, refused = apply_plan(shard, _plan(rows, mask), t, step, source)
        atomic_write_parquet(ShardSink(run.out, step, depth).quarantine_path(t, name), refused)
        quarantined += refused.num_rows
        reasons.update(f"{step}:{r}" for r in refused.column("reason").to_pylist())
    drop = np.array(rows.column("drop").to_pylist(), dtype=object)
    keep = np.equal(stage, None) & np.equal(drop, None)
    stats: dict[str, Any] = {
        "kept": int(keep.sum()),
        "dropped": dict(Counter(d for d in drop.tolist() if d is not None)),
    }
    conflicts = int(pc.sum(rows.column("conflict")).as_py() or 0)
    if conflicts:  # dedup: near copies whose targets disagree, kept (curation.dedup_targets)
        stats[CONFLICTS] = conflicts
    data = None
    if keep.any():
        data = conformed(t, raw)
        if t == PAIRS:
            data = _pair_values(data, rows)
            stats |= _judge_stats(rows, run, name)
        data = data.filter(pa.array(keep))
    elif t == PAIRS:
        stats |= _judge_stats(rows, run, name)
    marker = sink.write_shard(
        t, name, data, None, {"quarantined": quarantined, "reasons": dict(reasons), **stats}
    )
    return pa.table({"marker": [json.dumps(marker)]})


def _pair_values(data: pa.Table, rows: pa.Table) -> pa.Table:
    """The pairs' values after dedup's rewrites and the judge's verdicts (for every row; the caller keeps
    the live ones)."""
    judged = pa.array(
        np.asarray(pc.fill_null(rows.column("judged"), False).to_numpy(zero_copy_only=False), bool)
    )
    for col in ("query_id", "doc_id"):
        data = data.set_column(
            data.column_names.index(col), col, pc.coalesce(rows.column(col), data.column(col))
        )
    for col in ("label", "judge_p_yes", "judge_verdict"):
        typ = data.schema.field(col).type
        data = data.set_column(
            data.column_names.index(col),
            col,
            pc.if_else(judged, rows.column(col).cast(typ), data.column(col)),
        )
    return data


def _judge_stats(rows: pa.Table, run: CurateRun, name: str) -> dict[str, Any]:
    """The judge's counts of one pairs shard; its failures go to _progress/ until the run finishes."""
    if not run.judge:
        return {}
    judged = np.asarray(pc.fill_null(rows.column("judged"), False).to_numpy(zero_copy_only=False), bool)
    j = rows.filter(pa.array(judged))
    ok = [p is not None for p in j.column("judge_p_yes").to_pylist()]  # a failed judgment has no p_yes
    verdicts = Counter(v for v, good in zip(j.column("judge_verdict").to_pylist(), ok, strict=True) if good)
    cached = j.column("j_cached").to_pylist()
    failed = [i for i, good in enumerate(ok) if not good]
    if failed:
        f = j.take(failed)
        table = pa.table(
            {
                "query_id": f.column("query_id"),
                "doc_id": f.column("doc_id"),
                "label": f.column("label"),
                "error": f.column("j_error"),
            },
            schema=FAILURES_SCHEMA,
        )
        atomic_write_parquet(Path(run.out) / PROGRESS / "judge_failures" / name, table)
    return {
        "judge": {
            "selected": j.num_rows,
            "scored": sum(1 for c in cached if c is False),
            "cached": sum(1 for c in cached if c is True),
            "failed": len(failed),
            "verdicts": dict(verdicts),
            "relabelled": int(pc.sum(j.column("j_relabelled")).as_py() or 0),
            "positives_judged_no": sum(
                1
                for lab, v in zip(
                    j.column("label").to_pylist(), j.column("judge_verdict").to_pylist(), strict=True
                )
                if lab == "positive" and v == "no"
            ),
            "unime_fallbacks": int(pc.sum(j.column("j_fallback")).as_py() or 0),
            "prompts": sorted({p for p in j.column("j_prompt").to_pylist() if p}),
        }
    }
