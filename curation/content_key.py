"""Content keys: what makes two rows "the same", for dedup, decontamination and any stage that asks.

A row's content is its text and its image. Two rows have the same content when their texts are equal
after ``normalize_text`` (Unicode NFKC, casefold, whitespace collapsed, stripped; an empty result
counts as no text) and their images have the same bytes (sha256). An image given by path is read
from the dataset's data root, so a picture stored inline in one row and by path in another is still
recognised; a path that cannot be read is hashed as the path string instead, and the key says so
(``image_note``), because refusing unreadable images is the job of validate, not of this module.

``content_key`` gives the key of one row, ``iter_content_keys`` streams a table's keys, and
Near-duplicate images are judged by ``curation.near_image`` (pHash and a colour thumbnail).

Example::

    >>> from curation.content_key import content_key, normalize_text
    >>> normalize_text("  Ｈello\\u00a0  WORLD ")
    'hello world'
    >>> content_key("Hello world", None, ".").digest == content_key("HELLO  world", None, ".").digest
    True
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from assay.curation import storage
from assay.curation.schema import resolve_image_path

#: Bump when the normalisation or the key layout changes: a stage's config records it, so a resumed
#: run never mixes keys of two versions.
CONTENT_KEY_VERSION = 1
#: Used when Pillow's own limit is switched off (Image.MAX_IMAGE_PIXELS = None): Pillow's default.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def normalize_text(text: str | None) -> str | None:
    """NFKC, casefold, collapse runs of whitespace to one space, strip. None (or nothing left) -> None."""
    if text is None:
        return None
    norm = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return norm or None


def text_key(norm: str | None) -> int:
    """A 64-bit key of normalised text (0 means no text). Rows compare texts through this key."""
    if norm is None:
        return 0
    return int.from_bytes(hashlib.sha256(norm.encode("utf-8", "surrogatepass")).digest()[:8], "big") or 1


@dataclass(frozen=True)
class ImageData:
    """The bytes of an ``image`` cell. ``source`` is 'bytes' (inline), 'path' (read from the data root)
    or None (no image); ``error`` says why a path could not be read (then ``data`` is None)."""

    data: bytes | None
    source: str | None
    path: str | None = None
    error: str | None = None


def image_data(image: dict[str, Any] | None, data_root: str | os.PathLike | None) -> ImageData:
    """Read an ``image`` cell: inline bytes win over a path (the Hugging Face convention)."""
    if not image:
        return ImageData(None, None)
    data, path = image.get("bytes"), image.get("path")
    if data is not None:
        return ImageData(bytes(data), "bytes", path)
    if path is None:
        return ImageData(None, None)
    resolved = resolve_image_path(data_root or ".", path)
    if not resolved.inside:
        return ImageData(None, "path", path, error=f"outside the data root {resolved.root}")
    try:
        return ImageData(storage.read_bytes(resolved.full), "path", path)
    except OSError as e:
        return ImageData(None, "path", path, error=f"{type(e).__name__}: {e.strerror or e}")


@dataclass(frozen=True)
class ContentKey:
    """The normalised text and the image hash of a row, and a 16-byte ``digest`` of both.

    ``image_sha256`` is the hex sha256 of the image bytes, or of ``'path:' + path`` when the file could
    not be read (``image_note`` then says why); None when the row has no image.
    """

    text: str | None
    image_sha256: str | None
    image_note: str | None
    digest: bytes

    @property
    def text_key(self) -> int:
        return text_key(self.text)

    def parts(self) -> tuple[int, int]:
        """The digest as two unsigned 64-bit integers (how dedup holds it in numpy)."""
        return int.from_bytes(self.digest[:8], "big"), int.from_bytes(self.digest[8:], "big")


_DIGEST_PREFIX = hashlib.sha256(f"assay-content-v{CONTENT_KEY_VERSION}".encode())


def _digest(norm: str | None, image_sha: bytes | None) -> bytes:
    h = _DIGEST_PREFIX.copy()
    if norm is None:
        h.update(b"\x00")
    else:
        t = norm.encode("utf-8", "surrogatepass")
        h.update(b"\x01" + len(t).to_bytes(8, "big") + t)
    h.update(b"\x00" if image_sha is None else b"\x01" + image_sha)
    return h.digest()[:16]


def image_sha256(image: ImageData) -> tuple[bytes | None, str | None]:
    """The sha256 of an image's bytes, or of ``'path:' + path`` when the file could not be read (the
    second value then says why); (None, None) when there is no image."""
    if image.data is not None:
        return hashlib.sha256(image.data).digest(), None
    if image.source == "path":
        sha = hashlib.sha256(b"path:" + image.path.encode("utf-8", "surrogatepass")).digest()
        return sha, f"unreadable image path {image.path!r} ({image.error}); compared by path"
    return None, None


def key_from_sha(text: str | None, sha: bytes | None, note: str | None = None) -> ContentKey:
    """The content key of a row's text and its image's sha256 (see image_sha256)."""
    norm = normalize_text(text)
    return ContentKey(norm, sha.hex() if sha is not None else None, note, _digest(norm, sha))


def key_from_parts(text: str | None, image: ImageData) -> ContentKey:
    """The content key of a row's text and already-read image."""
    return key_from_sha(text, *image_sha256(image))


