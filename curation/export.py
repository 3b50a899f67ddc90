"""Export a dataset for training elsewhere: Parquet, VLM2Vec JSONL, Hugging Face datasets, and the
sentence-transformers formats.

Every format starts from the same **flat view**: one row per pair joined with its query's and its
document's columns (``FLAT_COLUMNS``: query_id, subset, task, query_instruction, query_text,
query_image, doc_id, doc_instruction, doc_text, doc_image, label, score, rank, judge_p_yes,
judge_verdict, origin), in the dataset's pair order. Pairs whose query or document is missing are
left out and counted. ``where`` (a curation.filter_expr expression over these columns, e.g.
``"subset == 'vqa' and label != 'false_negative'"``) selects rows of the view before any layout is
built.

Images in exports are file paths. Inline image bytes are written once to ``images/<sha256>.<ext>``
next to the output (the extension from the magic bytes) and referenced by that relative path;
images that are already paths are resolved against the dataset's data root and written as absolute
paths, or copied into ``images/`` with ``copy_images=True``. Rows whose image file does not exist,
or whose path leads outside the data root, are left out and counted. Only the images of exported rows are written.

Formats (``OUT`` is a directory unless noted; the directory also gets ``export.json``, what was
exported from where, with the counts):

``parquet``
    the flat view as ``OUT/pairs.parquet`` (or ``OUT`` itself if it ends with ``.parquet``).
``jsonl``
    the VLM2Vec (MMEB-train) layout as ``OUT/train.jsonl`` (or ``OUT`` if it ends with ``.jsonl``):
    one object per (query, positive)::

        {"qry": "<|image_1|>\\nFind the caption. a photo of a dog",
         "qry_image_path": "images/3f...a1.png",
         "pos_text": "A dog on the grass.", "pos_image_path": "",
         "neg_text": ["A cat.", "Two birds."], "neg_image_path": ["", ""],
         "query_id": "q17", "subset": "coco"}

    ``qry`` is ``"{instruction} {text}"``, preceded by ``"<|image_1|>\\n"`` when the query has an
    image; ``pos_text`` and each ``neg_text`` are built the same way from the document's instruction,
    text and image. Missing image paths are ``""``. Negatives are the query's hard_negative then
    negative pairs (by rank; false_negative pairs never), at most ``num_negatives``. Queries without
    a positive pair produce no row (counted).
``hf``
    the flat view saved with ``datasets.Dataset.save_to_disk(OUT)``; ``datasets.load_from_disk``
    reads it back. Image columns are path strings relative to ``OUT``.
``triplet``, ``n-tuple``, ``labeled-pair``, ``labeled-list``
    the sentence-transformers layouts (see curation.export_formats) as ``OUT/train.parquet`` (or
    ``OUT`` if it ends with ``.parquet``), which ``datasets.load_dataset("parquet", data_files=...)``
    loads. They are text-only: a dataset with images on either side of a pair is refused (with the
    count) unless ``skip_image_rows=True`` leaves those rows out.

The view and the layouts are polars lazy queries over the shards run with the streaming engine, and
images are extracted shard by shard, so an export never holds a whole table in Python. Outputs are
written atomically (``curation.dataset.staging_dir`` / ``commit_dir``): a directory is built as
``.tmp-OUT-<pid>`` beside OUT and renamed into place; a file is written there and renamed.

**Object storage.** The dataset may be a URI (``s3://bucket/ds``): its shards are then scanned as a
pyarrow dataset over the same fsspec filesystem every other stage reads through (so the same
credentials and endpoint), streamed batch by batch. ``OUT`` may be a URI too. An object store has no
rename, so the export is built exactly as above in a local temporary folder
(``$TMPDIR/assay-export-<pid>-*``; those of dead processes are removed by the next export) and then
uploaded:

- a file output (``s3://b/x/train.jsonl``) is put whole, in one object, after the images it refers
  to (``s3://b/x/images/``, shared by the exports there: names already there are neither put again
  nor counted); a failed upload removes the images it put (a killed one may leave some, which the
  rerun finds there). A reader sees the whole file or none.
- a folder output is uploaded by ``storage.put_tree``: first the marker object
  ``OUT/.export-incomplete``, then (with ``--overwrite``) the old export's ``export.json`` and the
  rest of it are deleted, then the images and data files, then the format's own entry files (the
  table ``pairs.parquet`` / ``train.jsonl`` / ``train.parquet``; an HF dataset's
  ``dataset_info.json`` and ``state.json``), then ``export.json`` last, and the marker is removed.
  ``export.json`` is what makes it a finished export: a reader (or ``--overwrite``) takes a folder
  without it for none, and any entry file appears only once everything it refers to is there. An
  upload that fails removes the folder; one that is killed leaves the marker and no ``export.json``,
  and the rerun (no ``--overwrite`` needed) clears the folder and uploads it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from assay.curation import export_formats, storage
from assay.curation.dataset import (
    Dataset,
    code_version,
    commit_dir,
    commit_file,
    remove_stale_staging,
    staging_dir,
)
from assay.curation.export_images import IMAGES_DIR, ImageStore, extract_images, image_extension
from assay.curation.filter_expr import parse_filter
from assay.curation.schema import CORPUS, PAIRS, QUERIES, SCHEMAS

FORMATS = ("parquet", "jsonl", "hf", "triplet", "n-tuple", "labeled-pair", "labeled-list")
#: The sentence-transformers formats (text only).
ST_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
FLAT_COLUMNS = (
    "query_id", "subset", "task", "query_instruction", "query_text", "query_image",
    "doc_id", "doc_instruction", "doc_text", "doc_image",
    "label", "score", "rank", "judge_p_yes", "judge_verdict", "origin",
)  # fmt: skip
_DEFAULT_NAME = {
    "parquet": "pairs.parquet",
    "jsonl": "train.jsonl",
    **{f: "train.parquet" for f in ST_FORMATS},
}
_FILE_SUFFIX = {"parquet": ".parquet", "jsonl": ".jsonl", **{f: ".parquet" for f in ST_FORMATS}}
_PROBLEMS = {
    "missing": "pairs whose image file is missing",
    "outside": "pairs whose image path leaves the data root",
}
#: What makes a folder export finished (and what --overwrite may replace).
EXPORT_INFO = "export.json"
#: On object storage: the marker of a folder export being uploaded (see the module docstring).
INCOMPLETE = ".export-incomplete"
#: Local folders where exports to a URI are built: ``<prefix><pid>-<random>`` in the temp folder.
_LOCAL_PREFIX = "assay-export-"


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says why and what to do."""


