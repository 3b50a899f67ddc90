"""Ingest readers: how each input format is cut into independent tasks, and how one task is read.

A task is a JSON-able dict (``kind`` picks the reader) that an executor runs in any process:

    jsonl        one byte range of a file, cut at newline boundaries (``chunk_bytes`` each)
    csv          one whole file (quoted fields may hold newlines, so a file is not cut)
    parquet      one row group of a file
    hf           one row range of a Hugging Face dataset saved with ``save_to_disk``
    imagefolder  one chunk of (file, label or caption) items listed by the driver

``run_parse_task`` reads its piece, turns every row into (query, doc, pair) with
``curation.ingest_rows.normalise_row`` and writes them, with the refused rows, to its part folder
under ``_progress/parts/``. A row that cannot be read never stops the task: it is quarantined with
its location (``file:line`` or ``file#row=N``) and a reason.

Inputs may be URIs (``s3://bucket/pairs.jsonl``, a folder of images on object storage,
``curation.storage``): a task names its file by URI and reads it (or its byte range) from there, in
whichever process runs it; a saved Hugging Face dataset on object storage is copied once per machine
into the temporary folder (``storage.local_copy``), since ``datasets`` opens it by path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import sys
import tempfile
from pathlib import Path
from typing import Any

from assay.curation import storage
from assay.curation.ingest_rows import DONE, PartWriter, RowError, normalise_document, normalise_row

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
ITEMS_PER_TASK = 2000  # image folders: files per task
HF_ROWS_PER_TASK = 20_000


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
    }.get(type(value), type(value).__name__)


def ingest_row(
    w: PartWriter, row: dict[str, Any], spec: dict[str, Any], location: str, line: int | None = None
) -> None:
    """Normalise one parsed row and write it, or quarantine it with the reason. In a documents-only
    ingest (``spec["documents_only"]``) the row is one document: no query, no pair."""
    try:
        if spec.get("documents_only"):
            query, doc, pair = None, normalise_document(row, spec), None
        else:
            query, doc, pair = normalise_row(row, spec)
    except RowError as e:
        w.quarantine(e.reason, e.detail, row=row, location=location, line=line)
        return
    except Exception as e:  # a bad row never stops the run
        w.quarantine("unreadable_row", f"{type(e).__name__}: {e}", row=row, location=location, line=line)
        return
    w.add(query, doc, pair, location, line)


# ---------------------------------------------------------------------------------------------- readers


def read_jsonl(task: dict[str, Any], w: PartWriter) -> dict[str, Any]:
    """One byte range of a JSONL file. Line numbers are relative to the range; the merge adds the
    number of lines before it, so quarantine locations are ``file:line`` of the whole file."""
    data = read_range(task["file"], task["start"], task["end"])
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    name, spec = task["name"], task["spec"]
    for i, raw in enumerate(lines, 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if i == 1 and task["start"] == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        if not raw.strip():
            continue
        w.rows_read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            w.quarantine(
                "invalid_utf8", f"byte {e.start} of the line: {e.reason}", raw=raw, location=name, line=i
            )
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            w.quarantine("invalid_json", str(e), raw=raw, location=name, line=i)
            continue
        except RecursionError:
            w.quarantine(
                "invalid_json", "arrays or objects nested too deeply", raw=raw, location=name, line=i
            )
            continue
        if not isinstance(obj, dict):
            w.quarantine(
                "wrong_type",
                f"the line is {_type_name(obj)}, expected a JSON object",
                raw=raw,
                location=name,
                line=i,
            )
            continue
        ingest_row(w, obj, spec, name, line=i)
    return {"file_index": task["file_index"], "lines": len(lines)}


def read_range(path: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of a file (one ranged GET for a URI)."""
    if storage.is_remote(path):
        loc = storage.path(path)
        return loc.fs.cat_file(loc.path, start=start, end=end) if end > start else b""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def open_binary(path: str | os.PathLike, block_size: int | None = None):
    """A file opened for reading bytes; a URI's read ``block_size`` bytes per request (the
    filesystem's default when None: large, for reading a whole file)."""
    if not storage.is_remote(path):
        return open(path, "rb")
    loc = storage.path(path)
    return loc.fs.open(loc.path, "rb", **({"block_size": block_size} if block_size else {}))


