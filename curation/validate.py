"""Validate: schema and content checks. Every refused row goes, whole, to the quarantine.

Row checks run per shard in the scan step (vectorised with pyarrow where they can be, images one
by one); the checks that need the whole dataset (duplicate ids, pairs naming ids that do not exist
or were refused) run in the plan step over ids only. A row gets the first reason that applies, in
this order:

=========================  ================================================================
reason                     what was wrong
=========================  ================================================================
wrong_type                 a column of the shard has a type the format does not allow
invalid_utf8               a text column holds bytes that are not UTF-8
missing_id                 the id (query_id, doc_id, or either id of a pair) is null or blank
missing_content            neither text nor image
empty_text                 text present but empty or whitespace only
text_too_long              text longer than ``max_text_chars``
nul_in_text                text holding a NUL character (U+0000), which C-string code cuts at
invalid_label              a pair label that is not positive/negative/hard_negative/false_negative
invalid_value              a NaN score, a judge_p_yes outside [0, 1], a verdict not yes/no
image_path_outside_root    an image path that resolves (symlinks included) outside the data root
image_not_found            an image path with no file behind it
image_too_large            more pixels than ``max_pixels`` or more bytes than ``max_image_bytes``
                           (checked from the header, before decoding: decompression bombs)
unreadable_image           not an image, a format not allowed, or a corrupt one
truncated_image            an image whose data ends early
duplicate_id               an id already used by an earlier row of the same table with the same
                           content (subset, task, instruction, text, image): the first is kept,
                           and the pairs naming the id state nothing new
conflicting_id             an id given to rows of different content: every row with it is
                           refused, and so is every pair naming it (which row a pair meant
                           cannot be told: keeping the first row would hand it the pairs of
                           the others, positives no input row stated)
unknown_query_id           a pair whose query is not in queries (or was refused)
unknown_doc_id             a pair whose document is not in corpus (or was refused)
=========================  ================================================================

An ingest by assay never leaves such ids: ingest refuses an input row that gives a known id other
content, with its pair, naming both lines (curation.ingest_merge). conflicting_id is for datasets
made otherwise, where the pairs cannot be traced to the row they came with.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from assay.curation import storage
from assay.curation.dataset import Dataset, Manifest
from assay.curation.executor import Executor
from assay.curation.schema import (
    CORPUS,
    ID_COLUMN,
    LABELS,
    PAIRS,
    QUERIES,
    SCHEMAS,
    VERDICTS,
    resolve_image_path,
)
from assay.curation.shardstage import Scan, plan_table, read_scans, run_shard_stage, split_by_shard

STAGE = "validate"

SCAN_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("doc_id", pa.string()),  # pairs only: id holds the query_id
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("content", pa.uint64()),  # queries, corpus: a hash of the row's content (not its id)
    ]
)
#: What makes two rows of one id the same row (``content``), per table.
CONTENT_COLUMNS = {
    QUERIES: ["subset", "task", "instruction", "text", "image"],
    CORPUS: ["subset", "instruction", "text", "image"],
}


@dataclass(frozen=True)
class ValidateConfig:
    """Limits and switches of the validate stage (all recorded in the output manifest)."""

    max_text_chars: int = 100_000
    max_pixels: int = 40_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    decode_images: bool = True
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_formats"] = list(self.image_formats)
        return d


# -- column types ---------------------------------------------------------------------------------

_STRINGS = (pa.string(), pa.large_string(), pa.string_view())
_BINARIES = (pa.binary(), pa.large_binary(), pa.binary_view())


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Types a shard may hold for a column and still be read losslessly as the format's type."""
    if actual == expected or pa.types.is_null(actual):
        return True
    if expected in _STRINGS:
        return actual in _STRINGS
    if expected in _BINARIES:
        return actual in _BINARIES
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual):
            return False
        names = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        return all(
            (f.name not in names) or _compatible(names[f.name], f.type)
            for f in (expected.field(i) for i in range(expected.num_fields))
        )
    return False


