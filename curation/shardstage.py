"""Scan, plan, apply: the shape of every stage that maps a dataset to a dataset shard for shard.

1. **scan** (per shard, in parallel): read one input shard and write a small side table with a
   ``row`` column and whatever the stage needs to decide (ids, hashes, per-row verdicts). Expensive
   per-row work (decoding images, hashing) happens here, once.
2. **plan** (once, in the driver): read the side tables (ids and hashes only, never content) and
   decide what happens to each row that is not simply kept: ``quarantine`` (with a reason),
   ``drop`` (silently: an exact copy, or a filter) or ``rewrite`` (``set_<column>`` values).
   Global decisions (duplicate ids, pairs naming unknown ids) can only be made here.
3. **apply** (per shard, in parallel): read the shard, follow its plan (carried in the task), write
   the kept rows and the quarantined ones, each file atomically, then the shard's completion marker.

Scan files and markers live under ``_progress/``. A scan task also hands its side table back to the
driver, which plans from those and reads back only the scans of an earlier, killed attempt (on an
object store, every side table written and read again cost two requests). A rerun after a kill at
any moment skips finished scans and applied shards and recomputes the (deterministic) plan, so it
ends with the same output as a run that was never interrupted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.dataset import (
    AlreadyComplete,
    Dataset,
    DatasetWriter,
    Manifest,
    ShardSink,
    atomic_write_parquet,
)
from assay.curation.executor import Executor, LocalExecutor
from assay.curation.quarantine import QuarantineBuilder
from assay.curation.schema import DATA_TABLES, ID_COLUMN

PLAN_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("action", pa.string()),  # quarantine | drop | rewrite
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("set_query_id", pa.string()),
        pa.field("set_doc_id", pa.string()),
    ]
)


def plan_table(
    row: pa.Array | pa.ChunkedArray,
    action: str,
    reason: pa.Array | pa.ChunkedArray | list[str | None],
    detail: pa.Array | pa.ChunkedArray | list[str | None] | None = None,
    *,
    set_query_id: pa.Array | None = None,
    set_doc_id: pa.Array | None = None,
) -> pa.Table:
    """Plan rows (``PLAN_SCHEMA``): the row of each decided row of a shard, what to do (quarantine,
    drop, rewrite) and why, and the ids a rewrite sets. Every stage builds its plans here."""
    n = len(row)

    def strings(values: Any) -> pa.Array | pa.ChunkedArray:
        if values is None:
            return pa.nulls(n, pa.string())
        return (
            values.cast(pa.string())
            if isinstance(values, pa.Array | pa.ChunkedArray)
            else pa.array(values, pa.string())
        )

    return pa.table(
        {
            "row": row.cast(pa.int64())
            if isinstance(row, pa.Array | pa.ChunkedArray)
            else pa.array(row, pa.int64()),
            "action": pa.array([action] * n, pa.string()),
            "reason": strings(reason),
            "detail": strings(detail),
            "set_query_id": strings(set_query_id),
            "set_doc_id": strings(set_doc_id),
        },
        schema=PLAN_SCHEMA,
    )


#: scan(task) -> side table with a ``row`` column. The task has table, shard, src, data_root, config.
ScanFn = Callable[[dict[str, Any]], pa.Table]
#: One shard's scan: its side table when this run scanned it, else the path of the file an earlier
#: attempt wrote (``read_scans`` takes either).
Scan = pa.Table | Path
#: plan(scans) -> {(table, shard): plan table}; scans maps table -> [(shard, scan)].
PlanFn = Callable[[dict[str, list[tuple[str, Scan]]]], dict[tuple[str, str], pa.Table]]


def _scan_task(task: dict[str, Any], scan_fn: ScanFn) -> dict[str, Any]:
    side = scan_fn(task)
    if "row" not in side.column_names:
        raise ValueError(f"scan of {task['table']}/{task['shard']} returned no 'row' column")
    atomic_write_parquet(task["scan_out"], side)  # for a rerun after a kill; this run plans from `side`
    return {"table": task["table"], "shard": task["shard"], "rows": side.num_rows, "side": side}


def _cell(col: pa.ChunkedArray, i: int) -> Any:
    try:
        return col[i].as_py()
    except UnicodeDecodeError:  # a string cell that is not UTF-8: keep its bytes, exactly
        return col.slice(i, 1).combine_chunks().view(pa.binary())[0].as_py()


def _row_dict(table: pa.Table, i: int) -> dict[str, Any]:
    return {name: _cell(table.column(name), i) for name in table.column_names}


def apply_plan(
    shard: pa.Table,
    plan: pa.Table | None,
    table: str,
    stage: str,
    source: str,
) -> tuple[pa.Table, pa.Table]:
    """Split one shard into kept rows (rewrites applied) and a quarantine table, following its plan."""
    qb = QuarantineBuilder(table, stage, source)
    if plan is None or plan.num_rows == 0:
        return shard, qb.to_table()
    n = shard.num_rows
    keep = np.ones(n, dtype=bool)
    rows = plan.column("row").to_numpy()
    actions = plan.column("action").to_pylist()
    reasons = plan.column("reason").to_pylist()
    details = plan.column("detail").to_pylist()
    rewrites: dict[str, dict[int, str]] = {"query_id": {}, "doc_id": {}}
    id_col = ID_COLUMN.get(table)
    for j, (r, action) in enumerate(zip(rows, actions, strict=True)):
        r = int(r)
        if not 0 <= r < n:
            raise ValueError(f"plan for {source} names row {r}, but the shard has {n} rows")
        if action == "quarantine":
            if keep[r]:
                row = _row_dict(shard, r)
                rid = row.get(id_col) if id_col else f"{row.get('query_id')}->{row.get('doc_id')}"
                qb.add(
                    row,
                    reasons[j] or "unspecified",
                    details[j] or "",
                    id=None if rid is None else str(rid),
                    location=f"{source}#row={r}",
                )
            keep[r] = False
        elif action == "drop":
            keep[r] = False
        elif action == "rewrite":
            for col in ("query_id", "doc_id"):
                v = plan.column(f"set_{col}")[j].as_py()
                if v is not None:
                    rewrites[col][r] = v
        else:
            raise ValueError(f"unknown plan action {action!r} for {source} row {r}")
    out = shard
    for col, mapping in rewrites.items():
        if mapping and col in out.column_names:
            values = out.column(col).to_pylist()
            for r, v in mapping.items():
                values[r] = v
            out = out.set_column(
                out.column_names.index(col), col, pa.array(values, out.schema.field(col).type)
            )
    kept = out.filter(pa.array(keep)) if not keep.all() else out
    return kept, qb.to_table()


def _apply_task(task: dict[str, Any]) -> dict[str, Any]:
    sink = ShardSink(**task["sink"])
    shard = storage.read_table(task["src"])
    plan = task["plan"]  # None: the shard has no plan
    kept, quarantine = apply_plan(shard, plan, task["table"], sink.stage, f"{task['source_name']}")
    return sink.write_shard(task["table"], task["shard"], kept, quarantine)


def run_shard_stage(
    source: Dataset,
    out: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    scan_fn: ScanFn,
    plan_fn: PlanFn,
    executor: Executor | None = None,
    overwrite: bool = False,
    tables: tuple[str, ...] = DATA_TABLES,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Run a scan/plan/apply stage from ``source`` into a new dataset at ``out``; resumable."""
    executor = executor or LocalExecutor()
    source.check_shards()
    try:
        writer = DatasetWriter(
            out,
            stage=stage,
            config=config,
            parents=[source],
            data_root=storage.absolute(source.data_root),
            overwrite=overwrite,
        )
    except AlreadyComplete as done:
        return done.manifest
    progress = writer.progress_dir
    shards = {t: source.shards(t) for t in tables}

    # What a killed run finished is found by one listing each of the scans and the shard markers, not
    # an exists() per shard: on an object store each of those is a request or two (HEAD, then LIST).
    scanned = set(storage.files_under(progress / "scan"))
    scan_tasks = []
    scans: dict[str, list[tuple[str, Scan]]] = {}
    for t in tables:
        scans[t] = []
        for name in shards[t]:
            scan_out = progress / "scan" / t / name
            scans[t].append((name, scan_out))
            if f"{t}/{name}" not in scanned:
                scan_tasks.append(
                    {
                        "table": t,
                        "shard": name,
                        "src": str(source.shard_path(t, name)),
                        "source_name": f"{source.root.name}/{t}/{name}",
                        "data_root": storage.absolute(source.data_root),
                        "config": config,
                        "scan_out": str(scan_out),
                    }
                )
    if scan_tasks:
        results = executor.map(
            functools.partial(_scan_task, scan_fn=scan_fn), scan_tasks, desc=f"{stage}: scan"
        )
        sides = {(r["table"], r["shard"]): r["side"] for r in results}
        scans = {
            t: [(name, sides.get((t, name), scan)) for name, scan in entries] for t, entries in scans.items()
        }

    # Plans are small (the rows that are not simply kept) and deterministic: they travel inside the
    # apply tasks and a rerun recomputes them, so they are never stored.
    plans = {key: plan for key, plan in plan_fn(scans).items() if plan is not None and plan.num_rows}

    done = set(storage.files_under(progress / "done", ".json"))
    apply_tasks = [
        {
            "sink": vars(writer.sink),
            "table": t,
            "shard": name,
            "src": str(source.shard_path(t, name)),
            "plan": plans[(t, name)].sort_by("row") if (t, name) in plans else None,
            "source_name": f"{source.root.name}/{t}/{name}",
        }
        for t in tables
        for name in shards[t]
        if f"{t}/{name}.json" not in done  # writer.is_done(t, name), from the one listing
    ]
    written = executor.map(_apply_task, apply_tasks, desc=f"{stage}: write") if apply_tasks else []
    return writer.finish(extra=extra, written=written)


