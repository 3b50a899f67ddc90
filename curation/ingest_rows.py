"""Turning one flat input row into a (query, document, pair) triple, and writing parsed parts.

Every ingest source (JSONL, CSV, Parquet, Hugging Face datasets, image folders, bundled examples)
ends here: a reader produces plain dicts, ``normalise_row`` maps them onto the target fields and
checks their types, and a ``PartWriter`` streams the results of one task into ``_progress/parts/``.

Target fields of a flat row (each names an input column through the mapping, or defaults to the
column of the same name):

    query_id, query_text, query_image, query_instruction, subset, task,
    doc_id, doc_text, doc_image, doc_instruction, label, score

``label`` and ``score`` are the pair's own annotations, not content: they are read only from a
column the mapping names for them (``EXPLICIT_ONLY``), never from a column that merely shares the
name, because a column called ``label`` is usually a class name (the Hugging Face convention) and
one called ``score`` a rating or a vote count. A mapped ``label`` must be a relevance label
(``curation.schema.LABELS``); an empty one means positive.

A missing id becomes a content-hash id (``q-``/``d-`` + 16 hex of sha1 over subset, task,
instruction, text and image key), so identical queries and documents share one id and are stored
once. A documents-only ingest (``spec["documents_only"]``) reads the document side alone
(``DOC_TARGETS``) through the same code, so a document gets the same id either way. A row that
cannot be used raises ``RowError`` with a reason the quarantine records.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from assay.curation import storage
from assay.curation.dataset import TMP_PREFIX, atomic_write_json
from assay.curation.quarantine import QuarantineBuilder
from assay.curation.schema import CORPUS, LABELS, PAIRS, QUARANTINE, QUERIES, SCHEMAS, resolve_image_path

TARGETS = (
    "query_id",
    "query_text",
    "query_image",
    "query_instruction",
    "subset",
    "task",
    "doc_id",
    "doc_text",
    "doc_image",
    "doc_instruction",
    "label",
    "score",
)
#: Targets read only from a column the mapping names, never from a same-named column (see above).
EXPLICIT_ONLY = ("label", "score")
#: The targets of a documents-only ingest: one document per row, no query, no pair.
DOC_TARGETS = ("doc_id", "doc_text", "doc_image", "doc_instruction", "subset")
#: What the quarantine's ``table`` column says for a refused input row (it is not yet a query,
#: a document or a pair).
INPUT_TABLE = "input"
STAGE = "ingest"
ORIGIN = "ingest"
KEY = "_key"  # 16-byte hash of a row's id and content: equal keys are exact repeats
LINE = "_line"  # quarantine: line number relative to the task's byte range (JSONL), fixed on merge
#: One row per input row written: the keys of what it made and where it was, so that the merge can
#: refuse an input row whole, pair and all (curation.ingest_merge: an id given to other content).
INPUT_ROWS = "input_rows"
PART_TABLES = (QUERIES, CORPUS, PAIRS, QUARANTINE, INPUT_ROWS)
PART_SCHEMAS = {
    QUERIES: SCHEMAS[QUERIES].append(pa.field(KEY, pa.binary(16))),
    CORPUS: SCHEMAS[CORPUS].append(pa.field(KEY, pa.binary(16))),
    PAIRS: SCHEMAS[PAIRS].append(pa.field(KEY, pa.binary(16))),
    QUARANTINE: SCHEMAS[QUARANTINE].append(pa.field(LINE, pa.int64())),
    INPUT_ROWS: pa.schema(
        [(t, pa.binary(16)) for t in (QUERIES, CORPUS, PAIRS)] + [("source", pa.string()), (LINE, pa.int64())]
    ),
}
DONE = "done.json"


class RowError(Exception):
    """A row that cannot be ingested: ``reason`` goes to the quarantine, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        bytes: "bytes",
    }.get(type(value), type(value).__name__)


def _where(target: str, spec: dict[str, Any]) -> str:
    col = spec["mapping"].get(target, target)
    return target if col == target else f"{target} (column {col!r})"


def _checked_str(value: str, target: str, spec: dict[str, Any]) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError("invalid_utf8", f"{_where(target, spec)} holds text that is not valid UTF-8") from e
    return value


def _text(row: dict[str, Any], target: str, spec: dict[str, Any]) -> str | None:
    """A text-valued target: a string, or None when absent or empty."""
    value = _value(row, target, spec)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{_where(target, spec)} is {_type_name(value)}, expected a string")
    return _checked_str(value, target, spec)


def _id(row: dict[str, Any], target: str, spec: dict[str, Any]) -> str | None:
    value = _value(row, target, spec)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RowError(
            "wrong_type", f"{_where(target, spec)} is {_type_name(value)}, expected a string or integer"
        )
    return _checked_str(value, target, spec)