def content_key(
    text: str | None, image: dict[str, Any] | None, data_root: str | os.PathLike | None
) -> ContentKey:
    """The content key of one row (``image`` is the row's image cell, paths resolved under data_root)."""
    return key_from_parts(text, image_data(image, data_root))


def iter_content_keys(dataset: Any, table: str, batch_size: int = 1024) -> Iterator[tuple[str, ContentKey]]:
    """Stream ``(id, ContentKey)`` for every row of ``table`` (queries or corpus) of a Dataset."""
    from assay.curation.schema import ID_COLUMN

    id_col = ID_COLUMN[table]
    root = dataset.data_root
    for batch in dataset.iter_batches(table, columns=[id_col, "text", "image"], batch_size=batch_size):
        ids, texts, images = (batch.column(i).to_pylist() for i in range(3))
        for rid, text, image in zip(ids, texts, images, strict=True):
            yield rid, content_key(text, image, root)


#: ASCII text without the separators \x1c-\x1f (which str.split() treats as whitespace and regex
#: \s does not): for such text NFKC is the identity and casefold is lower(), so polars can normalise
#: it exactly as ``normalize_text`` does.
_PLAIN_ASCII = r"^[\x00-\x1b\x20-\x7f]*$"


def normalize_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``normalize_text`` of a whole column, as an Arrow string array (null: no text).

    Vectorised (polars: lower-case, runs of whitespace to one space, strip) for plain ASCII, where
    that is exactly what ``normalize_text`` does; the other rows go through ``normalize_text`` one by
    one. The result equals ``[normalize_text(t) for t in texts]`` (tests/curation/test_content_key.py
    holds it so on Unicode spaces, case, separators and control characters)."""
    import polars as pl

    series = pl.Series(texts, dtype=pl.String)
    out = series.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    rest = (~series.str.contains(_PLAIN_ASCII).fill_null(True)).arg_true()
    if len(rest):
        fixed = [normalize_text(t) for t in series.gather(rest).to_list()]
        out = out.scatter(rest, pl.Series(fixed, dtype=pl.String))
    out = pl.select(pl.when(out != "").then(out)).to_series()  # nothing left is no text
    return out.to_arrow().cast(pa.string())


def text_only_keys(
    texts: pa.Array | pa.ChunkedArray, with_text_key: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The content keys of rows that have text and no image, fast: returns (keys as an (n, 2) uint64
    array, equal to ``content_key(text, None, _).parts()``, and the text keys (zeros if not asked))."""
    norms = normalize_texts(texts).to_pylist()
    digests = b"".join(_digest(t, None) for t in norms)
    keys = (
        np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)
        if norms
        else np.zeros((0, 2), np.uint64)
    )
    tkeys = (
        np.array([text_key(t) for t in norms], dtype=np.uint64)
        if with_text_key
        else np.zeros(len(norms), np.uint64)
    )
    return keys, tkeys
