"""The assay dataset format: one place that says what every table holds.

A dataset is a directory of Parquet shards, ID-normalised (DESIGN.md; README.md shows it):

    <dataset>/
      manifest.json               schema version, lineage, counts, config, code version
      queries/part-*.parquet      query_id, subset, task, instruction, text, image
      corpus/part-*.parquet       doc_id, subset, instruction, text, image
      pairs/part-*.parquet        query_id, doc_id, label, score, rank, judge_p_yes, judge_verdict, origin
      quarantine/*.parquet        refused rows, whole, with reason and stage

Every other package imports the schemas and constants from here; nothing else spells a column name
as a bare string when it can use these.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

#: ``image`` follows the Hugging Face datasets convention: bytes inline, or a path under the data root.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

QUERIES = "queries"
CORPUS = "corpus"
PAIRS = "pairs"
QUARANTINE = "quarantine"
#: The tables a stage reads and writes, in the order stages process them (pairs last: they refer
#: to the other two).
DATA_TABLES = (QUERIES, CORPUS, PAIRS)

QUERIES_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("subset", pa.string()),
        pa.field("task", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("text", pa.string()),
        pa.field("image", IMAGE_TYPE),
    ]
)

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("subset", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("text", pa.string()),
        pa.field("image", IMAGE_TYPE),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("rank", pa.int32()),
        pa.field("judge_p_yes", pa.float32()),
        pa.field("judge_verdict", pa.string()),
        pa.field("origin", pa.string()),
    ]
)

#: A quarantined row keeps everything: ``record`` is the whole row as JSON (bytes as base64, see
#: curation.quarantine) or, when the row could not even be parsed, the raw bytes of the input.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string()),
        pa.field("id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("source", pa.string()),
        pa.field("record_format", pa.string()),
        pa.field("record", pa.binary()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    QUERIES: QUERIES_SCHEMA,
    CORPUS: CORPUS_SCHEMA,
    PAIRS: PAIRS_SCHEMA,
    QUARANTINE: QUARANTINE_SCHEMA,
}

#: The id column of each table; pairs are identified by (query_id, doc_id).
ID_COLUMN = {QUERIES: "query_id", CORPUS: "doc_id"}
#: The columns a model reads from a query or corpus row (judging, mining): id, where it belongs, content.
ROW_COLUMNS = {
    QUERIES: ["query_id", "subset", "task", "instruction", "text", "image"],
    CORPUS: ["doc_id", "subset", "instruction", "text", "image"],
}

#: Pair labels (DESIGN.md): false_negative = judged relevant though not gold.
#: How a missing (null) subset, task, label, stage or reason is spelled in counts, metrics and reports.
NULL_KEY = "(none)"

LABELS = ("positive", "negative", "hard_negative", "false_negative")
#: The MMEB meta-tasks; a user's own task name is allowed too.
TASKS = ("classification", "vqa", "retrieval", "grounding", "visdoc")
VERDICTS = ("yes", "no")


def empty_table(table: str) -> pa.Table:
    """An empty table with the schema of ``table``."""
    return SCHEMAS[table].empty_table()


@dataclass(frozen=True)
class ResolvedPath:
    """An image path resolved under a data root, symlinks followed (``root`` and ``full`` are real
    paths); ``inside`` is False when it leaves the root, and then nothing should read it."""

    root: str
    full: str
    inside: bool


def resolve_image_path(data_root: str | os.PathLike, path: str) -> ResolvedPath:
    """Where an ``image.path`` of the dataset really points. Every reader of image files goes
    through this, so no stage reads outside the data root (``..``, absolute paths, symlinks). The
    root may be a URI (images on object storage): then ``full`` is one too."""
    from assay.curation import storage

    return ResolvedPath(*storage.resolve_under(data_root, path))


def resolve_image_cell(image: dict[str, Any] | None, data_root: str | os.PathLike) -> dict[str, Any] | None:
    """An ``image`` cell with its path made absolute under the data root, for a reader that opens it.

    A path that leaves the root (``..``, absolute, a symlink out) is refused with ``ValueError``:
    validate quarantines such rows, so meeting one later means the dataset was not validated.
    """
    if not image:
        return None
    path = image.get("path")
    if path is not None:
        resolved = resolve_image_path(data_root, path)
        if not resolved.inside:
            raise ValueError(
                f"image path {path!r} resolves to {resolved.full}, outside the data root {resolved.root}"
            )
        path = resolved.full
    return {"bytes": image.get("bytes"), "path": path}


def load_image(value: Any, root: str | os.PathLike | None = None) -> Any:
    """An RGB PIL image from a PIL image, raw bytes, a path or a ``{bytes, path}`` cell: the one image
    reader of the judge's backends, the encoders and the embedder.

    A relative path is resolved under ``root`` (the dataset's data root), as the dataset format says.
    The file is closed before returning (``convert`` makes the copy that is returned).
    """
    from PIL import Image  # PIL only where an image is read

    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, bytes | bytearray):
        with Image.open(io.BytesIO(value)) as im:
            return im.convert("RGB")
    if isinstance(value, str | os.PathLike):
        from assay.curation import storage

        if storage.is_remote(value):
            return load_image(storage.read_bytes(value))
        path = Path(value)
        if not path.is_absolute() and root is not None:
            if storage.is_remote(root):
                return load_image(storage.read_bytes(storage.join(root, str(path))))
            path = Path(root) / path
        with Image.open(path) as im:
            return im.convert("RGB")
    raise TypeError(f"cannot read an image from {type(value).__name__}")