@dataclass
class ExportResult:
    """What an export wrote: the main file or directory, its rows, and what it left out."""

    format: str
    path: Any  # a Path, or a UPath for an export to a URI
    rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    images_written: int = 0
    images_dir: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "rows": self.rows,
            "skipped": self.skipped,
            "images_written": self.images_written,
            "images_dir": None if self.images_dir is None else str(self.images_dir),
        }


# -- the flat view ---------------------------------------------------------------------------------


def _scan(ds: Dataset, table: str) -> pl.LazyFrame:
    paths = [ds.shard_path(table, n) for n in ds.shards(table)]
    if not paths:
        return pl.from_arrow(SCHEMAS[table].empty_table()).lazy()
    if storage.is_remote(paths[0]):
        # Through the fsspec filesystem every stage reads with (its credentials, its endpoint), not
        # polars' own object-store client; streamed batch by batch, in shard order.
        import pyarrow.dataset as pads
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        shards = pads.dataset(
            [p.path for p in paths],
            schema=SCHEMAS[table],
            format="parquet",
            filesystem=PyFileSystem(FSSpecHandler(paths[0].fs)),
        )
        return pl.scan_pyarrow_dataset(shards, allow_pyarrow_filter=False)
    return pl.scan_parquet([str(p) for p in paths])


def _has_image(col: str) -> pl.Expr:
    c = pl.col(col)
    return (c.struct.field("bytes").is_not_null() | c.struct.field("path").is_not_null()).fill_null(False)


def flat_view(ds: Dataset, where: str | None = None) -> pl.LazyFrame:
    """The flat pair view of ``ds`` as a lazy query (images still as ``{bytes, path}`` structs),
    with ``_pair_idx``, the pair's position in the dataset; filtered by ``where`` if given."""
    pairs = _scan(ds, PAIRS).with_row_index("_pair_idx")
    queries = _scan(ds, QUERIES).select(
        "query_id", "subset", "task", query_instruction="instruction", query_text="text", query_image="image"
    )
    corpus = _scan(ds, CORPUS).select(
        "doc_id", doc_instruction="instruction", doc_text="text", doc_image="image"
    )
    view = (
        pairs.join(queries, on="query_id", how="inner")
        .join(corpus, on="doc_id", how="inner")
        .select(*FLAT_COLUMNS, "_pair_idx")
    )
    if where:
        flt = parse_filter(where)
        schema = {k: v for k, v in view.collect_schema().items() if not k.startswith("_")}
        flt.check(schema, where="the export view")
        view = view.filter(flt.expr)
    return view


