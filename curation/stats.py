"""What a dataset holds: counts per table, subset, task and label, the quarantine, and its lineage.

``dataset_stats(Dataset(path))`` streams every table shard by shard (record batches of a few
thousand rows; image bytes are read a batch at a time only to tell inline images from paths) and
keeps only counters and, for pairs per subset, the query ids' subsets. ``format_stats`` renders the
dict as the plain-text tables ``assay stats`` prints.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.curation.schema import CORPUS, DATA_TABLES, NULL_KEY, PAIRS, QUARANTINE, QUERIES

#: The subset key for pairs whose query is not in the queries table.
MISSING_QUERY = "(missing query)"

_BATCH = 4096


def _count(counter: Counter, values: list[Any]) -> None:
    counter.update(NULL_KEY if v is None else str(v) for v in values)


def _sorted(counter: Counter) -> dict[str, int]:
    """Most frequent first, then by name: the order the tables print in."""
    return {k: int(n) for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))}


def _image_kinds(batch: pa.RecordBatch, counts: Counter) -> None:
    col = batch.column(batch.schema.get_field_index("image"))
    if isinstance(col, pa.ChunkedArray):  # pragma: no cover - batches hold plain arrays
        col = col.combine_chunks()
    valid = pc.is_valid(col)
    has_bytes = pc.and_(valid, pc.is_valid(pc.struct_field(col, [0])))
    has_path = pc.and_(valid, pc.is_valid(pc.struct_field(col, [1])))
    n_bytes = pc.sum(has_bytes).as_py() or 0
    n_path = pc.sum(pc.and_(has_path, pc.invert(has_bytes))).as_py() or 0
    counts["inline"] += n_bytes
    counts["path"] += n_path
    counts["none"] += len(col) - n_bytes - n_path


def _batches(ds: Dataset, table: str, columns: list[str], bar: tqdm) -> Iterator[pa.RecordBatch]:
    for name in ds.shards(table):
        pf = storage.parquet_file(ds.shard_path(table, name))
        yield from pf.iter_batches(batch_size=_BATCH, columns=columns)
        bar.update()


def dataset_stats(ds: Dataset, progress: bool | None = None) -> dict[str, Any]:
    """Counts of a dataset, streamed over its shards (see the module docstring for the keys).

    ``progress`` shows a bar over the shards (default: when stderr is a terminal)."""
    m = ds.manifest
    progress = sys.stderr.isatty() if progress is None else progress
    total = sum(len(ds.shards(t)) for t in DATA_TABLES)
    bar = tqdm(total=total, desc="stats", unit="shard", disable=not progress or not total)
    rows = {t: ds.num_rows(t) for t in DATA_TABLES}
    qfiles = [ds.root / QUARANTINE / name for name in ds.quarantine_files()]
    rows[QUARANTINE] = sum(storage.num_rows(p) for p in qfiles)

    # queries: per subset, per task, per (subset, task); images
    q_subset: Counter = Counter()
    q_task: Counter = Counter()
    q_subset_task: dict[str, Counter] = {}
    images: dict[str, Counter] = {QUERIES: Counter(), CORPUS: Counter()}
    for batch in _batches(ds, QUERIES, ["subset", "task", "image"], bar):
        subsets = batch.column(0).to_pylist()
        tasks = batch.column(1).to_pylist()
        _count(q_subset, subsets)
        _count(q_task, tasks)
        for s, t in zip(subsets, tasks, strict=True):
            q_subset_task.setdefault(NULL_KEY if s is None else s, Counter())[
                NULL_KEY if t is None else t
            ] += 1
        _image_kinds(batch, images[QUERIES])

    c_subset: Counter = Counter()
    for batch in _batches(ds, CORPUS, ["subset", "image"], bar):
        _count(c_subset, batch.column(0).to_pylist())
        _image_kinds(batch, images[CORPUS])

    p_label: Counter = Counter()
    p_subset: Counter = Counter()
    p_subset_label: dict[str, Counter] = {}
    p_verdict: Counter = Counter()
    judged = 0
    subset_of = ds.query_subsets()
    for batch in _batches(ds, PAIRS, ["query_id", "label", "judge_p_yes", "judge_verdict"], bar):
        qids = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist()
        _count(p_label, labels)
        _count(p_verdict, batch.column(3).to_pylist())
        judged += len(batch) - batch.column(2).null_count
        for qid, lab in zip(qids, labels, strict=True):
            s = subset_of.get(qid, MISSING_QUERY)
            p_subset[s] += 1
            p_subset_label.setdefault(s, Counter())[NULL_KEY if lab is None else lab] += 1

    bar.close()

    q_stage: dict[str, Counter] = {}
    q_table: Counter = Counter()
    for path in qfiles:
        pf = storage.parquet_file(path)
        for batch in pf.iter_batches(batch_size=_BATCH, columns=["table", "stage", "reason"]):
            _count(q_table, batch.column(0).to_pylist())
            for st, r in zip(batch.column(1).to_pylist(), batch.column(2).to_pylist(), strict=True):
                q_stage.setdefault(NULL_KEY if st is None else st, Counter())[
                    NULL_KEY if r is None else r
                ] += 1

    lineage = [
        {
            "stage": step.get("stage"),
            "created": step.get("created"),
            "counts": step.get("counts", {}),
            "config": step.get("config", {}),
            "path": step.get("path"),
        }
        for step in m.lineage
    ]
    return {
        "path": str(ds.root),
        "stage": m.stage,
        "created": m.created,
        "code_version": m.code_version,
        "schema_version": m.schema_version,
        "data_root": str(ds.data_root),
        "rows": rows,
        "queries": {
            "by_subset": _sorted(q_subset),
            "by_task": _sorted(q_task),
            "by_subset_task": {s: _sorted(c) for s, c in sorted(q_subset_task.items())},
        },
        "corpus": {"by_subset": _sorted(c_subset)},
        "pairs": {
            "by_label": _sorted(p_label),
            "by_subset": _sorted(p_subset),
            "by_subset_label": {s: _sorted(c) for s, c in sorted(p_subset_label.items())},
            "by_verdict": _sorted(p_verdict),
            "judged": judged,
        },
        "quarantine": {
            "by_stage": {s: _sorted(c) for s, c in sorted(q_stage.items())},
            "by_table": _sorted(q_table),
        },
        "images": {t: {k: int(images[t][k]) for k in ("inline", "path", "none")} for t in (QUERIES, CORPUS)},
        "parents": [dict(p) for p in m.parents],
        "lineage": lineage,
    }


def _table(title: str, counts: dict[str, int], total: int | None = None) -> list[str]:
    if not counts:
        return [f"{title}: none"]
    width = max(len(k) for k in counts)
    total = sum(counts.values()) if total is None else total
    out = [f"{title}:"]
    for k, n in counts.items():
        share = f"  {100.0 * n / total:5.1f}%" if total else ""
        out.append(f"  {k:<{width}}  {n:>10,}{share}")
    return out


def _config_text(config: dict[str, Any]) -> str:
    parts = [f"{k}={v!r}" for k, v in config.items() if v not in (None, {}, [], "")]
    return ", ".join(parts)


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as readable plain-text tables."""
    r = stats["rows"]
    lines = [
        f"dataset {stats['path']}",
        f"  made by: {stats['stage']} at {stats['created']} (assay {stats['code_version']}, "
        f"schema v{stats['schema_version']})",
        "",
        "rows:",
    ]
    for t in (*DATA_TABLES, QUARANTINE):
        lines.append(f"  {t:<10}  {r.get(t, 0):>10,}")
    lines.append("")
    lines += _table("queries per subset", stats["queries"]["by_subset"])
    lines += _table("queries per task", stats["queries"]["by_task"])
    lines.append("")
    lines += _table("corpus per subset", stats["corpus"]["by_subset"])
    lines.append("")
    lines += _table("pairs per label", stats["pairs"]["by_label"])
    lines += _table("pairs per subset (the query's)", stats["pairs"]["by_subset"])
    by_sl = stats["pairs"]["by_subset_label"]
    if by_sl:
        labels = sorted({lab for c in by_sl.values() for lab in c})
        width = max(len(s) for s in by_sl)
        lines.append("pairs per subset and label:")
        lines.append("  " + " " * width + "".join(f"  {lab:>14}" for lab in labels))
        for s, c in by_sl.items():
            lines.append(f"  {s:<{width}}" + "".join(f"  {c.get(lab, 0):>14,}" for lab in labels))
    lines.append(f"pairs judged: {stats['pairs']['judged']:,}")
    lines.append("")
    qs = stats["quarantine"]["by_stage"]
    if qs:
        lines.append("quarantine per stage and reason:")
        for stage, reasons in qs.items():
            for reason, n in reasons.items():
                lines.append(f"  {stage:<12} {reason:<32} {n:>10,}")
    else:
        lines.append("quarantine: empty")
    lines.append("")
    lines.append("images:")
    for t, c in stats["images"].items():
        lines.append(f"  {t:<8}  inline {c['inline']:>8,}   by path {c['path']:>8,}   none {c['none']:>8,}")
    lines.append(f"  data root: {stats['data_root']}")
    lines.append("")
    lines.append("lineage (oldest first):")
    for i, step in enumerate(stats["lineage"], 1):
        c = step.get("counts", {})
        counts = " ".join(f"{t}={c.get(t, 0)}" for t in (*DATA_TABLES, QUARANTINE) if t in c)
        lines.append(f"  {i}. {step['stage']:<10} {step.get('created') or '':<21} {counts}")
        cfg = _config_text(step.get("config") or {})
        if cfg:
            lines.append(f"     config: {cfg}")
    return "\n".join(lines)