def read_scans(scans: list[tuple[str, Scan]], columns: list[str] | None = None) -> pa.Table:
    """Concatenate one table's scan side tables, adding ``shard`` (index into ``scans``)."""

    def read(scan: Scan) -> pa.Table:
        if isinstance(scan, pa.Table):
            return scan.select(columns) if columns is not None else scan
        return storage.read_table(scan, columns=columns)

    files = [scan for _, scan in scans if not isinstance(scan, pa.Table)]
    tables = storage.each(read, [scan for _, scan in scans], bool(files) and storage.is_remote(files[0]))
    parts = [
        t.append_column("shard", pa.array(np.full(t.num_rows, i, dtype=np.int32)))
        for i, t in enumerate(tables)
    ]
    if not parts:
        return pa.table({})
    return pa.concat_tables(parts, promote_options="default")


def split_by_shard(
    rows: pa.Table, scans: list[tuple[str, Scan]], table: str, build: Callable[[pa.Table], pa.Table]
) -> dict[tuple[str, str], pa.Table]:
    """Group a global table of decisions (with ``shard`` and ``row``) into one plan per shard."""
    plans: dict[tuple[str, str], pa.Table] = {}
    if rows.num_rows == 0:
        return plans
    shard_col = rows.column("shard")
    for i, (name, _) in enumerate(scans):
        part = rows.filter(pc.equal(shard_col, i))
        if part.num_rows:
            plans[(table, name)] = build(part)
    return plans
