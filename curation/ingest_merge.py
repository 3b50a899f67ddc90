"""The ingest's driver: run the read tasks, merge their parts, write the shards (resumably).

``run_ingest`` is what every ingest source ends in (``curation.ingest.ingest`` for files and
folders, ``curation.examples`` for the bundled examples):

1. **read** (tasks): each task (``curation.ingest_sources``) writes its queries, documents, pairs
   and refused rows to ``OUT/_progress/parts/NNNNN/`` and ``done.json`` last; a rerun skips parts
   already done.
2. **merge** (driver): reads only the 16-byte content keys (and ids) of the parts and keeps the
   first occurrence of every exact repeat, in input order (a document named by many rows is stored
   once). An id given to other content than its first row's (``--map query_id=id`` with a clash)
   is a conflict: every input row giving the id other content is refused whole, its query, document
   and pair together (reason conflicting_id, the detail naming the line of the id's first row too),
   because its pair would otherwise come to name the first row's content: a positive no input row
   stated. A query, document or pair is kept when some kept input row made it. The kept rows are
   cut into shards of ``rows_per_shard`` and each shard's row list is its plan.
3. **write** (tasks): each shard gathers its rows from the parts (only the row groups that hold
   them) and is written with ``ShardSink``, atomically, then marked done. Refused rows go to
   ``quarantine/`` with their ``file:line``.

The plan depends only on the input, so a run killed at any moment and rerun with the same
arguments ends with the very same files as one never interrupted.

``OUT`` may be a URI (``s3://bucket/ds``): the parts, plans and shards are then objects under its
``_progress/`` and table prefixes, each put whole (``PartWriter``, ``ShardSink``); the tasks read
them from there in whichever process runs them, and ``DatasetWriter.finish`` removes ``_progress/``
once the manifest is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.dataset import (
    AlreadyComplete,
    DatasetWriter,
    Manifest,
    ShardSink,
    atomic_write_parquet,
    shard_name,
)
from assay.curation.executor import Executor
from assay.curation.ingest_rows import DONE, INPUT_ROWS, INPUT_TABLE, KEY, LINE, PART_SCHEMAS, STAGE, plain
from assay.curation.ingest_sources import run_parse_task
from assay.curation.quarantine import QuarantineBuilder
from assay.curation.schema import CORPUS, ID_COLUMN, PAIRS, QUARANTINE, QUERIES

CONFLICTING_ID = "conflicting_id"


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
    finished = set(storage.files_under(parts_dir, DONE))  # one listing, not a request per part
    pending = [t for t in tasks if f"{storage.path(t['part_dir']).name}/{DONE}" not in finished]
    executor.map(run_parse_task, pending, desc=f"{STAGE}: read")
    done_files = storage.read_many([storage.path(t["part_dir"]) / DONE for t in tasks])
    stats = [json.loads(data) for data in done_files]
    shard_tasks, unique, refused = _plan_shards(writer, parts_dir, stats, rows_per_shard)
    pending = [t for t in shard_tasks if not writer.is_done(t["table"], t["name"])]
    executor.map(write_shard_task, pending, desc=f"{STAGE}: write")
    written = {
        t: sum(s["written"][t] + s["repeats_in_task"][t] for s in stats) for t in (QUERIES, CORPUS, PAIRS)
    }
    summary = {
        "rows_read": sum(s["rows_read"] for s in stats),
        "read_tasks": len(tasks),
        "exact_repeats_dropped": {t: written[t] - unique[t] for t in written},
        "conflicting_id_rows": refused,
    }
    return writer.finish(extra={**summary, **(extra or {})})


def _plan_shards(
    writer: DatasetWriter,
    parts_dir: Path,
    stats: list[dict[str, Any]],
    rows_per_shard: int,
) -> tuple[list[dict[str, Any]], dict[str, int], int]:
    """Keep the first of every exact repeat (by content key, in input order), refuse the input rows
    that give a known id other content (``_conflicts``), and cut the kept rows into shards; each
    shard's row list (``order`` = part << 32 | row) is written as its plan. Returns (the write tasks,
    the rows of each table after exact repeats, the input rows refused as conflicting_id)."""
    n_parts = len(stats)
    # JSONL parts number their lines from the start of their byte range: add the lines before it.
    line_offsets: dict[int, int] = {}
    seen_lines: dict[int, int] = {}
    for p, s in enumerate(stats):
        if "lines" in s:
            line_offsets[p] = seen_lines.get(s["file_index"], 0)
            seen_lines[s["file_index"]] = line_offsets[p] + s["lines"]
    # per table: the first row of every content key: k (the key), h (a 64-bit hash of the id, for
    # queries and corpus: 24 bytes a row in all, never the ids themselves), o (part << 32 | row)
    firsts: dict[str, pa.Table] = {}
    for table in (QUERIES, CORPUS, PAIRS):
        columns = [KEY, ID_COLUMN[table]] if table in ID_COLUMN else [KEY]
        pieces = []
        for p in range(n_parts):
            t = storage.read_table(parts_dir / f"{p:05d}" / f"{table}.parquet", columns=columns)
            if t.num_rows:
                order = (np.int64(p) << 32) | np.arange(t.num_rows, dtype=np.int64)
                cols = {"k": t.column(KEY), "o": pa.array(order)}
                if table in ID_COLUMN:
                    ids = pl.from_arrow(t.column(ID_COLUMN[table]).combine_chunks().cast(pa.string()))
                    cols["h"] = pa.array(ids.hash(seed=0).to_numpy(), pa.uint64())
                pieces.append(pa.table(cols))
        if pieces:
            t = pa.concat_tables(pieces)
        else:
            empty = {"k": pa.array([], pa.binary(16)), "o": pa.array([], pa.int64())}
            t = pa.table(empty | ({"h": pa.array([], pa.uint64())} if table in ID_COLUMN else {}))
        first_o = t.group_by("k", use_threads=False).aggregate([("o", "min")]).column("o_min")
        firsts[table] = t.filter(pc.is_in(t.column("o"), value_set=first_o)).sort_by("o")
    unique = {table: firsts[table].num_rows for table in firsts}
    conflict_rows = _conflicts(parts_dir, n_parts, firsts, line_offsets)
    extra_part = parts_dir / f"{n_parts:05d}" / f"{QUARANTINE}.parquet"
    if conflict_rows is not None:
        keep, refused_rows = conflict_rows
        atomic_write_parquet(extra_part, refused_rows)
        for table, keys in keep.items():
            firsts[table] = firsts[table].filter(pc.is_in(firsts[table].column("k"), value_set=keys))
    tasks = []
    for table in (QUERIES, CORPUS, PAIRS, QUARANTINE):
        if table == QUARANTINE:
            orders = []
            for p in range(n_parts + (conflict_rows is not None)):
                n = storage.num_rows(parts_dir / f"{p:05d}" / f"{table}.parquet")
                orders.append((np.int64(p) << 32) | np.arange(n, dtype=np.int64))
            order = np.concatenate(orders) if orders else np.zeros(0, np.int64)
        else:
            order = np.asarray(firsts[table].column("o").to_numpy(), np.int64)
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
    refused = 0 if conflict_rows is None else conflict_rows[1].num_rows
    return tasks, unique, refused


def _conflicts(
    parts_dir: Path, n_parts: int, firsts: dict[str, pa.Table], line_offsets: dict[int, int]
) -> tuple[dict[str, pa.Array], pa.Table] | None:
    """The input rows that give a query or document id other content than the id's first row, refused
    whole. None when there are none (the usual case: only the ids were read). Else (the content keys
    each table keeps: those some kept input row made; the refused rows as a quarantine part)."""
    clashing: dict[str, dict[bytes, bytes]] = {}  # table -> {later content key: the id's first key}
    for table in (QUERIES, CORPUS):
        t = firsts[table]
        counts = t.group_by("h", use_threads=False).aggregate([("k", "count")])
        ids = counts.filter(pc.greater(counts.column("k_count"), 1)).column("h")
        if not len(ids):
            continue
        rows = t.filter(pc.is_in(t.column("h"), value_set=ids))  # in input order
        # the ids themselves, of these rows only: two ids sharing a hash are no clash
        data, _ = _gather(parts_dir, table, np.asarray(rows.column("o").to_numpy(), np.int64))
        first_key: dict[str, bytes] = {}
        for rid, k in zip(
            data.column(ID_COLUMN[table]).to_pylist(), rows.column("k").to_pylist(), strict=True
        ):
            if rid in first_key:
                clashing.setdefault(table, {})[k] = first_key[rid]
            else:
                first_key[rid] = k
    if not clashing:
        return None
    pieces = []
    for p in range(n_parts):
        t = storage.read_table(parts_dir / f"{p:05d}" / f"{INPUT_ROWS}.parquet")
        order = (np.int64(p) << 32) | np.arange(t.num_rows, dtype=np.int64)
        pieces.append(t.append_column("o", pa.array(order)))
    links = pa.concat_tables(pieces) if pieces else PART_SCHEMAS[INPUT_ROWS].empty_table()
    bad = np.zeros(links.num_rows, bool)
    for table, keys in clashing.items():
        bad |= np.asarray(pc.is_in(links.column(table), value_set=pa.array(list(keys), pa.binary(16))), bool)
    kept = links.filter(pa.array(~bad))
    keep = {t: pc.unique(kept.column(t).drop_null()) for t in (QUERIES, CORPUS, PAIRS)}

    def where(link: dict[str, Any]) -> str:
        if link[LINE] is None:
            return link["source"]
        return f"{link['source']}:{link[LINE] + line_offsets.get(int(link['o']) >> 32, 0)}"

    # where each first content was first stated, for the detail
    first_keys = {k for table in clashing for k in clashing[table].values()}
    first_at: dict[bytes, str] = {}
    firsts_keys = pa.array(list(first_keys), pa.binary(16))
    stating = np.zeros(links.num_rows, bool)
    for table in clashing:
        stating |= np.asarray(pc.is_in(links.column(table), value_set=firsts_keys), bool)
    for link in links.filter(pa.array(stating)).to_pylist():  # in input order
        for table in clashing:
            k = link[table]
            if k in first_keys and k not in first_at:
                first_at[k] = where(link)
    refused = links.filter(pa.array(bad)).to_pylist()
    content = {t: _rows_by_key(parts_dir, firsts[t], {r[t] for r in refused} - {None}, t) for t in firsts}
    qb = QuarantineBuilder(INPUT_TABLE, STAGE, "")
    for link in refused:
        here = where(link)
        reasons = []
        ids = []
        for table in (QUERIES, CORPUS):
            if link[table] in clashing.get(table, {}):
                first = clashing[table][link[table]]
                col = ID_COLUMN[table]
                rid = content[table][link[table]][col]
                ids.append(rid)
                reasons.append(
                    f"{col} {rid!r} has other content here than on its first row, {first_at[first]}"
                )
        detail = (
            "; ".join(reasons)
            + f" (kept): this row ({here}) is refused with its pair, which would otherwise name the "
            "first row's content (a positive no input row stated)"
        )
        qb.add(
            _flat_record(*(content[t].get(link[t]) for t in (QUERIES, CORPUS, PAIRS))),
            CONFLICTING_ID,
            detail,
            id=ids[0],
            location=here,
        )
    table = qb.to_table()
    table = table.append_column(LINE, pa.nulls(table.num_rows, pa.int64()))
    return keep, table.cast(PART_SCHEMAS[QUARANTINE])


def _rows_by_key(parts_dir: Path, firsts: pa.Table, keys: set[bytes], table: str) -> dict[bytes, dict]:
    """The rows (as dicts) of ``table`` whose content keys are ``keys``."""
    if not keys:
        return {}
    at = firsts.filter(pc.is_in(firsts.column("k"), value_set=pa.array(list(keys), pa.binary(16))))
    data, _ = _gather(parts_dir, table, np.asarray(at.column("o").to_numpy(), np.int64))
    return {r[KEY]: r for r in data.to_pylist()}


def _flat_record(query: dict | None, doc: dict | None, pair: dict | None) -> dict[str, Any]:
    """A refused input row as the flat targets it was read into (``curation.ingest_rows.TARGETS``)."""
    query, doc, pair = query or {}, doc or {}, pair or {}
    return plain(
        {
            "query_id": query.get("query_id"),
            "query_text": query.get("text"),
            "query_image": query.get("image"),
            "query_instruction": query.get("instruction"),
            "subset": query.get("subset", doc.get("subset")),
            "task": query.get("task"),
            "doc_id": doc.get("doc_id"),
            "doc_text": doc.get("text"),
            "doc_image": doc.get("image"),
            "doc_instruction": doc.get("instruction"),
            "label": pair.get("label"),
            "score": pair.get("score"),
        }
    )


def _gather(parts_dir: Path, table: str, order: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """The rows ``order`` names, in that order, reading only the row groups that hold them (one at
    a time, so no column is ever concatenated past Arrow's 2 GiB binary limit)."""
    parts, rows = order >> 32, order & 0xFFFFFFFF
    pieces = []
    for seg in np.split(np.arange(len(order)), np.flatnonzero(np.diff(parts)) + 1):
        pf = storage.parquet_file(parts_dir / f"{int(parts[seg[0]]):05d}" / f"{table}.parquet")
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
    order = storage.read_table(task["plan"]).column("order").to_numpy()
    data, parts = _gather(storage.path(task["parts_dir"]), table, order)
    if table != QUARANTINE:
        return sink.write_shard(table, name, data.drop_columns([KEY]))
    offsets = task["line_offsets"]
    sources, lines = data.column("source").to_pylist(), data.column(LINE).to_pylist()
    for i, line in enumerate(lines):
        if line is not None:
            sources[i] = f"{sources[i]}:{line + offsets[str(int(parts[i]))]}"
    data = data.set_column(data.column_names.index("source"), "source", pa.array(sources, pa.string()))
    return sink.write_shard(QUARANTINE, name, None, quarantine=data.drop_columns([LINE]))