def _invalid_utf8_rows(col: pa.ChunkedArray) -> np.ndarray:
    """Boolean mask of rows whose string is not valid UTF-8 (fast path: one full validation)."""
    bad = np.zeros(len(col), dtype=bool)
    offset = 0
    for chunk in col.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            raw = chunk.view(pa.binary()) if chunk.type == pa.string() else chunk.cast(pa.large_binary())
            for i, b in enumerate(raw.to_pylist()):
                if b is not None:
                    try:
                        b.decode("utf-8")
                    except UnicodeDecodeError:
                        bad[offset + i] = True
        offset += len(chunk)
    return bad


def conform_columns(table_name: str, shard: pa.Table) -> tuple[pa.Table, str | None]:
    """Cast a shard to the format's schema. Returns (table, problem) where problem names a column of
    the wrong type; missing nullable columns are added as nulls."""
    schema = SCHEMAS[table_name]
    cols = {}
    for f in schema:
        if f.name not in shard.column_names:
            cols[f.name] = pa.nulls(shard.num_rows, f.type)
            continue
        col = shard.column(f.name)
        if not _compatible(col.type, f.type):
            return shard, f"column {f.name} has type {col.type}, expected {f.type}"
        if pa.types.is_struct(f.type) and col.type != f.type:
            # Fill missing struct fields (e.g. an image struct with only 'path').
            arr = col.combine_chunks()
            children = []
            for sub in f.type:
                idx = arr.type.get_field_index(sub.name)
                children.append(arr.field(idx).cast(sub.type) if idx >= 0 else pa.nulls(len(arr), sub.type))
            col = pa.StructArray.from_arrays(children, fields=list(f.type), mask=arr.is_null())
        cols[f.name] = col
    return pa.table(cols), None


# -- images ---------------------------------------------------------------------------------------


def check_image(image: dict[str, Any], data_root: str, cfg: ValidateConfig) -> tuple[str, str] | None:
    """None if the image is usable, else (reason, detail). Never decodes more than ``max_pixels``."""
    data = image.get("bytes")
    path = image.get("path")
    if data is None and path is not None:
        if "\x00" in path:
            return "image_not_found", f"{path!r} holds a NUL character: no file can have this name"
        resolved = resolve_image_path(data_root, path)
        root, full = resolved.root, resolved.full
        if not resolved.inside:
            return "image_path_outside_root", f"{path!r} resolves to {full}, outside the data root {root}"
        if not storage.is_file(full):
            return "image_not_found", f"{path!r}: no such file under {storage.display(root)}"
        size = storage.size(full)
        if size > cfg.max_image_bytes:
            return "image_too_large", f"{path!r} is {size} bytes (limit {cfg.max_image_bytes})"
        data = storage.read_bytes(full)
    if data is None:
        return None
    if len(data) > cfg.max_image_bytes:
        return "image_too_large", f"{len(data)} bytes (limit {cfg.max_image_bytes})"
    if not cfg.decode_images:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(cfg.image_formats))
            w, h = im.size
            if w * h > cfg.max_pixels:
                return "image_too_large", f"{w}x{h} = {w * h} pixels (limit {cfg.max_pixels})"
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return "image_too_large", str(e)
    except UnidentifiedImageError:
        return "unreadable_image", f"not an image of an allowed format ({', '.join(cfg.image_formats)})"
    except OSError as e:
        if "truncated" in str(e):
            return "truncated_image", str(e)
        return "unreadable_image", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a corrupt image may raise anything inside a decoder
        return "unreadable_image", f"{type(e).__name__}: {e}"
    return None


# -- the scan: row checks of one shard ----------------------------------------------------------------


