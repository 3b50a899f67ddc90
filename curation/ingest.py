"""The ingest stage: JSONL, CSV, Parquet, Hugging Face datasets and image folders -> an assay dataset.

Each input row is one (query, document) pair (or, with ``documents_only``, one document of a
corpus: no queries, no pairs); ``curation.ingest_rows`` maps it onto the target fields
(``TARGETS``) through a column mapping and checks it, ``curation.ingest_sources`` cuts each
format into independent read tasks, and ``curation.ingest_merge.run_ingest`` runs them through an
executor, drops exact repeats (ID normalisation) and writes the shards: resumably, so a killed run
rerun with the same arguments ends with the very same files. This module checks the arguments and
the inputs (a bad format, file, mapping or column is an ``IngestError`` that names it) and picks
the tasks. The bundled examples live in ``curation.examples``.

Example::

    from assay.curation.ingest import ingest
    manifest = ingest("pairs.jsonl", "data/pairs", mapping={"query_text": "question", "doc_image": "img"},
                      subset="my-vqa", task="vqa")
    pool = ingest("docs.jsonl", "data/pool", mapping={"doc_text": "passage"}, subset="my-vqa",
                  documents_only=True)  # a corpus alone, e.g. a mining pool
    splits = ingest_split_folders("shapes/", "data/shapes")  # shapes/{train,test}/<class>/*.png

Inputs and outputs may be URIs of any fsspec filesystem (``curation.storage``): a file, a folder of
files or an image folder on ``s3://`` is read from there (the image paths stay relative to the
data root, which is then a URI too), and an output URI gets the dataset and, while the run lasts,
its ``_progress/`` objects.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from assay.curation import storage
from assay.curation.dataset import (
    Dataset,
    Manifest,
    atomic_write_bytes,
    fingerprint,
)
from assay.curation.executor import Executor, LocalExecutor
from assay.curation.ingest_merge import run_ingest
from assay.curation.ingest_rows import DOC_TARGETS, TARGETS
from assay.curation.ingest_sources import (
    IMAGE_EXTENSIONS,
    csv_header,
    csv_tasks,
    hf_local,
    hf_tasks,
    imagefolder_tasks,
    jsonl_has_key,
    jsonl_tasks,
    list_images,
    parquet_tasks,
    read_file_csv,
    read_range,
    relative_name,
)
from assay.curation.schema import PAIRS
from assay.curation.truth import TRUTH_DIR, split_truth_path, split_truth_ref, write_truth

__all__ = [
    "DOC_TARGETS",
    "FORMATS",
    "TARGETS",
    "IngestError",
    "infer_format",
    "ingest",
    "ingest_split_folders",
    "split_folders",
    "load_mapping",
    "parse_map_flags",
    "run_ingest",
]

FORMATS = ("jsonl", "csv", "parquet", "hf", "imagefolder", "example")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
FILE_EXTENSIONS = {
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv", ".tsv"),
    "parquet": (".parquet", ".pq"),
}
#: Byte-order marks of text encodings assay does not read (a UTF-8 one is skipped when reading).
FOREIGN_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
DEFAULT_ROWS_PER_SHARD = 50_000
DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_TASK = "retrieval"
#: Folder names that make an image folder's top level a set of splits (Hugging Face's imagefolder).
SPLIT_NAMES = ("train", "validation", "val", "dev", "test")

#: Instructions of the image-folder subsets, in the style of the paper's per-sub-dataset templates
#: (query: ``Instruct: {instruction} <image> Query: {text}``).
CLASSIFY_QUERY_INSTRUCTION = "Represent the given image for classification."
CLASS_LABEL_INSTRUCTION = "Represent the given class label."
CAPTION_QUERY_INSTRUCTION = "Find an image that matches the given caption."
IMAGE_DOC_INSTRUCTION = "Represent the given image."


class IngestError(ValueError):
    """Arguments or inputs the ingest cannot use; the message names the file, column or option."""


# ---------------------------------------------------------------------------------------- the mapping


def check_mapping(mapping: Mapping[str, Any], origin: str) -> dict[str, str]:
    """A target -> column mapping with known targets and string columns, or ``IngestError``."""
    if not isinstance(mapping, Mapping):
        raise IngestError(f"{origin}: expected a mapping of target: column, found {type(mapping).__name__}")
    out = {}
    for target, column in mapping.items():
        if target not in TARGETS:
            raise IngestError(f"{origin}: unknown target {target!r}; the targets are {', '.join(TARGETS)}")
        if not isinstance(column, str) or not column:
            raise IngestError(f"{origin}: the column for {target!r} must be a column name, found {column!r}")
        out[str(target)] = column
    return out


def load_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Read a YAML column mapping (``query_text: question`` per line)."""
    path = storage.path(path)
    shown = storage.display(path)
    try:
        obj = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown}: mapping file not found") from None
    except yaml.YAMLError as e:
        raise IngestError(f"{shown}: not valid YAML ({e})") from None
    if obj is None:
        raise IngestError(
            f"{shown}: the mapping file is empty; expected lines such as 'query_text: question'"
        )
    return check_mapping(obj, shown)