def _value(row: dict[str, Any], target: str, spec: dict[str, Any]) -> Any:
    column = spec["mapping"].get(target, None if target in EXPLICIT_ONLY else target)
    value = None if column is None else row.get(column)
    if value is None or value == "":
        return spec["defaults"].get(target, value)
    return value


def _score(row: dict[str, Any], spec: dict[str, Any]) -> float | None:
    value = _value(row, "score", spec)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RowError("wrong_type", f"{_where('score', spec)} is {_type_name(value)}, expected a number")
    try:
        return float(value)
    except ValueError:
        raise RowError("wrong_type", f"{_where('score', spec)} is {value!r}, expected a number") from None


def _label(row: dict[str, Any], spec: dict[str, Any]) -> str:
    """The pair's relevance label: positive unless a mapped label column says otherwise."""
    value = _value(row, "label", spec)
    if value is None or value == "":
        mapping = spec["mapping"]
        stray = row.get("label") if "label" not in mapping and "label" not in mapping.values() else None
        if isinstance(stray, str) and stray in LABELS and stray != "positive":
            # an unread column named label that says this pair is not a positive: reading the row
            # as a positive would state what the input denies
            raise RowError(
                "unmapped_label",
                f"column 'label' holds {stray!r}, a relevance label, but label is read only when "
                "mapped: pass --map label=label to read it as the pair's label (or map the column "
                "to doc_text if it holds class names)",
            )
        return "positive"
    if isinstance(value, str) and value in LABELS:
        return value
    shown = repr(value) if isinstance(value, str | int | float | bool) else _type_name(value)
    raise RowError(
        "invalid_label",
        f"{_where('label', spec)} is {shown}, not a relevance label ({', '.join(LABELS)}): map "
        "label only to a column of relevance labels (--map label=COLUMN); a class name or answer "
        "belongs in doc_text, and with label unmapped every row is a positive pair",
    )


def _decode_b64(data: str, target: str, spec: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise RowError(
            "wrong_type", f"{_where(target, spec)} holds bytes that are not valid base64"
        ) from None


def _relative_path(path: str, root: str) -> str:
    """An absolute path (or URI) inside the data root becomes relative to it; anything else is kept."""
    if os.path.isabs(path) or storage.is_remote(path):
        prefix = root.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _image(row: dict[str, Any], target: str, spec: dict[str, Any]) -> tuple[dict | None, str | None]:
    """An image cell as ``{bytes, path}`` and its key (for ids): ``b:<sha1>`` of inline bytes, or
    ``p:<path>`` of an image given by path (embedded or not, so ``--embed-images`` keeps ids)."""
    value = _value(row, target, spec)
    data: bytes | None = None
    path: str | None = None
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:100]:
            data = _decode_b64(value.split(";base64,", 1)[1], target, spec)
        else:
            path = _checked_str(value, target, spec)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        raw, path = value.get("bytes"), value.get("path")
        if isinstance(raw, str):  # JSON has no bytes: base64
            data = _decode_b64(raw, target, spec)
        elif isinstance(raw, bytes | bytearray | memoryview):
            data = bytes(raw)
        elif raw is not None:
            raise RowError("wrong_type", f"{_where(target, spec)}.bytes is {_type_name(raw)}, expected bytes")
        if path is not None and not isinstance(path, str):
            raise RowError(
                "wrong_type", f"{_where(target, spec)}.path is {_type_name(path)}, expected a string"
            )
        if path == "":
            path = None
        if data is None and path is None:
            return None, None
    else:
        what = "an object without bytes/path keys" if isinstance(value, dict) else _type_name(value)
        raise RowError(
            "wrong_type", f"{_where(target, spec)} is {what}, expected a path, bytes or {{bytes, path}}"
        )
    if path is not None:
        path = _relative_path(path, spec["data_root"])
    key = f"b:{hashlib.sha1(data).hexdigest()}" if data is not None else f"p:{path}"
    if data is None and spec.get("embed_images"):
        data = _embed(path, target, spec)
    return {"bytes": data, "path": path}, key


def _embed(path: str, target: str, spec: dict[str, Any]) -> bytes:
    """Read an image file under the data root; paths that leave it (after symlinks) are refused."""
    if "\x00" in path:
        raise RowError(
            "image_not_found", f"{_where(target, spec)} {path!r} holds a NUL character: no file has this name"
        )
    resolved = resolve_image_path(spec["data_root"], path)
    if not resolved.inside:
        raise RowError(
            "image_path_outside_root",
            f"{_where(target, spec)} {path!r} resolves outside the data root {resolved.root}",
        )
    try:
        return storage.read_bytes(resolved.full)
    except OSError as e:
        # an object store's "no such key" carries no strerror: say what the local error says
        why = e.strerror or (os.strerror(errno.ENOENT) if isinstance(e, FileNotFoundError) else e)
        raise RowError("image_not_found", f"{_where(target, spec)} {path!r}: {why}") from None