class _Reasons:
    """The first reason that applies to each row."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)
        self.detail = np.full(n, None, dtype=object)

    @property
    def ok(self) -> np.ndarray:
        return np.equal(self.reason, None)

    def mark(
        self, mask: np.ndarray, reason: str, detail: str | Callable[[np.ndarray], list[str]] = ""
    ) -> None:
        """Give ``reason`` to the rows in ``mask`` that have none yet; ``detail`` may be a function of
        the selected row indices, so per-row messages are only built for refused rows."""
        sel = np.flatnonzero(mask & self.ok)
        if not len(sel):
            return
        self.reason[sel] = reason
        if callable(detail):
            self.detail[sel] = np.array(detail(sel), dtype=object)
        else:
            self.detail[sel] = detail


def _mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _string_columns(table_name: str) -> list[str]:
    return [f.name for f in SCHEMAS[table_name] if f.type == pa.string()]


def scan_validate(task: dict[str, Any]) -> pa.Table:
    """Row checks of one shard; returns the scan table (row, id, doc_id, reason, detail)."""
    cfg = ValidateConfig(**_cfg_args(task["config"]))
    return check_rows(task["table"], storage.read_table(task["src"]), task["data_root"], cfg)


def check_rows(table_name: str, raw: pa.Table, data_root: str, cfg: ValidateConfig) -> pa.Table:
    """The row checks of one whole shard as read (before any cast): the scan table (row, id, doc_id,
    reason, detail) with the first reason of every row that fails one, null for the others."""
    n = raw.num_rows
    r = _Reasons(n)
    shard, problem = conform_columns(table_name, raw)
    content = pa.nulls(n, pa.uint64())
    if problem:
        r.mark(np.ones(n, dtype=bool), "wrong_type", problem)
        ids = pa.nulls(n, pa.string())
        doc_ids = pa.nulls(n, pa.string())
    else:
        for name in _string_columns(table_name):
            bad = _invalid_utf8_rows(shard.column(name))
            if bad.any():
                r.mark(bad, "invalid_utf8", f"column {name} is not valid UTF-8")
                col = shard.column(name).combine_chunks()
                col = pc.if_else(
                    pa.array(bad),
                    pa.scalar(None, pa.string()),
                    col.view(pa.binary()).cast(pa.string(), safe=False),
                )
                shard = shard.set_column(shard.column_names.index(name), name, col)
        if table_name == PAIRS:
            _check_pairs(shard, r)
            ids = shard.column("query_id").combine_chunks()
            doc_ids = shard.column("doc_id").combine_chunks()
        else:
            _check_items(table_name, shard, r, data_root, cfg)
            ids = shard.column(ID_COLUMN[table_name]).combine_chunks()
            doc_ids = pa.nulls(n, pa.string())
            content = _content_hash(table_name, shard, r.ok)
    return pa.table(
        {
            "row": pa.array(np.arange(n), pa.int64()),
            "id": ids.cast(pa.string()),
            "doc_id": doc_ids.cast(pa.string()),
            "reason": pa.array(r.reason.tolist(), pa.string()),
            "detail": pa.array(r.detail.tolist(), pa.string()),
            "content": content,
        },
        schema=SCAN_SCHEMA,
    )


def _content_hash(table_name: str, shard: pa.Table, ok: np.ndarray) -> pa.Array:
    """A 64-bit hash of each passing row's content (``CONTENT_COLUMNS``; null for refused rows):
    two rows of one id with equal hashes are the same row given twice."""
    n = shard.num_rows
    if not ok.any():
        return pa.nulls(n, pa.uint64())
    cols = shard.select(CONTENT_COLUMNS[table_name]).filter(pa.array(ok))
    hashes = np.zeros(n, np.uint64)
    hashes[ok] = pl.from_arrow(cols).hash_rows(seed=0).to_numpy()
    return pa.array(hashes, pa.uint64(), mask=~ok)


def _blank(col: pa.ChunkedArray) -> np.ndarray:
    """Rows whose string is present but empty after trimming whitespace."""
    return _mask(pc.equal(pc.utf8_trim_whitespace(col), ""))


def _missing(col: pa.ChunkedArray) -> np.ndarray:
    return _mask(pc.is_null(col)) | _blank(col)


def _check_items(table_name: str, shard: pa.Table, r: _Reasons, data_root: str, cfg: ValidateConfig) -> None:
    id_col = ID_COLUMN[table_name]
    r.mark(_missing(shard.column(id_col)), "missing_id", f"{id_col} is null or blank")
    text = shard.column("text")
    image = shard.column("image").combine_chunks()
    has_image = ~np.asarray(image.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if len(image):
        both_null = _mask(pc.and_(pc.is_null(image.field("bytes")), pc.is_null(image.field("path"))))
        has_image &= ~both_null
    has_text = ~_mask(pc.is_null(text))
    r.mark(~has_text & ~has_image, "missing_content", "neither text nor image")
    r.mark(_blank(text), "empty_text", "text is empty or whitespace only")
    lengths = pc.fill_null(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
    r.mark(
        lengths > cfg.max_text_chars,
        "text_too_long",
        lambda idx: [f"{n} characters (limit {cfg.max_text_chars})" for n in lengths[idx].tolist()],
    )
    r.mark(
        _mask(pc.match_substring(text, "\x00")),
        "nul_in_text",
        lambda idx: [
            f"text holds a NUL character (U+0000) at byte {pos}"
            for pos in pc.find_substring(pc.take(text, pa.array(idx)), "\x00").to_pylist()
        ],
    )
    checked: dict[str, tuple[str, str] | None] = {}  # one file shared by many rows is checked once
    for i in np.flatnonzero(has_image & r.ok):
        cell = image[int(i)].as_py()
        path = cell["path"] if cell["bytes"] is None else None
        if path is not None and path in checked:
            problem = checked[path]
        else:
            problem = check_image(cell, data_root, cfg)
            if path is not None:
                checked[path] = problem
        if problem:
            r.reason[i], r.detail[i] = problem


def _check_pairs(shard: pa.Table, r: _Reasons) -> None:
    for col in ("query_id", "doc_id"):
        r.mark(_missing(shard.column(col)), "missing_id", f"{col} is null or blank")
    label = shard.column("label")
    bad_label = ~_mask(pc.is_in(label, value_set=pa.array(LABELS)))
    r.mark(
        bad_label,
        "invalid_label",
        lambda idx: [f"label {label[int(i)].as_py()!r} is not one of {', '.join(LABELS)}" for i in idx],
    )
    score = shard.column("score").cast(pa.float64()).to_numpy(zero_copy_only=False)
    r.mark(np.isnan(score) & ~_mask(pc.is_null(shard.column("score"))), "invalid_value", "score is NaN")
    p = shard.column("judge_p_yes").cast(pa.float64())
    pv = pc.fill_null(p, 0.5).to_numpy(zero_copy_only=False)
    r.mark(
        ~((pv >= 0) & (pv <= 1)),
        "invalid_value",
        lambda idx: [f"judge_p_yes {v} is outside [0, 1]" for v in pv[idx].tolist()],
    )
    verdict = shard.column("judge_verdict")
    bad_verdict = _mask(pc.is_valid(verdict)) & ~_mask(pc.is_in(verdict, value_set=pa.array(VERDICTS)))
    r.mark(
        bad_verdict,
        "invalid_value",
        lambda idx: [f"judge_verdict {verdict[int(i)].as_py()!r} is not yes or no" for i in idx],
    )


def _cfg_args(config: dict[str, Any]) -> dict[str, Any]:
    args = dict(config)
    args["image_formats"] = tuple(args.get("image_formats", ValidateConfig.image_formats))
    return args


# -- the plan: checks across shards ------------------------------------------------------------------


def plan_validate(scans: dict[str, list[tuple[str, Scan]]]) -> dict[tuple[str, str], pa.Table]:
    """Duplicate and conflicting ids and dangling pair ids, decided over the ids of all shards."""
    plans: dict[tuple[str, str], pa.Table] = {}
    kept_ids: dict[str, pl.Series] = {}
    conflicting: dict[str, pl.Series] = {}
    for table in (QUERIES, CORPUS):
        s = pl.from_arrow(read_scans(scans.get(table, []))) if scans.get(table) else None
        if s is None or s.height == 0:
            kept_ids[table] = conflicting[table] = pl.Series("id", [], dtype=pl.String)
            continue
        rejected, kept_ids[table], conflicting[table] = item_decisions(
            table, s, [name for name, _ in scans[table]]
        )
        plans.update(_plans_for(rejected, scans[table], table))
    if scans.get(PAIRS):
        s = pl.from_arrow(read_scans(scans[PAIRS])).with_columns(
            pl.col("id").is_in(kept_ids[QUERIES].implode()).alias("q_ok"),
            pl.col("doc_id").is_in(kept_ids[CORPUS].implode()).alias("d_ok"),
            pl.col("id").is_in(conflicting[QUERIES].implode()).alias("q_conflict"),
            pl.col("doc_id").is_in(conflicting[CORPUS].implode()).alias("d_conflict"),
        )
        s = pair_decisions(s)
        plans.update(_plans_for(s.filter(pl.col("reason").is_not_null()), scans[PAIRS], PAIRS))
    return plans


def item_decisions(
    table: str, s: pl.DataFrame, shard_names: list[str]
) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """The refused rows of queries or corpus, the ids kept and the conflicting ids, from their scan rows.

    ``s`` holds ``shard`` (an index into ``shard_names``), ``row``, ``id``, ``reason``, ``detail`` and
    ``content`` of rows in dataset order: all of a table's rows, or any subset that holds every row of
    each id it holds (a partition by id). Rows with a reason are refused with it. Of the others, an
    id whose rows differ in content is conflicting: all its rows are refused as conflicting_id (and
    its pairs, by ``pair_decisions``); of the rest, the first row of each id is kept and the later
    ones (the same content again) are refused as duplicate_id. Returns (the refused rows: order,
    shard, row, id, reason, detail; the kept ids; the conflicting ids).
    """
    id_col = ID_COLUMN[table]
    s = s.with_row_index("order").select("order", "shard", "row", "id", "reason", "detail", "content")
    names = pl.DataFrame(
        {"shard": pl.Series(range(len(shard_names)), dtype=pl.Int32), "shard_name": shard_names}
    )
    ok = s.filter(pl.col("reason").is_null())
    conflicting = (
        ok.group_by("id", maintain_order=True)
        .agg(pl.col("content").n_unique().alias("n"))
        .filter(pl.col("n") > 1)
        .get_column("id")
    )
    clash = ok.filter(pl.col("id").is_in(conflicting.implode()))
    where = (
        clash.join(names, on="shard", how="left", maintain_order="left")
        .with_columns(
            pl.format("{}/{} row {}", pl.lit(table), pl.col("shard_name"), pl.col("row")).alias("at")
        )
        .group_by("id", maintain_order=True)
        .agg(pl.len().alias("n"), pl.col("at").head(4).str.join(", ").alias("at"))
    )
    conflicts = clash.join(where, on="id", how="left", maintain_order="left").with_columns(
        pl.lit("conflicting_id").alias("reason"),
        pl.format(
            "{} {} is given to {} rows of different content ({}{}): which one its pairs mean cannot be "
            "told, so every row with it and every pair naming it is refused",
            pl.lit(id_col),
            pl.col("id"),
            pl.col("n"),
            pl.col("at"),
            pl.when(pl.col("n") > 4).then(pl.lit(", ...")).otherwise(pl.lit("")),
        ).alias("detail"),
    )
    ok = ok.filter(~pl.col("id").is_in(conflicting.implode())).with_columns(
        pl.col("id").is_first_distinct().alias("first")
    )
    first = ok.filter(pl.col("first"))
    repeated = ok.filter(~pl.col("first"))
    first_at = (
        first.filter(pl.col("id").is_in(repeated.get_column("id").implode()))
        .join(names, on="shard", how="left")
        .select(pl.col("id"), pl.format("{} row {}", pl.col("shard_name"), pl.col("row")).alias("at"))
    )
    dups = repeated.join(first_at, on="id", how="left", maintain_order="left").with_columns(
        pl.lit("duplicate_id").alias("reason"),
        pl.format(
            "{} {} was already used, with the same content (first at {}/{})",
            pl.lit(id_col),
            pl.col("id"),
            pl.lit(table),
            pl.col("at"),
        ).alias("detail"),
    )
    columns = ["order", "shard", "row", "id", "reason", "detail"]
    rejected = pl.concat(
        [
            s.filter(pl.col("reason").is_not_null()).select(columns),
            conflicts.select(columns),
            dups.select(columns),
        ]
    ).sort("order")
    return rejected, first.get_column("id"), conflicting


def pair_decisions(s: pl.DataFrame) -> pl.DataFrame:
    """The reason of every pair scan row (``id`` is the query_id): its row check's, else
    conflicting_id where ``q_conflict`` or ``d_conflict`` (optional: whether the id is conflicting),
    else unknown_query_id where ``q_ok`` is false, else unknown_doc_id where ``d_ok`` is false (both:
    whether the id names a kept row of queries / corpus); null for a pair that passes."""
    for col in ("q_conflict", "d_conflict"):
        if col not in s.columns:
            s = s.with_columns(pl.lit(False).alias(col))
    return s.with_columns(
        pl.when(pl.col("reason").is_not_null())
        .then(pl.col("reason"))
        .when(pl.col("q_conflict") | pl.col("d_conflict"))
        .then(pl.lit("conflicting_id"))
        .when(~pl.col("q_ok"))
        .then(pl.lit("unknown_query_id"))
        .when(~pl.col("d_ok"))
        .then(pl.lit("unknown_doc_id"))
        .alias("reason"),
    ).with_columns(
        pl.when(pl.col("detail").is_not_null())
        .then(pl.col("detail"))
        .when((pl.col("reason") == "conflicting_id") & pl.col("q_conflict"))
        .then(
            pl.format(
                "query_id {} is given to queries of different content (refused as conflicting_id): "
                "which one this pair meant cannot be told",
                pl.col("id"),
            )
        )
        .when(pl.col("reason") == "conflicting_id")
        .then(
            pl.format(
                "doc_id {} is given to documents of different content (refused as conflicting_id): "
                "which one this pair meant cannot be told",
                pl.col("doc_id"),
            )
        )
        .when(pl.col("reason") == "unknown_query_id")
        .then(pl.format("query_id {} is not in queries (or was refused)", pl.col("id")))
        .when(pl.col("reason") == "unknown_doc_id")
        .then(pl.format("doc_id {} is not in corpus (or was refused)", pl.col("doc_id")))
        .alias("detail")
    )


def _plans_for(
    rejected: pl.DataFrame, scans: list[tuple[str, Scan]], table: str
) -> dict[tuple[str, str], pa.Table]:
    def build(part: pa.Table) -> pa.Table:
        return plan_table(part.column("row"), "quarantine", part.column("reason"), part.column("detail"))

    arrow = rejected.select("shard", "row", "reason", "detail").to_arrow()
    arrow = arrow.cast(
        pa.schema(
            [("shard", pa.int32()), ("row", pa.int64()), ("reason", pa.string()), ("detail", pa.string())]
        )
    )
    return split_by_shard(arrow, scans, table, build)


def validate(
    source: Dataset,
    out: str | os.PathLike,
    config: ValidateConfig | None = None,
    *,
    executor: Executor | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Check every row of ``source``; write the good rows to ``out`` and the rest to its quarantine."""
    cfg = config or ValidateConfig()
    if (
        cfg.max_pixels <= 0
        or cfg.max_text_chars <= 0
        or cfg.max_image_bytes <= 0
        or not math.isfinite(cfg.max_pixels)
    ):
        raise ValueError("validate limits must be positive")
    return run_shard_stage(
        source,
        out,
        stage=STAGE,
        config=cfg.to_dict(),
        scan_fn=scan_validate,
        plan_fn=plan_validate,
        executor=executor,
        overwrite=overwrite,
    )