def _csv_open(path: str, block_size: int | None = None):
    if storage.is_remote(path):
        return io.TextIOWrapper(
            open_binary(path, block_size), newline="", encoding="utf-8-sig", errors="surrogateescape"
        )
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def read_csv(task: dict[str, Any], w: PartWriter) -> dict[str, Any]:
    """One whole CSV (or TSV) file with a header row; empty cells are missing values."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    name, spec, delim = task["name"], task["spec"], task["delimiter"]
    with _csv_open(task["file"]) as f:
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, [])
        prev = reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                w.rows_read += 1
                w.quarantine("invalid_csv", str(e), raw=b"", location=f"{name}:{prev + 1}")
                if reader.line_num == prev:
                    break
                prev = reader.line_num
                continue
            start, prev = prev + 1, reader.line_num
            if not cells:
                continue  # a blank line
            w.rows_read += 1
            loc = f"{name}:{start}"
            raw = delim.join(cells).encode("utf-8", "surrogateescape")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                w.quarantine("invalid_utf8", f"byte {e.start} of the row: {e.reason}", raw=raw, location=loc)
                continue
            row = {h: (c if c != "" else None) for h, c in zip(header, cells, strict=False)}
            if len(cells) < len(header):
                w.quarantine(
                    "missing_field",
                    f"the row has {len(cells)} fields, the header {len(header)}: "
                    f"no value for {header[len(cells)]!r}",
                    row=row,
                    location=loc,
                )
            elif len(cells) > len(header):
                w.quarantine(
                    "invalid_csv",
                    f"the row has {len(cells)} fields, the header only {len(header)}",
                    raw=raw,
                    location=loc,
                )
            else:
                ingest_row(w, row, spec, loc)
    return {}


def read_parquet(task: dict[str, Any], w: PartWriter) -> dict[str, Any]:
    """One row group of a Parquet file; locations are ``file#row=N`` (0-based, whole file)."""
    pf = storage.parquet_file(task["file"])
    n = task["row_offset"]
    for batch in pf.iter_batches(batch_size=1024, row_groups=[task["row_group"]]):
        for row in batch.to_pylist():
            w.rows_read += 1
            ingest_row(w, row, task["spec"], f"{task['name']}#row={n}")
            n += 1
    return {}


def read_hf(task: dict[str, Any], w: PartWriter) -> dict[str, Any]:
    """A row range of a saved Hugging Face dataset, read as Arrow: ``Image`` features arrive as
    ``{bytes, path}`` without being decoded, ``ClassLabel`` integers become their names."""
    from datasets import ClassLabel, load_from_disk

    ds = load_from_disk(str(hf_local(task["path"])))
    class_labels = {c: f for c, f in ds.features.items() if isinstance(f, ClassLabel)}
    table = ds.with_format("arrow")[task["start"] : task["end"]]
    n = task["start"]
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            for col, feature in class_labels.items():
                if isinstance(row.get(col), int) and row[col] >= 0:
                    row[col] = feature.int2str(row[col])
            w.rows_read += 1
            ingest_row(w, row, task["spec"], f"{task['name']}#row={n}")
            n += 1
    return {}


def read_imagefolder(task: dict[str, Any], w: PartWriter) -> dict[str, Any]:
    """Items ``[location, file, text]``: file -> query image and text -> class label doc
    (classification), text -> caption query and file -> doc image (captions), or file -> doc
    image alone (documents only: ``text_column`` is None)."""
    text_col = task["text_column"]
    for location, file, text in task["items"]:
        w.rows_read += 1
        row = {"file": file} if text_col is None else {"file": file, text_col: text}
        if not file or (text_col is not None and not text):
            missing = "file" if not file else text_col
            w.quarantine("missing_field", f"no value for {missing!r}", row=row, location=location)
            continue
        ingest_row(w, row, task["spec"], location)
    return {}


READERS = {
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
    "hf": read_hf,
    "imagefolder": read_imagefolder,
}


def run_parse_task(task: dict[str, Any]) -> dict[str, Any]:
    """Read one task's piece of the input into its part folder; a finished part is not redone."""
    done = storage.path(task["part_dir"]) / DONE
    if done.exists():
        return json.loads(done.read_text())
    w = PartWriter(task["part_dir"], task["name"])
    try:
        stats = READERS[task["kind"]](task, w)
        return w.close({"name": task["name"], **stats})
    finally:
        w.discard()  # a part for a URI is written locally first: nothing left behind


# --------------------------------------------------------------------------------------------- planning


def jsonl_tasks(files: list[Path], names: list[str], chunk_bytes: int) -> list[dict[str, Any]]:
    """Byte ranges of about ``chunk_bytes``, each ending just after a newline (or at the end)."""
    tasks = []
    for fi, (path, name) in enumerate(zip(files, names, strict=True)):
        size = storage.size(path)
        cuts = [0]
        with open_binary(path, block_size=1 << 16) as f:
            while cuts[-1] + chunk_bytes < size:
                f.seek(cuts[-1] + chunk_bytes - 1)
                pos = cuts[-1] + chunk_bytes - 1
                while True:
                    block = f.read(1 << 16)
                    if not block:
                        pos = size
                        break
                    nl = block.find(b"\n")
                    if nl >= 0:
                        pos += nl + 1
                        break
                    pos += len(block)
                if pos >= size:
                    break
                cuts.append(pos)
        cuts.append(size)
        tasks += [
            {"kind": "jsonl", "file": str(path), "name": name, "file_index": fi, "start": a, "end": b}
            for a, b in zip(cuts, cuts[1:], strict=False)
            if b > a
        ]
    return tasks


