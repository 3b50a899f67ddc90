"""Remake the example of "your own data" in this folder: 24 small PNGs and the files naming them.

    python examples/own-data/make.py

Writes (deterministically, so a rerun changes nothing):

    images/<colour>-<shape>-<size>.png   24 pictures: 4 colours x 3 shapes x 2 sizes, 32 x 32 px
    images/red-circle-big-copy.png       a byte-for-byte copy of one of them (for `assay dedup`)
    pairs.jsonl    one (query, target) pair per line, in a user's own column names:
                   source, task, text, image, target, target_image (image paths relative to this
                   folder). Three kinds of row: "What shape is this?" + picture -> shape name,
                   "What colour is the shape?" + picture -> colour name (source shapes-qa, task
                   vqa), and a caption -> its picture (source captions, task retrieval). One row
                   names a picture that does not exist (`assay validate` refuses it).
    captions.csv   file,caption: the image-folder route (`assay ingest images --format imagefolder
                   --captions captions.csv`)
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"big": 13, "small": 7}  # half the width of the shape, in pixels
SIDE = 32


def draw(colour: str, shape: str, size: str) -> Image.Image:
    img = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    c, r = SIDE // 2, SIZES[size]
    box = (c - r, c - r, c + r, c + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=COLOURS[colour])
    return img


def main() -> None:
    images = HERE / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir()
    rows, captions = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                name = f"images/{colour}-{shape}-{size}.png"
                draw(colour, shape, size).save(HERE / name, format="PNG", optimize=True)
                rows.append(
                    {
                        "source": "shapes-qa",
                        "task": "vqa",
                        "image": name,
                        "text": "What shape is this?",
                        "target": shape,
                    }
                )
                rows.append(
                    {
                        "source": "shapes-qa",
                        "task": "vqa",
                        "image": name,
                        "text": "What colour is the shape?",
                        "target": colour,
                    }
                )
                caption = f"a {size} {colour} {shape}"
                rows.append(
                    {"source": "captions", "task": "retrieval", "text": caption, "target_image": name}
                )
                captions.append((name.removeprefix("images/"), caption))
    # a copy of a picture under another name, with its own caption: dedup keeps one image
    shutil.copyfile(images / "red-circle-big.png", images / "red-circle-big-copy.png")
    rows.append(
        {
            "source": "captions",
            "task": "retrieval",
            "text": "a large red disc",
            "target_image": "images/red-circle-big-copy.png",
        }
    )
    # a row naming a picture that is not there: validate refuses it (image_not_found)
    rows.append(
        {
            "source": "shapes-qa",
            "task": "vqa",
            "image": "images/purple-star-big.png",
            "text": "What shape is this?",
            "target": "star",
        }
    )
    with open(HERE / "pairs.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(HERE / "captions.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "caption"])
        w.writerows(captions)
    print(f"wrote {len(rows)} rows to pairs.jsonl, {len(captions)} to captions.csv, images in {images}")


if __name__ == "__main__":
    main()
