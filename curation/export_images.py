"""Images for exports: written once, content-addressed, and referenced by path.

Inline image bytes go to ``images/<sha256>.<ext>`` (the extension from the magic bytes) next to the
export; images stored as paths are resolved against the dataset's data root and referenced by
absolute path, or copied into ``images/`` the same way. ``extract_images`` streams one table's shards
and writes, for the ids an export needs, a small side table ``id, path, problem``.

The dataset and its data root may be on object storage (``curation.storage``): an image stored as a
path is then referenced by its URI (its absolute name), or copied as above; the images folder itself
is always local (an export to a URI is built locally and uploaded: ``curation.export``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from collections.abc import Collection
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from assay.curation import storage
from assay.curation.dataset import TMP_PREFIX, Dataset
from assay.curation.schema import QUERIES, resolve_image_path

IMAGES_DIR = "images"

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


def image_extension(data: bytes, fallback: str | None = None) -> str:
    """The file extension of an image from its magic bytes (``fallback`` or ``bin`` if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if fallback:
        return fallback.lower().lstrip(".") or "bin"
    return "bin"


class ImageStore:
    """Writes images once, content-addressed, to ``images_dir`` and says how the export refers to them.
    ``known``: names already at the export's images folder elsewhere (on object storage, where the
    export is uploaded to): not written again, and not counted."""

    def __init__(self, images_dir: Path, data_root: Any, copy: bool = False, known: Collection[str] = ()):
        self.dir = Path(images_dir)
        self.data_root = storage.path(data_root)
        self.copy = copy
        self.known = frozenset(known)
        self.written = 0
        #: The files this store created (an export that fails removes them again).
        self.created: list[Path] = []
        self._seen: set[str] = set()

    def put(self, data: bytes, fallback_ext: str | None = None) -> str:
        """Store inline bytes; returns the relative path ``images/<sha256>.<ext>``."""
        name = f"{hashlib.sha256(data).hexdigest()}.{image_extension(data, fallback_ext)}"
        if name not in self._seen:
            dst = self.dir / name
            if name not in self.known and not dst.exists():
                if not self.dir.exists():
                    self.dir.mkdir(parents=True, exist_ok=True)
                    self.created.append(self.dir)
                tmp = self.dir / f"{TMP_PREFIX}{name}.{os.getpid()}"
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, dst)
                except BaseException:  # a full disk, say: no half-written image left behind
                    tmp.unlink(missing_ok=True)
                    raise
                self.created.append(dst)
                self.written += 1
            self._seen.add(name)
        return f"{IMAGES_DIR}/{name}"

    def remove_created(self) -> None:
        """Remove what this store wrote (files, then its folder if it made it and it is empty)."""
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                if p == self.dir:
                    p.rmdir()
                else:
                    p.unlink(missing_ok=True)
        self.created = []

    def resolve(self, image: dict[str, Any] | None) -> tuple[str | None, str | None]:
        """(path for the export, problem) of one ``image`` cell; problem is None, ``"missing"`` (no
        such file) or ``"outside"`` (a path that leaves the data root)."""
        if not image:
            return None, None
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            return self.put(bytes(data), Path(path).suffix if path else None), None
        if path is None:
            return None, None
        resolved = resolve_image_path(self.data_root, path)
        if not resolved.inside:
            return None, "outside"
        if storage.is_remote(resolved.full):  # a data root on object storage: the image's URI
            if not storage.is_file(resolved.full):
                return None, "missing"
            if self.copy:
                return self.put(storage.read_bytes(resolved.full), posixpath.splitext(resolved.full)[1]), None
            return resolved.full, None
        src = Path(resolved.full)
        if not src.is_file():
            return None, "missing"
        if self.copy:
            return self.put(src.read_bytes(), src.suffix), None
        return str(src), None


def extract_images(
    ds: Dataset, table: str, ids: pl.Series, store: ImageStore, out: Path, progress: bool
) -> Path:
    """Stream ``table``'s shards, resolve the images of ``ids``; write ``id, path, problem`` to ``out``."""
    id_col = "query_id" if table == QUERIES else "doc_id"
    schema = pa.schema([(id_col, pa.string()), ("path", pa.string()), ("problem", pa.string())])
    wanted = ids.implode()
    done: set[str] = set()
    with pq.ParquetWriter(out, schema) as writer:
        shards = ds.shards(table)
        for name in tqdm(
            shards, desc=f"export: {table} images", unit="shard", disable=not progress or not shards
        ):
            pf = storage.parquet_file(ds.shard_path(table, name))
            for batch in pf.iter_batches(batch_size=1024, columns=[id_col, "image"]):
                df = pl.from_arrow(batch)
                hit = df.filter(pl.col(id_col).is_in(wanted).fill_null(False))
                rows: dict[str, list] = {id_col: [], "path": [], "problem": []}
                for rid, image in hit.iter_rows():
                    if rid in done:
                        continue
                    done.add(rid)
                    path, problem = store.resolve(image)
                    rows[id_col].append(rid)
                    rows["path"].append(path)
                    rows["problem"].append(problem)
                if rows[id_col]:
                    writer.write_table(pa.table(rows, schema=schema))
    return out
