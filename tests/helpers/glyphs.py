"""An image dataset assay does not ship: ten kinds of generated glyphs, one folder per class.

Unlike the bundled easy-vqa (circles, rectangles, triangles in eight named colours), a glyph's
class is its form alone: colours (foreground and background), size, position and a little noise
are drawn at random per image, so a model has to read the shape to tell the classes apart.

    glyph_folders(root, train=150, test=30)
    # root/train/<class>/<n>.png and root/test/<class>/<n>.png (the layout of Hugging Face's
    # imagefolder with split folders), 64 x 64 PNGs
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("ring", "plus", "cross", "hstripes", "vstripes", "diamond", "star", "checker", "dots", "arrow")
SIZE = 64


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A foreground and a background far enough apart to see (sum of channel differences >= 200)."""
    while True:
        fg = tuple(rng.randrange(256) for _ in range(3))
        bg = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(fg, bg, strict=True)) >= 200:
            return fg, bg  # type: ignore[return-value]


def draw_glyph(kind: str, rng: random.Random) -> Image.Image:
    fg, bg = _colours(rng)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(14, 26)  # half the glyph's extent
    cx, cy = rng.uniform(r + 2, SIZE - r - 2), rng.uniform(r + 2, SIZE - r - 2)
    w = max(3, int(r / 3))  # stroke width
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif kind == "plus":
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fg)
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
    elif kind == "cross":
        d.line((cx - r, cy - r, cx + r, cy + r), fill=fg, width=w)
        d.line((cx - r, cy + r, cx + r, cy - r), fill=fg, width=w)
    elif kind in ("hstripes", "vstripes"):
        step = 2 * w
        for k in range(int(2 * r // step) + 1):
            o = -r + k * step
            if kind == "hstripes":
                d.rectangle((cx - r, cy + o, cx + r, cy + o + w - 1), fill=fg)
            else:
                d.rectangle((cx + o, cy - r, cx + o + w - 1, cy + r), fill=fg)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif kind == "star":
        turn = rng.uniform(0, 2 * math.pi)
        points = [
            (
                cx + (r if i % 2 == 0 else r * 0.4) * math.cos(turn + i * math.pi / 5),
                cy + (r if i % 2 == 0 else r * 0.4) * math.sin(turn + i * math.pi / 5),
            )
            for i in range(10)
        ]
        d.polygon(points, fill=fg)
    elif kind == "checker":
        cell = 2 * r / 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x, y = cx - r + i * cell, cy - r + j * cell
                    d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fg)
    elif kind == "dots":
        for i in range(3):
            for j in range(3):
                x, y = cx - r + (i + 0.5) * 2 * r / 3, cy - r + (j + 0.5) * 2 * r / 3
                d.ellipse((x - w / 2 - 1, y - w / 2 - 1, x + w / 2 + 1, y + w / 2 + 1), fill=fg)
    elif kind == "arrow":
        d.rectangle((cx - r, cy - w / 2, cx + r * 0.2, cy + w / 2), fill=fg)
        d.polygon([(cx + r, cy), (cx + r * 0.1, cy - r * 0.6), (cx + r * 0.1, cy + r * 0.6)], fill=fg)
    else:
        raise ValueError(f"unknown glyph {kind!r}")
    noise = Image.effect_noise((SIZE, SIZE), rng.uniform(5, 20)).convert("RGB")
    return Image.blend(img, noise, 0.1)


def glyph_folders(root: str | Path, train: int = 150, test: int = 30, seed: int = 0) -> Path:
    """Write ``root/{train,test}/<class>/<n>.png``: ``train`` and ``test`` images per class."""
    root = Path(root)
    rng = random.Random(seed)
    for split, n in (("train", train), ("test", test)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_glyph(kind, rng).save(folder / f"{i:04d}.png")
    return root
