"""The filter stage: keep the rows a filter expression accepts, then keep the dataset consistent.

``filter_dataset(source, out, "judge_p_yes < 0.5")`` writes a new dataset in which

1. the expression (curation.filter_expr) is applied to every table that has all the columns it
   names, or only to ``table`` when given: ``subset == 'vqa'`` filters queries and corpus,
   ``label == 'hard_negative'`` and ``judge_p_yes < 0.5`` filter pairs; rows failing it are
   dropped (not quarantined: the parent dataset still holds them, and the manifest's config records
   the expression);
2. pairs whose query or document no longer exists are dropped too (referential integrity), so
   after ``subset == 'vqa'`` only the vqa queries' pairs remain;
3. with ``prune=True`` queries and documents that no remaining pair refers to are dropped as well.

It runs as a scan/plan/apply stage (curation.shardstage): the scan evaluates the expression on each
shard (reading only the id columns and the columns the expression names) and records a keep flag
and the ids; the plan, in the driver, works out integrity and pruning from ids alone; the apply
writes each shard's kept rows. So it runs through any executor (Ray Data in the CLI) and resumes
after a kill. The counts of dropped rows per table and reason are in the manifest's
``extra['filter']``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from assay.curation import storage
from assay.curation.dataset import Dataset, DatasetError, Manifest
from assay.curation.executor import Executor
from assay.curation.filter_expr import Filter, FilterError, parse_filter
from assay.curation.schema import CORPUS, DATA_TABLES, PAIRS, QUERIES, SCHEMAS
from assay.curation.shardstage import Scan, plan_table, read_scans, run_shard_stage, split_by_shard

STAGE = "filter"

#: The id columns each table's scan keeps (for integrity and pruning).
_ID_COLUMNS = {QUERIES: ["query_id"], CORPUS: ["doc_id"], PAIRS: ["query_id", "doc_id"]}

#: Why a row was dropped (the plan's ``reason``; counted in the manifest).
REASON_FILTER = "filter"
REASON_DANGLING = "dangling"  # a pair whose query or doc was filtered out (or never existed)
REASON_UNREFERENCED = "unreferenced"  # --prune: a query or doc no remaining pair refers to


def table_schema(table: str) -> dict[str, pa.DataType]:
    """Column name -> Arrow type of one dataset table."""
    s = SCHEMAS[table]
    return dict(zip(s.names, s.types, strict=True))


def filter_targets(flt: Filter, table: str | None = None) -> tuple[str, ...]:
    """The tables the expression applies to; raises FilterError naming the columns if none.

    With ``table`` only that table (which must have every column the expression names); otherwise
    every data table that has all of them.
    """
    if table is not None:
        if table not in DATA_TABLES:
            raise FilterError(f"unknown table {table!r}; choose one of {', '.join(DATA_TABLES)}")
        flt.check(table_schema(table), where=f"table {table!r}")
        return (table,)
    targets = tuple(t for t in DATA_TABLES if flt.applies_to(SCHEMAS[t].names))
    listing = "; ".join(f"{t}: {', '.join(SCHEMAS[t].names)}" for t in DATA_TABLES)
    if not targets:
        unknown = [c for c in flt.columns if not any(c in SCHEMAS[t].names for t in DATA_TABLES)]
        if unknown:
            raise FilterError(
                f"filter expression {flt.text!r}: unknown column{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(c) for c in unknown)}; the tables' columns are {listing}"
            )
        raise FilterError(
            f"filter expression {flt.text!r}: no table has all of {', '.join(flt.columns)}; "
            f"the tables' columns are {listing}. Filter one table at a time (run filter twice)"
        )
    for t in targets:
        flt.check(table_schema(t), where=f"table {t!r}")
    return targets


def keep_mask(flt: Filter, data: pa.Table, applies: bool = True) -> pa.Array:
    """The expression's verdict on every row of ``data`` (which holds the columns it names), or all
    True where it does not apply to the table."""
    if not applies:
        return pa.array(np.ones(data.num_rows, dtype=bool))
    return flt.mask(pl.from_arrow(data)).to_arrow()


def _scan_filter(task: dict[str, Any]) -> pa.Table:
    """Scan one shard: ``row``, ``keep`` (the expression's verdict, or True where it does not
    apply) and the id columns."""
    cfg = task["config"]
    table = task["table"]
    flt = parse_filter(cfg["where"])
    targets = filter_targets(flt, cfg.get("table"))
    ids = _ID_COLUMNS[table]
    applies = table in targets
    columns = list(dict.fromkeys(ids + (list(flt.columns) if applies else [])))
    data = storage.read_table(task["src"], columns=columns)
    n = data.num_rows
    cols = {"row": pa.array(np.arange(n, dtype=np.int64)), "keep": keep_mask(flt, data, applies)}
    for c in ids:
        cols[c] = data.column(c)
    return pa.table(cols)


def _frame(scans: list[tuple[str, Scan]], table: str) -> pl.DataFrame:
    ids = _ID_COLUMNS[table]
    side = read_scans(scans) if scans else None
    if side is None or side.num_rows == 0:
        schema = {"row": pl.Int64, "keep": pl.Boolean, **{c: pl.String for c in ids}, "shard": pl.Int32}
        return pl.DataFrame(schema=schema)
    return pl.from_arrow(side.select(["row", "keep", *ids, "shard"]))


def _drop_plan(part: pa.Table) -> pa.Table:
    return plan_table(part.column("row"), "drop", part.column("reason"))


def pair_filter_reasons(p: pl.DataFrame) -> pl.DataFrame:
    """Add ``reason`` to pair rows: ``filter`` where ``keep`` is false, else ``dangling`` where
    ``q_kept`` or ``d_kept`` (whether the pair's query / doc is kept) is not true; null for kept pairs."""
    return p.with_columns(
        reason=pl.when(~pl.col("keep"))
        .then(pl.lit(REASON_FILTER))
        .when(~(pl.col("q_kept").fill_null(False) & pl.col("d_kept").fill_null(False)))
        .then(pl.lit(REASON_DANGLING))
        .otherwise(pl.lit(None, pl.String))
    )


def _plan_filter(
    scans: dict[str, list[tuple[str, Scan]]], prune: bool, report: dict[str, Any]
) -> dict[tuple[str, str], pa.Table]:
    q = _frame(scans.get(QUERIES, []), QUERIES)
    d = _frame(scans.get(CORPUS, []), CORPUS)
    p = _frame(scans.get(PAIRS, []), PAIRS)

    kept_q = q.filter(pl.col("keep"))["query_id"].unique()
    kept_d = d.filter(pl.col("keep"))["doc_id"].unique()
    p = pair_filter_reasons(
        p.with_columns(
            q_kept=pl.col("query_id").is_in(kept_q.implode()),
            d_kept=pl.col("doc_id").is_in(kept_d.implode()),
        )
    ).drop("q_kept", "d_kept")
    q = q.with_columns(
        reason=pl.when(~pl.col("keep")).then(pl.lit(REASON_FILTER)).otherwise(pl.lit(None, pl.String))
    )
    d = d.with_columns(
        reason=pl.when(~pl.col("keep")).then(pl.lit(REASON_FILTER)).otherwise(pl.lit(None, pl.String))
    )
    if prune:
        live = p.filter(pl.col("reason").is_null())
        ref_q = live["query_id"].unique().implode()
        ref_d = live["doc_id"].unique().implode()
        q = q.with_columns(
            reason=pl.when(pl.col("reason").is_null() & ~pl.col("query_id").is_in(ref_q).fill_null(False))
            .then(pl.lit(REASON_UNREFERENCED))
            .otherwise(pl.col("reason"))
        )
        d = d.with_columns(
            reason=pl.when(pl.col("reason").is_null() & ~pl.col("doc_id").is_in(ref_d).fill_null(False))
            .then(pl.lit(REASON_UNREFERENCED))
            .otherwise(pl.col("reason"))
        )

    plans: dict[tuple[str, str], pa.Table] = {}
    dropped: dict[str, dict[str, int]] = {}
    kept: dict[str, int] = {}
    for table, frame in ((QUERIES, q), (CORPUS, d), (PAIRS, p)):
        gone = frame.filter(pl.col("reason").is_not_null())
        kept[table] = frame.height - gone.height
        dropped[table] = {r: int(n) for r, n in gone.group_by("reason").len().sort("reason").iter_rows()}
        if gone.height:
            rows = gone.select("shard", "row", "reason").to_arrow()
            plans.update(split_by_shard(rows, scans[table], table, _drop_plan))
    report["kept"] = kept
    report["dropped"] = dropped
    return plans


def filter_dataset(
    source: Dataset,
    out: str | Path,
    where: str,
    *,
    table: str | None = None,
    prune: bool = False,
    executor: Executor | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write the rows of ``source`` that ``where`` accepts (plus integrity and optional pruning)
    as a new dataset at ``out``. Raises FilterError before writing anything if the expression is
    not valid for the dataset's tables."""
    flt = parse_filter(where)
    targets = filter_targets(flt, table)
    if storage.absolute(out) == storage.absolute(source.root):
        raise DatasetError("OUT must be a new folder, not the input dataset itself")
    config = {"where": flt.text, "table": table, "prune": bool(prune)}
    report: dict[str, Any] = {"where": flt.text, "applied_to": list(targets), "prune": bool(prune)}

    def plan(scans: dict[str, list[tuple[str, Scan]]]) -> dict[tuple[str, str], pa.Table]:
        return _plan_filter(scans, bool(prune), report)

    # ``report`` is filled in by the plan (in this process) before the manifest is written.
    return run_shard_stage(
        source,
        out,
        stage=STAGE,
        config=config,
        scan_fn=_scan_filter,
        plan_fn=plan,
        executor=executor,
        overwrite=overwrite,
        extra={"filter": report},
    )
