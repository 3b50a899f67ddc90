"""Near-duplicate pictures: two images are near copies when their structure AND their colours agree.

Structure is the 64-bit pHash (imagehash.phash): a DCT of the grayscale picture, so it cannot see
colour at all: a red, a green and a blue square hash alike, and on small pictures (64 px) different
shapes at the same place are often a few bits apart too. So a pair within ``phash_distance`` bits is
only a candidate; it is a near duplicate when the colour thumbnails agree as well.

The colour thumbnail is an 8x8 RGB picture of area averages (192 bytes). Two thumbnails agree when no
cell differs by more than ``COLOUR_DISTANCE`` (of 255) in any channel, compared at the grid that fits
the smaller picture: cells of at least 4x4 of its pixels (8x8 cells from 32 px up, 4x4 from 16 px,
2x2 from 8 px, one mean colour below), so that one changed pixel moves a cell by 1/16 of the range
at most, whatever the picture's size.

Measured on easy-vqa (64 px pictures of one coloured shape; the first 1,500 training pictures), with
the defaults (pHash within 4 bits, colour within 32):

=====================================================  ======================  ====================
pair                                                   colour difference       near duplicates
=====================================================  ======================  ====================
PNG -> JPEG quality 90 / 75                            at most 23 / 23         98.3% / 97.6%
resized to 56, 80 or 200 px                            at most 3               99.3%
resized to 48 px, then JPEG quality 85                 at most 28              97.0%
distinct pictures within 4 pHash bits (813 pairs)      at least 9              6 pairs (0.7%)
=====================================================  ======================  ====================

The colour check never loses a copy that pHash finds (the copies missed are more than 4 pHash bits
apart). The 6 distinct pairs left show the same shape in the same colour at the same place (their
background tints differ by a few levels); the 807 refused differ in colour or shape (a red and a gray
triangle, a square and a triangle), and pHash alone folded all 813. A shape of a few pixels in a
64 px picture moves an 8x8 cell by less than 32, so such pictures can still pass as near copies:
dedup's targets check (curation.dedup_targets) keeps them apart when their pairs disagree.

Example::

    >>> import io
    >>> from PIL import Image
    >>> def square(colour):
    ...     buf = io.BytesIO()
    ...     Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    ...     return buf.getvalue()
    >>> red, green = image_signature(square("red")), image_signature(square("green"))
    >>> red.phash == green.phash, int(colour_distance(red.thumb, green.thumb, red.side, green.side)[0])
    (True, 255)
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from assay.curation.content_key import DEFAULT_MAX_IMAGE_PIXELS

#: The thumbnail's grid (GRID x GRID cells of RGB) and its size in bytes.
GRID = 8
THUMB_BYTES = GRID * GRID * 3
#: The default tolerance: the most a cell of two near copies may differ in any channel (of 255).
COLOUR_DISTANCE = 32
#: A cell of the compared grid covers at least MIN_CELL x MIN_CELL pixels of the smaller picture.
MIN_CELL = 4


@dataclass(frozen=True)
class ImageSignature:
    """What near-duplicate search keeps of one image: ``phash`` (64 bits), ``thumb`` (the 8x8 RGB
    thumbnail, 192 bytes), ``side`` (the shorter side in pixels); all None with ``why`` when the image
    cannot be decoded."""

    phash: int | None
    thumb: bytes | None
    side: int | None
    why: str | None = None


def image_signature(data: bytes) -> ImageSignature:
    """The pHash, colour thumbnail and shorter side of encoded image bytes (decoded once).

    JPEGs are decoded at reduced size (``draft``), which is much faster and changes a hash by a bit or
    two at most; it is applied the same way to every image, so equal inputs still hash equally.
    """
    import imagehash
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > limit:
                    why = f"image of {w}x{h} pixels is over Image.MAX_IMAGE_PIXELS={limit}"
                    return ImageSignature(None, None, None, why)
                if img.format == "JPEG":
                    img.draft("RGB", (128, 128))
                rgb = img.convert("RGB")
                bits = imagehash.phash(rgb).hash
                thumb = rgb.resize((GRID, GRID), Image.BOX).tobytes()
    except Exception as e:  # Pillow raises many types for bad input (OSError, SyntaxError, ValueError...)
        return ImageSignature(None, None, None, f"undecodable image ({type(e).__name__}: {e})")
    phash = int.from_bytes(np.packbits(bits.flatten()).tobytes(), "big")
    return ImageSignature(phash, thumb, min(w, h))


def fitting_grid(side: np.ndarray) -> np.ndarray:
    """The grid (8, 4, 2 or 1 cells a side) whose cells cover at least 4x4 pixels of a picture whose
    shorter side is ``side``."""
    side = np.asarray(side, np.int64)
    grid = np.ones(len(side), np.int64)
    for g in (2, 4, GRID):
        grid[side >= g * MIN_CELL] = g
    return grid


def _pooled(thumbs: np.ndarray, g: int) -> np.ndarray:
    """(n, GRID, GRID, 3) thumbnails averaged down to (n, g, g, 3)."""
    k = GRID // g
    return thumbs.reshape(len(thumbs), g, k, g, k, 3).mean(axis=(2, 4))


def colour_distance(
    thumbs_a: np.ndarray, thumbs_b: np.ndarray, sides_a: np.ndarray, sides_b: np.ndarray
) -> np.ndarray:
    """The largest difference (0-255) of any channel of any cell of two thumbnails, per pair, at the
    grid that fits the smaller of the two pictures. Thumbnails are (n, 192) uint8 arrays, or one
    thumbnail's 192 bytes."""
    a, b = (
        (np.frombuffer(t, np.uint8) if isinstance(t, bytes) else np.asarray(t, np.uint8))
        .reshape(-1, GRID, GRID, 3)
        .astype(np.float32)
        for t in (thumbs_a, thumbs_b)
    )
    grid = fitting_grid(np.minimum(np.atleast_1d(sides_a), np.atleast_1d(sides_b)))
    n = max(len(a), len(b), len(grid))
    a, b = np.broadcast_to(a, (n, GRID, GRID, 3)), np.broadcast_to(b, (n, GRID, GRID, 3))
    grid = np.broadcast_to(grid, (n,))
    out = np.zeros(n, np.int64)
    for g in np.unique(grid).tolist():
        sel = np.flatnonzero(grid == g)
        diff = np.abs(_pooled(a[sel], g) - _pooled(b[sel], g))
        out[sel] = np.rint(diff.reshape(len(sel), -1).max(axis=1)).astype(np.int64)
    return out