def _serialise(fields: tuple) -> bytes:
    """An unambiguous byte string of str/float/None fields (each length-prefixed; None is '~')."""
    parts = []
    for f in fields:
        if f is None:
            parts.append("~")
        else:
            f = f if isinstance(f, str) else repr(f)
            parts.append(f"{len(f)}:{f}")
    return "".join(parts).encode("utf-8", "surrogatepass")


def _id_and_key(given: str | None, prefix: str, content: tuple) -> tuple[str, bytes]:
    """The row's id and its dedup key (id and content together). A missing id becomes a content-hash
    id: ``prefix-`` + 16 hex of sha1 over the content (subset, [task,] instruction, text, image key),
    so identical content gets an identical id and is stored once."""
    data = _serialise(content)
    rid = given or f"{prefix}-{hashlib.sha1(data).hexdigest()[:16]}"
    return rid, hashlib.blake2b(rid.encode("utf-8", "surrogatepass") + b"\0" + data, digest_size=16).digest()


def _document(row: dict[str, Any], spec: dict[str, Any], subset: str | None) -> dict:
    """The document side of a row (with its ``_key``), or ``RowError`` when it has no content.
    Both ingest modes build documents here, so one document gets one id either way."""
    d_instr = _text(row, "doc_instruction", spec)
    d_text = _text(row, "doc_text", spec)
    d_image, d_ikey = _image(row, "doc_image", spec)
    if d_text is None and d_image is None:
        raise RowError(
            "missing_content",
            f"the doc has neither text ({_where('doc_text', spec)}) nor image ({_where('doc_image', spec)})",
        )
    did, dkey = _id_and_key(_id(row, "doc_id", spec), "d", (subset, d_instr, d_text, d_ikey))
    return {
        "doc_id": did,
        "subset": subset,
        "instruction": d_instr,
        "text": d_text,
        "image": d_image,
        KEY: dkey,
    }


def normalise_document(row: dict[str, Any], spec: dict[str, Any]) -> dict:
    """One input row of a documents-only ingest -> a corpus row (with its ``_key``), or ``RowError``."""
    return _document(row, spec, _text(row, "subset", spec))


def normalise_row(row: dict[str, Any], spec: dict[str, Any]) -> tuple[dict, dict, dict]:
    """One flat input row -> (query, doc, pair) rows (each with its ``_key``), or ``RowError``.

    ``spec`` holds ``mapping`` (target -> column), ``defaults`` (target -> constant used when the
    row has no value), ``data_root`` (absolute) and ``embed_images``.
    """
    subset = _text(row, "subset", spec)
    task = _text(row, "task", spec)
    q_instr = _text(row, "query_instruction", spec)
    q_text = _text(row, "query_text", spec)
    q_image, q_ikey = _image(row, "query_image", spec)
    if q_text is None and q_image is None:
        raise RowError(
            "missing_content",
            f"the query has neither text ({_where('query_text', spec)}) "
            f"nor image ({_where('query_image', spec)})",
        )
    doc = _document(row, spec, subset)
    label = _label(row, spec)
    score = _score(row, spec)
    qid, qkey = _id_and_key(_id(row, "query_id", spec), "q", (subset, task, q_instr, q_text, q_ikey))
    query = {
        "query_id": qid,
        "subset": subset,
        "task": task,
        "instruction": q_instr,
        "text": q_text,
        "image": q_image,
        KEY: qkey,
    }
    did = doc["doc_id"]
    pkey = hashlib.blake2b(_serialise((qid, did, label, score)), digest_size=16).digest()
    pair = {
        "query_id": qid,
        "doc_id": did,
        "label": label,
        "score": score,
        "rank": None,
        "judge_p_yes": None,
        "judge_verdict": None,
        "origin": ORIGIN,
        KEY: pkey,
    }
    return query, doc, pair


def plain(value: Any) -> Any:
    """A value the quarantine's JSON record can hold (dates, decimals and the like become strings)."""
    if value is None or isinstance(value, str | bool | int | bytes):
        return value
    if isinstance(value, float):
        return value  # non-finite floats are kept by the quarantine's encoder
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return str(value)