# -- output handling -------------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
    return n


# -- the export ------------------------------------------------------------------------------------


def export_dataset(
    ds: Dataset,
    out: str | Path,
    fmt: str,
    *,
    where: str | None = None,
    num_negatives: int | None = None,
    copy_images: bool = False,
    skip_image_rows: bool = False,
    with_instruction: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ExportResult:
    """Export ``ds`` to ``out`` in format ``fmt`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if num_negatives is not None and num_negatives < 0:
        raise ExportError("num_negatives must be 0 or more")
    if fmt == "n-tuple" and not num_negatives:
        raise ExportError("--format n-tuple needs --num-negatives N (the number of negative columns, N >= 1)")
    options = _Options(
        where=where,
        num_negatives=num_negatives,
        copy_images=copy_images,
        skip_image_rows=skip_image_rows,
        with_instruction=with_instruction,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    _check_apart(ds.root, out)
    if storage.is_remote(out):
        return _export_to_uri(ds, str(out), fmt, options, overwrite=overwrite)
    out = Path(out)
    as_file = fmt != "hf" and out.suffix == _FILE_SUFFIX[fmt]
    if fmt == "hf" and out.suffix in (".parquet", ".jsonl"):
        raise ExportError("--format hf writes a directory (datasets.save_to_disk); give OUT without a suffix")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose a new path or pass --overwrite to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
        # --overwrite replaces earlier exports, never a folder of something else
        raise ExportError(
            f"{out} is a folder that holds no earlier export (no export.json); not replacing it"
        )
    if as_file and out.is_dir():
        raise ExportError(f"{out} is a directory; a {fmt} file output needs a file path")
    return _export_local(ds, out, fmt, as_file, options)


@dataclass(frozen=True)
class _Options:
    """What the user asked of one export, passed whole to where it is done; all but ``progress``
    are recorded in a folder export's export.json."""

    where: str | None
    num_negatives: int | None
    copy_images: bool
    skip_image_rows: bool
    with_instruction: bool
    progress: bool


def _check_apart(root: Any, out: str | os.PathLike) -> None:
    """OUT must be neither inside the dataset nor around it (local paths: symlinks resolved)."""
    a, b = storage.absolute(root), storage.absolute(out)
    if storage.is_remote(a) or storage.is_remote(b):
        a, b = a.rstrip("/"), b.rstrip("/")
        inside = a == b or b.startswith(a + "/") or a.startswith(b + "/")
    else:
        src, dst = Path(a), Path(b)
        inside = dst == src or src in dst.parents or dst in src.parents
    if inside:
        raise ExportError("OUT must be outside the dataset being exported, and must not contain it")


def _export_local(
    ds: Dataset,
    out: Path,
    fmt: str,
    as_file: bool,
    options: _Options,
    *,
    known_images: frozenset[str] = frozenset(),
) -> ExportResult:
    """The export into the local path ``out`` (checked by the caller), built in a staging folder
    and renamed into place."""
    view = flat_view(ds, options.where)  # validates ``where`` before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    work = staging / "_work" if not as_file else staging
    # Images go into the staging folder, or beside a file output (shared by the exports there).
    store = ImageStore(
        (staging if not as_file else out.parent) / IMAGES_DIR,
        ds.data_root,
        copy=options.copy_images,
        known=known_images,
    )
    ok = False
    try:
        work.mkdir(parents=True)
        result = _export(ds, view, out, staging, work, store, fmt, as_file, options)
        ok = True
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not ok and as_file:
            store.remove_created()  # a failed export leaves nothing, not even its images
    return result


def _export(
    ds: Dataset,
    view: pl.LazyFrame,
    out: Path,
    staging: Path,
    work: Path,
    store: ImageStore,
    fmt: str,
    as_file: bool,
    options: _Options,
) -> ExportResult:
    where, num_negatives, progress = options.where, options.num_negatives, options.progress
    skipped: dict[str, int] = {}
    # The polars queries report no progress of their own: a bar over the three steps shows where it is.
    steps = tqdm(total=3, desc=f"export {fmt}", unit="step", disable=not progress)
    steps.set_postfix_str("joining pairs, queries and corpus")
    # 1. materialise the (filtered) view without image bytes: has-image flags instead
    view_path = work / "_view.parquet"
    view.with_columns(_qimg=_has_image("query_image"), _dimg=_has_image("doc_image")).drop(
        "query_image", "doc_image"
    ).sink_parquet(view_path, engine="streaming")
    n_view = pq.ParquetFile(view_path).metadata.num_rows
    n_pairs = ds.num_rows(PAIRS)
    n_joined = n_view if not where else int(flat_view(ds).select(pl.len()).collect(engine="streaming").item())
    if n_pairs - n_joined:
        skipped["pairs whose query or doc is missing"] = n_pairs - n_joined
    if where and n_joined - n_view:
        skipped["pairs excluded by --where"] = n_joined - n_view
    lf = pl.scan_parquet(view_path)

    # 2. images: written once (for the image formats), or refused / skipped (text formats)
    steps.update()
    steps.set_postfix_str("images")
    if fmt in ST_FORMATS:
        img_rows = lf.filter(pl.col("_qimg") | pl.col("_dimg"))
        counts = img_rows.select(pl.len(), pl.col("_qimg").sum(), pl.col("_dimg").sum()).collect().row(0)
        if counts[0] and not options.skip_image_rows:
            raise ExportError(
                f"{counts[0]} of {n_view} pairs have an image ({counts[1]} on the query side, {counts[2]} on the "
                f"document side); the sentence-transformers format {fmt!r} is text-only. Pass --skip-image-rows "
                "to leave them out, or export with --format jsonl / parquet / hf"
            )
        if counts[0]:
            skipped["pairs with an image"] = int(counts[0])
        lf = lf.filter(~(pl.col("_qimg") | pl.col("_dimg"))).with_columns(
            query_image=pl.lit(None, pl.String), doc_image=pl.lit(None, pl.String)
        )
    else:
        sides = {}
        for table, flag, id_col in ((QUERIES, "_qimg", "query_id"), (CORPUS, "_dimg", "doc_id")):
            ids = lf.filter(pl.col(flag)).select(id_col).unique().collect(engine="streaming")[id_col]
            side = extract_images(ds, table, ids, store, work / f"_{table}_images.parquet", progress)
            sides[id_col] = pl.scan_parquet(side)
        q = sides["query_id"].select("query_id", query_image="path", _qprob="problem")
        d = sides["doc_id"].select("doc_id", doc_image="path", _dprob="problem")
        lf = lf.join(q, on="query_id", how="left").join(d, on="doc_id", how="left")
        prob = pl.coalesce(pl.col("_qprob"), pl.col("_dprob"))
        miss = prob.is_not_null()
        for problem, n in (
            lf.filter(miss).group_by(prob.alias("_p")).len().collect(engine="streaming").iter_rows()
        ):
            skipped[_PROBLEMS[problem]] = int(n)
        lf = lf.filter(~miss)
    lf = lf.select(*FLAT_COLUMNS, "_pair_idx")

    # 3. the layout, written under a temporary name
    steps.update()
    steps.set_postfix_str(f"writing {fmt}")
    if fmt == "hf":
        path, rows = _write_hf(lf.sort("_pair_idx").drop("_pair_idx"), staging, work, progress)
    else:
        if fmt == "parquet":
            rows_lf = lf.sort("_pair_idx").drop("_pair_idx")
        elif fmt == "jsonl":
            rows_lf, more = export_formats.vlm2vec(lf, num_negatives)
            skipped.update({k: v for k, v in more.items() if v})
        else:
            rows_lf, more = export_formats.sentence_transformers(
                lf, fmt, num_negatives, options.with_instruction
            )
            skipped.update({k: v for k, v in more.items() if v})
        name = out.name if as_file else _DEFAULT_NAME[fmt]
        path = work / name if as_file else staging / name
        if fmt == "jsonl":
            rows_lf.sink_ndjson(path, engine="streaming")
            rows = _jsonl_rows(path)
        else:
            rows_lf.sink_parquet(path, engine="streaming")
            rows = pq.ParquetFile(path).metadata.num_rows

    steps.update()
    steps.close()
    result = ExportResult(
        fmt, out, rows, skipped, store.written, store.dir if store.written or store.dir.exists() else None
    )
    if as_file:
        commit_file(path, out)
        return result
    info = {
        "format": fmt,
        "rows": rows,
        "skipped": skipped,
        "images_written": store.written,
        **{k: v for k, v in asdict(options).items() if k != "progress"},
        "source": ds.parent_ref(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
    }
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    shutil.rmtree(work, ignore_errors=True)
    if result.images_dir is not None:
        result.images_dir = out / IMAGES_DIR
    commit_dir(staging, out)
    return result


# -- an export to a URI: built locally, then uploaded (see the module docstring) -------------------


def _entry_files(fmt: str) -> tuple[str, ...]:
    """A folder export's files that readers start from, in upload order, ``export.json`` last."""
    if fmt == "hf":
        return ("dataset_info.json", "state.json", EXPORT_INFO)
    return (_DEFAULT_NAME[fmt], EXPORT_INFO)


def _export_to_uri(ds: Dataset, out: str, fmt: str, options: _Options, *, overwrite: bool) -> ExportResult:
    loc = storage.path(out)
    shown = storage.display(out)
    as_file = fmt != "hf" and loc.suffix == _FILE_SUFFIX[fmt]
    if fmt == "hf" and loc.suffix in (".parquet", ".jsonl"):
        raise ExportError("--format hf writes a directory (datasets.save_to_disk); give OUT without a suffix")
    entries = storage.names(loc)
    # a folder export killed while it was uploaded: no export.json, the marker there; redone as a
    # killed local export is (whose staging folder never became OUT)
    unfinished = INCOMPLETE in entries and EXPORT_INFO not in entries
    is_file = not entries and loc.is_file()
    if not unfinished:
        if (entries or is_file) and not overwrite:
            raise ExportError(f"{shown} already exists; choose a new path or pass --overwrite to replace it")
        if entries and EXPORT_INFO not in entries:
            raise ExportError(
                f"{shown} is a folder that holds no earlier export (no {EXPORT_INFO}); not replacing it"
            )
    if as_file and entries:
        raise ExportError(f"{shown} is a directory; a {fmt} file output needs a file path")
    images = (loc.parent if as_file else loc) / IMAGES_DIR
    known = frozenset(storage.names(images)) if as_file else frozenset()
    _remove_stale_local()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_LOCAL_PREFIX}{os.getpid()}-"))
    try:
        local = tmp / loc.name
        result = _export_local(ds, local, fmt, as_file, options, known_images=known)
        if as_file:
            _upload_file(local, tmp / IMAGES_DIR, loc, images)
        else:
            if is_file:
                storage.remove_file(loc)
            _upload_folder(local, loc, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.path = loc
    if result.images_dir is not None or known:
        result.images_dir = images
    return result


def _upload_file(local: Path, local_images: Path, loc: Any, images: Any) -> None:
    """The images first (each put whole), then the file whole; a failure removes the images put."""
    put: list[str] = []
    try:
        if local_images.is_dir():
            put = storage.files_under(local_images)
            storage.put_tree(local_images, images, replace=False)
        storage.put_file(local, loc)
    except BaseException:
        for rel in put:
            with contextlib.suppress(Exception):
                storage.remove_file(images / rel)
        raise


def _upload_folder(local: Path, loc: Any, fmt: str) -> None:
    """``storage.put_tree`` with the marker and the entry files last; a failure removes the folder
    (a kill cannot: it leaves the marker and no export.json)."""
    try:
        storage.put_tree(local, loc, last=_entry_files(fmt), marker=INCOMPLETE)
    except Exception:
        with contextlib.suppress(Exception):
            storage.remove_tree(loc)
        raise


def _remove_stale_local() -> None:
    """Remove the local build folders of exports to a URI whose process is gone (killed)."""
    for p in Path(tempfile.gettempdir()).glob(f"{_LOCAL_PREFIX}*-*"):
        pid = p.name[len(_LOCAL_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _write_hf(lf: pl.LazyFrame, staging: Path, work: Path, progress: bool) -> tuple[Path, int]:
    """The flat view via a Parquet file into ``datasets.Dataset.save_to_disk(staging)``."""
    import datasets
    from datasets.utils import logging as hf_logging

    flat = work / "_flat.parquet"
    lf.sink_parquet(flat, engine="streaming")
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        hf = datasets.Dataset.from_parquet(str(flat), cache_dir=str(work / "_hf_cache"))
        hf.save_to_disk(str(staging))
        rows = hf.num_rows
        del hf
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return staging, rows


__all__ = [
    "FLAT_COLUMNS",
    "FORMATS",
    "ST_FORMATS",
    "ExportError",
    "ExportResult",
    "ImageStore",
    "export_dataset",
    "flat_view",
    "image_extension",
]
