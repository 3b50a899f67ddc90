"""The ingest's driver: run the read tasks, merge their parts, write the shards (resumably).

``run_ingest`` is what every ingest source ends in (``curation.ingest.ingest`` for files and
folders, ``curation.examples`` for the bundled examples):

1. **read** (tasks): each task (``curation.ingest_sources``) writes its queries, documents, pairs
   and refused rows to ``OUT/_progress/parts/NNNNN/`` and ``done.json`` last; a rerun skips parts
   already done.
2. **merge** (driver): reads only the 16-byte content keys of the parts and keeps the first
   occurrence of every exact repeat, in input order (a document named by many rows is stored once);
   the kept rows are cut into shards of ``rows_per_shard`` and each shard's row list is its plan.
3. **write** (tasks): each shard gathers its rows from the parts (only the row groups that hold
   them) and is written with ``ShardSink``, atomically, then marked done. Refused rows go to
   ``quarantine/`` with their ``file:line``.

The plan depends only on the input, so a run killed at any moment and rerun with the same
arguments ends with the very same files as one never interrupted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.dataset import (
    AlreadyComplete,
    DatasetWriter,
    Manifest,
    ShardSink,
    atomic_write_parquet,
    shard_name,
)
from curation.executor import Executor
from curation.ingest_rows import DONE, KEY, LINE, STAGE
from curation.ingest_sources import run_parse_task
from curation.schema import CORPUS, PAIRS, QUARANTINE, QUERIES


def run_ingest(
    out: str | os.PathLike,
    *,
    config: dict[str, Any],
    spec: dict[str, Any],
    data_root: str | None,
    plan_tasks: Callable[[Path], list[dict[str, Any]]],
    rows_per_shard: int,
    executor: Executor,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Run read tasks, merge, write shards, finish. ``plan_tasks(progress_dir)`` returns the read
    tasks (it may write files there, e.g. a generated input); the same config resumes a killed run,
    and finds a finished one complete (its manifest is returned, nothing is redone)."""
    try:
        writer = DatasetWriter(out, stage=STAGE, config=config, data_root=data_root, overwrite=overwrite)
    except AlreadyComplete as done:
        return done.manifest
    parts_dir = writer.progress_dir / "parts"
    tasks = [
        {**t, "spec": spec, "part_dir": str(parts_dir / f"{i:05d}")}
        for i, t in enumerate(plan_tasks(writer.progress_dir))
    ]
    pending = [t for t in tasks if not (Path(t["part_dir"]) / DONE).exists()]
    executor.map(run_parse_task, pending, desc=f"{STAGE}: read")
    stats = [json.loads((Path(t["part_dir"]) / DONE).read_text()) for t in tasks]
    shard_tasks, kept = _plan_shards(writer, parts_dir, stats, rows_per_shard)
    pending = [t for t in shard_tasks if not writer.is_done(t["table"], t["name"])]
    executor.map(write_shard_task, pending, desc=f"{STAGE}: write")
    written = {
        t: sum(s["written"][t] + s["repeats_in_task"][t] for s in stats) for t in (QUERIES, CORPUS, PAIRS)
    }
    summary = {
        "rows_read": sum(s["rows_read"] for s in stats),
        "read_tasks": len(tasks),
        "exact_repeats_dropped": {t: written[t] - kept[t] for t in written},
    }
    return writer.finish(extra={**summary, **(extra or {})})


def _plan_shards(
    writer: DatasetWriter,
    parts_dir: Path,
    stats: list[dict[str, Any]],
    rows_per_shard: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep the first of every exact repeat (by content key, in input order) and cut the kept rows
    into shards; each shard's row list (``order`` = part << 32 | row) is written as its plan."""
    n_parts = len(stats)
    # JSONL parts number their lines from the start of their byte range: add the lines before it.
    line_offsets: dict[int, int] = {}
    seen_lines: dict[int, int] = {}
    for p, s in enumerate(stats):
        if "lines" in s:
            line_offsets[p] = seen_lines.get(s["file_index"], 0)
            seen_lines[s["file_index"]] = line_offsets[p] + s["lines"]
    tasks, kept = [], {}
    for table in (QUERIES, CORPUS, PAIRS, QUARANTINE):
        orders, keys = [], []
        for p in range(n_parts):
            path = parts_dir / f"{p:05d}" / f"{table}.parquet"
            n = pq.ParquetFile(path).metadata.num_rows
            if not n:
                continue
            orders.append((np.int64(p) << 32) | np.arange(n, dtype=np.int64))
            if table != QUARANTINE:
                keys.append(pq.read_table(path, columns=[KEY]).column(KEY))
        order = np.concatenate(orders) if orders else np.zeros(0, np.int64)
        if table != QUARANTINE and len(order):
            t = pa.table(
                {"k": pa.chunked_array([c for k in keys for c in k.chunks], pa.binary(16)), "o": order}
            )
            order = np.sort(
                t.group_by("k", use_threads=False).aggregate([("o", "min")]).column("o_min").to_numpy()
            )
        kept[table] = len(order)
        for i, start in enumerate(range(0, len(order), rows_per_shard)):
            chunk = order[start : start + rows_per_shard]
            name = shard_name(i)
            task = {
                "sink": vars(writer.sink),
                "table": table,
                "name": name,
                "parts_dir": str(parts_dir),
                "plan": str(writer.progress_dir / "plan" / table / name),
            }
            if table == QUARANTINE:
                present = {int(p) for p in np.unique(chunk >> 32)}
                task["line_offsets"] = {str(p): line_offsets[p] for p in present if p in line_offsets}
            if not writer.is_done(table, name):
                atomic_write_parquet(task["plan"], pa.table({"order": pa.array(chunk, pa.int64())}))
            tasks.append(task)
    return tasks, kept


def _gather(parts_dir: Path, table: str, order: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """The rows ``order`` names, in that order, reading only the row groups that hold them (one at
    a time, so no column is ever concatenated past Arrow's 2 GiB binary limit)."""
    parts, rows = order >> 32, order & 0xFFFFFFFF
    pieces = []
    for seg in np.split(np.arange(len(order)), np.flatnonzero(np.diff(parts)) + 1):
        pf = pq.ParquetFile(parts_dir / f"{int(parts[seg[0]]):05d}" / f"{table}.parquet")
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        r = rows[seg]
        rg = np.searchsorted(starts, r, side="right") - 1
        for group in np.split(np.arange(len(r)), np.flatnonzero(np.diff(rg)) + 1):
            g = int(rg[group[0]])
            pieces.append(pf.read_row_group(g).take(pa.array(r[group] - starts[g])))
    return pa.concat_tables(pieces), parts


def write_shard_task(task: dict[str, Any]) -> dict[str, Any]:
    """Write one output shard from its plan (a task function: runs under any executor)."""
    sink = ShardSink(**task["sink"])
    table, name = task["table"], task["name"]
    order = pq.read_table(task["plan"]).column("order").to_numpy()
    data, parts = _gather(Path(task["parts_dir"]), table, order)
    if table != QUARANTINE:
        return sink.write_shard(table, name, data.drop_columns([KEY]))
    offsets = task["line_offsets"]
    sources, lines = data.column("source").to_pylist(), data.column(LINE).to_pylist()
    for i, line in enumerate(lines):
        if line is not None:
            sources[i] = f"{sources[i]}:{line + offsets[str(int(parts[i]))]}"
    data = data.set_column(data.column_names.index("source"), "source", pa.array(sources, pa.string()))
    return sink.write_shard(QUARANTINE, name, None, quarantine=data.drop_columns([LINE]))