class PartWriter:
    """Writes the parsed output of one task: queries, corpus, pairs and quarantine Parquet files
    under ``part_dir``, streamed in row groups, each renamed into place when complete, then
    ``done.json`` with the task's counts. Exact repeats within the task are written once.

    A ``part_dir`` on object storage (an output that is a URI): the files are streamed to a local
    temporary folder, then each is put whole under ``part_dir``, ``done.json`` last; ``discard``
    removes the local folder (``close`` does too)."""

    ROWS_PER_GROUP = 4096
    BYTES_PER_GROUP = 32 << 20

    def __init__(self, part_dir: str | os.PathLike, source: str):
        self.remote = storage.path(part_dir) if storage.is_remote(part_dir) else None
        if self.remote is not None:
            self.dir = Path(tempfile.mkdtemp(prefix="assay-ingest-part-"))
        else:
            self.dir = Path(part_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.buffers: dict[str, list[dict]] = {t: [] for t in PART_TABLES}
        self.buffer_bytes = dict.fromkeys(PART_TABLES, 0)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.seen: dict[str, set[bytes]] = {t: set() for t in (QUERIES, CORPUS, PAIRS)}
        self.rows_read = 0
        self.counts = dict.fromkeys(PART_TABLES, 0)
        self.repeats = dict.fromkeys((QUERIES, CORPUS, PAIRS), 0)
        self.qb = QuarantineBuilder(INPUT_TABLE, STAGE, source)

    def _tmp(self, table: str) -> Path:
        return self.dir / f"{TMP_PREFIX}{table}.parquet.{os.getpid()}"

    def _append(self, table: str, row: dict[str, Any], nbytes: int = 0) -> None:
        self.buffers[table].append(row)
        self.buffer_bytes[table] += nbytes
        self.counts[table] += 1
        if (
            len(self.buffers[table]) >= self.ROWS_PER_GROUP
            or self.buffer_bytes[table] >= self.BYTES_PER_GROUP
        ):
            self._flush(table)

    def _flush(self, table: str) -> None:
        rows = self.buffers[table]
        if table not in self.writers:
            self.writers[table] = pq.ParquetWriter(self._tmp(table), PART_SCHEMAS[table], compression="zstd")
        if rows:
            self.writers[table].write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMAS[table]))
        self.buffers[table] = []
        self.buffer_bytes[table] = 0

    def add(
        self,
        query: dict | None,
        doc: dict | None,
        pair: dict | None,
        location: str | None = None,
        line: int | None = None,
    ) -> None:
        """Write the parts of one row (None: that table gets nothing, as for a documents-only row),
        and the row's own record in ``INPUT_ROWS`` (its keys; ``location``, ``line`` as for a refused row)."""
        for table, row in ((QUERIES, query), (CORPUS, doc), (PAIRS, pair)):
            if row is None:
                continue
            if row[KEY] in self.seen[table]:
                self.repeats[table] += 1
                continue
            self.seen[table].add(row[KEY])
            image = row.get("image")
            self._append(table, row, len(image["bytes"] or b"") if image else 0)
        keys = {t: None if r is None else r[KEY] for t, r in ((QUERIES, query), (CORPUS, doc), (PAIRS, pair))}
        self._append(INPUT_ROWS, {**keys, "source": location or self.source, LINE: line})

    def quarantine(
        self,
        reason: str,
        detail: str,
        *,
        row: dict[str, Any] | None = None,
        raw: bytes | None = None,
        location: str,
        line: int | None = None,
    ) -> None:
        """A refused row: ``row`` (kept as JSON) or ``raw`` bytes; ``line`` relative to the task."""
        if raw is not None:
            self.qb.add_raw(raw, reason, detail, location=location)
        else:
            self.qb.add(plain(row or {}), reason, detail, location=location)
        record = self.qb.rows.pop()
        record[LINE] = line
        self._append(QUARANTINE, record, len(record["record"]))

    def close(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        for table in PART_TABLES:
            self._flush(table)
            self.writers[table].close()
        for table in PART_TABLES:
            os.replace(self._tmp(table), self.dir / f"{table}.parquet")
        done = {
            "rows_read": self.rows_read,
            "written": self.counts,
            "repeats_in_task": self.repeats,
            **(stats or {}),
        }
        if self.remote is not None:
            storage.put_tree(self.dir, self.remote, replace=False)
            atomic_write_json(self.remote / DONE, done)
            self.discard()
            return done
        atomic_write_json(self.dir / DONE, done)
        return done

    def discard(self) -> None:
        """Remove the local folder of a part written for object storage (nothing for a local part)."""
        if self.remote is not None:
            for w in self.writers.values():
                with contextlib.suppress(Exception):
                    w.close()
            shutil.rmtree(self.dir, ignore_errors=True)