def csv_tasks(files: list[Path], names: list[str], delimiter: str) -> list[dict[str, Any]]:
    return [
        {"kind": "csv", "file": str(p), "name": n, "delimiter": delimiter}
        for p, n in zip(files, names, strict=True)
    ]


def parquet_tasks(files: list[Path], names: list[str]) -> list[dict[str, Any]]:
    tasks = []
    for path, name in zip(files, names, strict=True):
        meta = storage.read_metadata(path)
        offset = 0
        for rg in range(meta.num_row_groups):
            tasks.append(
                {"kind": "parquet", "file": str(path), "name": name, "row_group": rg, "row_offset": offset}
            )
            offset += meta.row_group(rg).num_rows
    return tasks


def hf_local(path: str | os.PathLike) -> Path:
    """A saved Hugging Face dataset as a local folder: a URI's files are downloaded once into the
    temporary folder (per machine, per content: ``storage.local_copy``); a local path as it is."""
    if not storage.is_remote(path):
        return Path(path)
    return storage.local_copy(path, Path(tempfile.gettempdir()) / "assay-hf-inputs")


def hf_tasks(path: Path | str, name: str, num_rows: int, rows_per_task: int = HF_ROWS_PER_TASK) -> list[dict]:
    return [
        {"kind": "hf", "path": str(path), "name": name, "start": s, "end": min(s + rows_per_task, num_rows)}
        for s in range(0, num_rows, rows_per_task)
    ]


def imagefolder_tasks(
    items: list[list], text_column: str | None, per_task: int = ITEMS_PER_TASK
) -> list[dict]:
    return [
        {
            "kind": "imagefolder",
            "name": "imagefolder",
            "text_column": text_column,
            "items": items[i : i + per_task],
        }
        for i in range(0, len(items), per_task)
    ]


def csv_header(path: Path, delimiter: str) -> list[str]:
    """The header row of a CSV file (an error names the file when there is none)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _csv_open(str(path), block_size=1 << 20) as f:
        try:
            header = next(csv.reader(f, delimiter=delimiter), None)
        except csv.Error as e:
            raise ValueError(f"{path}: line 1 (the header row) cannot be read as CSV: {e}") from None
    if not header:
        raise ValueError(f"{path}: empty CSV file, expected a header row")
    for i, name in enumerate(header, 1):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raw = name.encode("utf-8", "surrogateescape")
            raise ValueError(
                f"{path}: line 1 (the header row), column {i} {raw!r} is not valid UTF-8; "
                "assay reads UTF-8 text: save the file as UTF-8"
            ) from None
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise ValueError(f"{path}: the header names a column twice: {', '.join(dupes)}")
    return header


def jsonl_has_key(files: list[Path], key: str, sample_lines: int = 1000) -> bool:
    """Whether any row of the JSONL files has ``key``: parse the first lines, then search the bytes
    for the quoted key (a cheap check that never loads a file whole)."""
    for path in files:
        with open_binary(path, block_size=1 << 20) as f:
            for _, raw in zip(range(sample_lines), f, strict=False):
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict) and key in obj:
                    return True
    needle = json.dumps(key).encode()
    for path in files:
        with open_binary(path) as f:
            tail = b""
            while block := f.read(8 << 20):
                if needle in tail + block:
                    return True
                tail = block[-len(needle) :]
    return False


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, sorted, hidden files and folders skipped. (A URI's: listed
    with one recursive listing, in the same order as a local folder's.)"""
    if storage.is_remote(root):
        loc = storage.path(root)
        rels = [
            rel
            for rel in storage.files_under(loc)
            if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in rel.split("/"))
        ]
        return [loc / rel for rel in sorted(rels, key=lambda rel: rel.split("/"))]
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def relative_name(p: Any, root: Any) -> str:
    """``p``'s path below the folder ``root``, with ``/`` (a local path or a URI)."""
    if storage.is_remote(p):
        base = str(storage.path(root)).rstrip("/") + "/"
        return str(p)[len(base) :] if str(p).startswith(base) else str(p)
    return p.relative_to(root).as_posix()


def read_file_csv(path: Path, text_column: str) -> list[list]:
    """Items ``[location, file, text]`` from a labels or captions CSV with columns file and
    ``text_column``; rows with an empty cell are kept so the task quarantines them."""
    header = csv_header(path, ",")
    missing = [c for c in ("file", text_column) if c not in header]
    if missing:
        raise ValueError(
            f"{path}: no column {' or '.join(repr(m) for m in missing)} "
            f"(the header has {', '.join(header)}); expected columns file,{text_column}"
        )
    fi, ti = header.index("file"), header.index(text_column)
    items = []
    with _csv_open(str(path)) as f:
        reader = csv.reader(f)
        next(reader)
        prev = reader.line_num
        for cells in reader:
            start, prev = prev + 1, reader.line_num
            if not cells:
                continue
            items.append(
                [
                    f"{path.name}:{start}",
                    cells[fi] if fi < len(cells) else None,
                    cells[ti] if ti < len(cells) else None,
                ]
            )
    return items