def parse_map_flags(flags: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["query_text=question", ...]`` -> ``{"query_text": "question"}``."""
    out = {}
    for flag in flags:
        target, sep, column = flag.partition("=")
        if not sep or not target.strip() or not column.strip():
            raise IngestError(f"--map {flag!r}: expected TARGET=COLUMN, e.g. --map query_text=question")
        out[target.strip()] = column.strip()
    return check_mapping(out, "--map")


def _resolve_mapping(mapping: Mapping[str, str] | str | os.PathLike | None) -> dict[str, str]:
    if mapping is None:
        return {}
    if isinstance(mapping, str | os.PathLike):
        return load_mapping(mapping)
    return check_mapping(mapping, "mapping")


# ---------------------------------------------------------------------------------------- the inputs


def infer_format(source: str | os.PathLike) -> str:
    """The format of ``source`` from its extension, or from what a folder holds."""
    from assay.curation.examples import EXAMPLES

    path = storage.path(source)
    if not path.exists():
        if str(source) in EXAMPLES:
            return "example"
        raise FileNotFoundError(f"{storage.display(source)}: no such file or folder")
    if path.is_file():
        fmt = EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise IngestError(
                f"{storage.display(source)}: cannot tell the format from the extension {path.suffix!r}; pass "
                f"--format ({', '.join(FORMATS[:-1])})"
            )
        return fmt
    if any((path / f).exists() for f in ("state.json", "dataset_info.json", "dataset_dict.json")):
        return "hf"
    if storage.is_remote(path):
        suffixes = {posixpath.splitext(rel)[1].lower() for rel in storage.files_under(path)}
    else:
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
    found = {fmt for ext, fmt in EXTENSIONS.items() if ext in suffixes}
    shown = storage.display(source)
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        raise IngestError(f"{shown}: the folder holds {' and '.join(sorted(found))} files; pass --format")
    if list_images(path):
        return "imagefolder"
    raise IngestError(f"{shown}: found no JSONL, CSV, Parquet, saved HF dataset or images in this folder")


def _input_files(src: Path, fmt: str) -> list[Path]:
    if src.is_file():
        return [src]
    if storage.is_remote(src):  # one recursive listing; the same order as a local folder's
        rels = [
            rel
            for rel in storage.files_under(src)
            if posixpath.splitext(rel)[1].lower() in FILE_EXTENSIONS[fmt]
            and not any(part.startswith((".", "_")) for part in rel.split("/"))
        ]
        files = [src / rel for rel in sorted(rels, key=lambda rel: rel.split("/"))]
    else:
        files = sorted(
            p
            for p in src.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FILE_EXTENSIONS[fmt]
            and not any(part.startswith((".", "_")) for part in p.relative_to(src).parts)
        )
    if not files:
        raise IngestError(
            f"{storage.display(src)}: no {fmt} files ({', '.join(FILE_EXTENSIONS[fmt])}) in this folder"
        )
    return files


def _check_files(src: Path, fmt: str, files: list[Path], delimiter: str) -> None:
    """Refuse, before anything is written, input files that cannot be read at all: all empty, text
    in another encoding than UTF-8, a CSV without a usable header, a Parquet file without its footer.
    (A bad row inside a readable file is quarantined instead.) The error names the file."""
    sizes = [storage.size(p) for p in files]
    if all(n == 0 for n in sizes):
        shown = storage.display(src)
        what = f"{shown}: the file is empty" if src.is_file() else f"{shown}: every {fmt} file in it is empty"
        raise IngestError(f"{what} (0 bytes): there are no rows to ingest")
    for path, size in zip(files, sizes, strict=True):
        if size == 0:
            continue
        if fmt == "parquet":
            try:
                storage.read_metadata(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise IngestError(
                    f"{storage.display(path)}: not a readable Parquet file ({e}); is it truncated, or "
                    "still being written?"
                ) from None
            continue
        head = read_range(path, 0, min(4, size))
        for bom, encoding in FOREIGN_BOMS:
            if head.startswith(bom):
                shown = storage.display(path)
                raise IngestError(
                    f"{shown}: the file is {encoding} text (it starts with a {encoding} byte-order mark); "
                    f"assay reads UTF-8: convert it first, e.g. iconv -f {encoding} -t UTF-8 {shown} > "
                    f"{path.with_suffix('.utf8' + path.suffix).name}"
                )
        if fmt == "csv":
            csv_header(path, delimiter)


def _inputs_fingerprint(files: list[Path]) -> dict[str, Any]:
    """What the run read (sizes and modification times; on object storage sizes and ETags), so a
    changed input is not resumed into."""
    if files and storage.is_remote(files[0]):
        stats = _remote_stats(files)
    else:
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"files": len(stats), "bytes": sum(s[1] for s in stats), "fingerprint": fingerprint(stats)}


def _remote_stats(files: list[Any]) -> list[tuple[str, int, str]]:
    """(URI, size, ETag or modification time) of files on object storage: one listing per folder,
    not one request per file (an image folder holds thousands)."""
    infos: dict[str, dict[str, Any]] = {}
    for parent in sorted({posixpath.dirname(storage.path(p).path) for p in files}):
        fs = storage.path(files[0]).fs
        with contextlib.suppress(FileNotFoundError):
            infos.update({i["name"].rstrip("/"): i for i in fs.ls(parent, detail=True)})
    stats = []
    for p in files:
        loc = storage.path(p)
        info = infos.get(loc.path.rstrip("/")) or loc.fs.info(loc.path)
        tag = next(
            (str(info[k]) for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if info.get(k)), ""
        )
        stats.append((str(p), int(info.get("size") or 0), tag))
    return stats


def _check_columns(fmt: str, files: list[Path], mapping: dict[str, str], delimiter: str) -> None:
    """Every mapped column must exist in the input; the error names the file and the column."""
    if not mapping:
        return
    if fmt == "jsonl":
        for target, column in mapping.items():
            if not jsonl_has_key(files, column):
                raise IngestError(
                    f"--map {target}={column}: no row of {', '.join(storage.display(f) for f in files)} "
                    f"has the key {column!r}"
                )
        return
    for path in files:
        if fmt == "csv":
            columns = csv_header(path, delimiter)
        elif storage.is_remote(path):
            columns = storage.read_metadata(path).schema.to_arrow_schema().names
        else:
            columns = pq.read_schema(path).names
        for target, column in mapping.items():
            if column not in columns:
                raise IngestError(
                    f"--map {target}={column}: {storage.display(path)} has no column {column!r} "
                    f"(its columns: {', '.join(columns)})"
                )


def _load_hf(src: Path):
    from datasets import DatasetDict, load_from_disk

    shown = storage.display(src)
    if (src / "dataset_dict.json").exists():
        splits = sorted(p.name for p in src.iterdir() if p.is_dir())
        raise IngestError(
            f"{shown} is a DatasetDict with splits {', '.join(splits)}: ingest one split at a "
            f"time, e.g. {storage.display(src / splits[0])} (splits stay apart)"
            if splits
            else f"{shown}: no splits"
        )
    try:
        ds = load_from_disk(str(hf_local(src)))
    except FileNotFoundError as e:
        raise IngestError(f"{shown}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, DatasetDict):
        raise IngestError(f"{shown} is a DatasetDict: ingest one split at a time")
    return ds


# ------------------------------------------------------------------------------------------- the API


def ingest(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    mapping: Mapping[str, str] | str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    embed_images: bool = False,
    subset: str | None = None,
    task: str | None = None,
    labels: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    executor: Executor | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    documents_only: bool = False,
) -> Manifest:
    """Ingest ``source`` into a new dataset at ``out``; resumable, see the module docstring.

    Args:
        source: a JSONL/CSV/Parquet file or a folder of them, a folder saved with
            ``datasets.Dataset.save_to_disk``, or an image folder.
        format: jsonl, csv, parquet, hf or imagefolder; inferred from the extension when None.
            (Bundled examples: ``curation.examples.ingest_example``.)
        mapping: target -> input column (targets: ``TARGETS``), or a YAML file holding one.
            Unmapped targets read the column of the same name when there is one, except ``label``
            and ``score``: those are read only when mapped (a column named ``label`` is usually a
            class name). A mapped label must be one of ``curation.schema.LABELS`` (else the row
            is quarantined, ``invalid_label``); empty means positive.
        data_root: where relative image paths are resolved (default: the input file's folder);
            recorded as the dataset's data root, paths stay relative.
        embed_images: read image files into the dataset (paths outside the data root are refused).
        subset, task: for rows without one (default subset: the input's name; task: retrieval).
        labels, captions: image folders only: a CSV ``file,label`` (classification) or
            ``file,caption`` (retrieval: caption -> image) instead of one subfolder per class.
        rows_per_shard: rows per output Parquet shard.
        executor: runs the tasks (default: ``LocalExecutor``, in process).
        overwrite: replace ``out`` if it holds a dataset or another run.
        chunk_bytes: size of the byte ranges a JSONL file is cut into.
        documents_only: each row is one document (targets ``DOC_TARGETS``): the dataset holds a
            corpus and no queries or pairs (e.g. a pool to mine negatives from). A document
            gets the same content-hash id as when it is ingested as part of a pair (give the same
            subset). For an image folder, every image is a document (default subset: retrieval,
            as with ``captions``).
    """
    src = storage.path(source)
    fmt = format or ("imagefolder" if labels or captions else infer_format(src))
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "example":
        raise IngestError(
            "bundled examples write two datasets (train, test): use "
            "assay.curation.examples.ingest_example(name, out)"
        )
    if not src.exists():
        raise FileNotFoundError(f"{storage.display(src)}: no such file or folder")
    if rows_per_shard < 1 or chunk_bytes < 1:
        raise IngestError("rows_per_shard and chunk_bytes must be positive")
    executor = executor or LocalExecutor()
    if documents_only:
        _check_documents_only(mapping, task, labels, captions)
    if fmt == "imagefolder":
        splits = [] if labels or captions or documents_only else split_folders(src)
        if splits:
            raise IngestError(
                f"{storage.display(src)} holds split folders ({', '.join(splits)}), not classes: "
                "ingest_split_folders writes one dataset per split (the CLI does this by itself)"
            )
        if mapping or task or data_root:
            raise IngestError(
                "--map/--mapping, --task and --data-root do not apply to image folders "
                "(the task follows from --labels or --captions; paths are relative to the folder)"
            )
        return _ingest_imagefolder(
            src,
            out,
            labels=labels,
            captions=captions,
            subset=subset,
            embed_images=embed_images,
            rows_per_shard=rows_per_shard,
            executor=executor,
            overwrite=overwrite,
            documents_only=documents_only,
        )
    if labels or captions:
        raise IngestError("--labels and --captions apply to image folders (--format imagefolder) only")
    explicit = _resolve_mapping(mapping)
    root = storage.path(data_root) if data_root is not None else (src if src.is_dir() else src.parent)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {storage.display(root)}: no such folder")
    root = storage.path(storage.absolute(root))
    delimiter = "\t" if src.suffix.lower() == ".tsv" else ","
    default_subset = subset or src.stem
    if fmt == "hf":
        if src.is_file():
            raise IngestError(
                f"{storage.display(src)}: a saved Hugging Face dataset is a folder "
                "(datasets.Dataset.save_to_disk)"
            )
        ds = _load_hf(src)
        missing = [(t, c) for t, c in explicit.items() if c not in ds.column_names]
        if missing:
            t, c = missing[0]
            raise IngestError(
                f"--map {t}={c}: {storage.display(src)} has no column {c!r} "
                f"(its columns: {', '.join(ds.column_names)})"
            )
        files = sorted(p for p in src.iterdir() if p.is_file())
        tasks = hf_tasks(storage.absolute(src), src.name, len(ds))
    else:
        files = _input_files(src, fmt)
        _check_files(src, fmt, files, delimiter)
        _check_columns(fmt, files, explicit, delimiter)
        single = src.is_file()
        names = [p.name if single else relative_name(p, src) for p in files]
        if fmt == "jsonl":
            tasks = jsonl_tasks(files, names, chunk_bytes)
        elif fmt == "csv":
            tasks = csv_tasks(files, names, delimiter)
        else:
            tasks = parquet_tasks(files, names)
    spec = {
        "mapping": explicit,
        "defaults": {"subset": default_subset, "task": task or DEFAULT_TASK},
        "data_root": str(root),
        "embed_images": bool(embed_images),
        "documents_only": bool(documents_only),
    }
    config = {
        "format": fmt,
        "source": storage.absolute(src),
        "documents_only": bool(documents_only),
        "mapping": explicit,
        "subset": subset,
        "task": task,
        "data_root": str(root),
        "embed_images": bool(embed_images),
        "rows_per_shard": rows_per_shard,
        "chunk_bytes": chunk_bytes if fmt == "jsonl" else None,
        "inputs": _inputs_fingerprint(files),
    }
    return run_ingest(
        out,
        config=config,
        spec=spec,
        data_root=str(root),
        plan_tasks=lambda _: tasks,
        rows_per_shard=rows_per_shard,
        executor=executor,
        overwrite=overwrite,
    )


def split_folders(source: str | os.PathLike) -> list[str]:
    """The split folders of an image folder laid out ``split/class/image`` (every top-level folder
    a split name of ``SPLIT_NAMES``, each holding class folders); ``[]`` for any other layout."""
    src = storage.path(source)
    if not src.is_dir():
        return []
    subs = [p for p in src.iterdir() if not p.name.startswith(".") and p.is_dir()]
    if not subs or any(p.name not in SPLIT_NAMES for p in subs):
        return []
    if not any(q.is_dir() for p in subs for q in p.iterdir()):
        return []
    return sorted((p.name for p in subs), key=SPLIT_NAMES.index)


def ingest_split_folders(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    subset: str | None = None,
    embed_images: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    executor: Executor | None = None,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """A class-per-folder image dataset with split folders (``SOURCE/train/<class>/*.png``,
    ``SOURCE/test/<class>/*.png``, ...) -> one dataset per split, ``OUT/<split>``, the layout the
    bundled example writes. Each image is one classification query whose positive is its class
    name; the class documents get the same ids in every split.

    Beside the splits, ``OUT/truth/<split>.parquet`` holds each split's truth (``curation.truth``,
    complete): an image matches its own class and no other, so the labels are the whole truth and
    ``assay eval --truth`` / ``assay judge --truth`` work on this data as on the example. Each split
    resumes as ``ingest`` does; the truth is rewritten from the finished split (same bytes)."""
    src = storage.path(source)
    splits = split_folders(src)
    if not splits:
        raise IngestError(
            f"{storage.display(src)}: not an image folder of splits; expected only folders named "
            f"{', '.join(SPLIT_NAMES)}, each holding one folder per class"
        )
    out = storage.path(out)
    manifests = {}
    for split in splits:
        manifests[split] = _ingest_imagefolder(
            src / split,
            out / split,
            labels=None,
            captions=None,
            subset=subset,
            embed_images=embed_images,
            rows_per_shard=rows_per_shard,
            executor=executor or LocalExecutor(),
            overwrite=overwrite,
            extra={"truth": split_truth_ref(split)},
        )
        pairs = [
            pair
            for batch in Dataset(out / split).iter_batches(PAIRS, columns=["query_id", "doc_id"])
            for pair in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
        ]
        if storage.is_remote(out):  # written locally, then put whole
            with tempfile.TemporaryDirectory(prefix="assay-truth-") as tmp:
                local = write_truth(Path(tmp) / f"{split}.parquet", pairs)
                atomic_write_bytes(out / TRUTH_DIR / f"{split}.parquet", local.read_bytes())
        else:
            write_truth(split_truth_path(out, split), pairs)
    return manifests


def _check_documents_only(mapping, task, labels, captions) -> None:
    """A documents-only ingest reads the document side alone; anything about queries or pairs is
    refused, so a mapping meant for pairs is not half applied."""
    if task:
        raise IngestError("--task does not apply to --documents: documents have no task (queries do)")
    if labels or captions:
        raise IngestError(
            "--labels and --captions make (query, document) pairs; with --documents every image of "
            "the folder is one document: drop --labels/--captions"
        )
    resolved = _resolve_mapping(mapping)
    other = [t for t in resolved if t not in DOC_TARGETS]
    if other:
        raise IngestError(
            f"--documents reads one document per row; the mapping's {', '.join(other)} do not apply "
            f"(the targets are {', '.join(DOC_TARGETS)})"
        )


def _ingest_imagefolder(
    src: Path,
    out: str | os.PathLike,
    *,
    labels,
    captions,
    subset,
    embed_images,
    rows_per_shard: int,
    executor: Executor,
    overwrite: bool,
    documents_only: bool = False,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """One subfolder per class, a flat folder plus a labels/captions CSV, or every image as one
    document (``documents_only``); see ``ingest``. The class name, label or caption is content (a
    document's or query's text), never the pair's relevance label: every pair is positive."""
    shown = storage.display(src)
    if not src.is_dir():
        raise IngestError(
            f"{shown} is not a folder: image folders (--format imagefolder, --labels, --captions) need one"
        )
    if labels and captions:
        raise IngestError("pass --labels or --captions, not both")
    root = storage.absolute(src)
    if documents_only:
        text_column, mode = None, "documents"
        inputs = list_images(src)
        if not inputs:
            raise IngestError(f"{shown}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        items = [[relative_name(p, src)] * 2 + [None] for p in inputs]
    elif labels or captions:
        csv_path = storage.path(labels or captions)
        if not csv_path.is_file():
            raise FileNotFoundError(f"{storage.display(csv_path)}: no such file")
        text_column = "label" if labels else "caption"
        items = read_file_csv(csv_path, text_column)
        inputs = [csv_path]
        mode = "labels" if labels else "captions"
    else:
        classes = [p for p in src.iterdir() if not p.name.startswith(".") and p.is_dir()]
        if not classes:
            raise IngestError(
                f"{shown}: no class subfolders; an image folder holds one subfolder per class "
                "(or pass --labels FILE.csv or --captions FILE.csv)"
            )
        text_column, mode = "label", "classes"
        inputs = list_images(src)
        items = []
        for p in inputs:
            rel = relative_name(p, src)
            parts = rel.split("/")
            items.append([rel, rel, parts[0] if len(parts) > 1 else None])
    if documents_only:
        task = None
        spec_map = {"doc_image": "file"}
        defaults = {"subset": subset or "retrieval", "doc_instruction": IMAGE_DOC_INSTRUCTION}
    elif text_column == "label":
        task = "classification"
        spec_map = {"query_image": "file", "doc_text": "label"}
        defaults = {
            "subset": subset or "classification",
            "task": task,
            "query_instruction": CLASSIFY_QUERY_INSTRUCTION,
            "doc_instruction": CLASS_LABEL_INSTRUCTION,
        }
    else:
        task = "retrieval"
        spec_map = {"query_text": "caption", "doc_image": "file"}
        defaults = {
            "subset": subset or "retrieval",
            "task": task,
            "query_instruction": CAPTION_QUERY_INSTRUCTION,
            "doc_instruction": IMAGE_DOC_INSTRUCTION,
        }
    spec = {
        "mapping": spec_map,
        "defaults": defaults,
        "data_root": root,
        "embed_images": bool(embed_images),
        "documents_only": bool(documents_only),
    }
    config = {
        "format": "imagefolder",
        "documents_only": bool(documents_only),
        "source": root,
        "mode": mode,
        "task": task,
        "labels": storage.absolute(labels) if labels else None,
        "captions": storage.absolute(captions) if captions else None,
        "subset": subset,
        "data_root": root,
        "embed_images": bool(embed_images),
        "rows_per_shard": rows_per_shard,
        "inputs": _inputs_fingerprint(inputs),
    }
    tasks = imagefolder_tasks(items, text_column)
    return run_ingest(
        out,
        config=config,
        spec=spec,
        data_root=str(root),
        plan_tasks=lambda _: tasks,
        rows_per_shard=rows_per_shard,
        executor=executor,
        overwrite=overwrite,
        extra=extra,
    )
