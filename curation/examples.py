"""Bundled examples: small public data turned into finished assay datasets with one call.

``easy-vqa`` (the ``easy-vqa`` package: 64x64 images of one coloured shape, with questions) becomes
two datasets, ``OUT/train`` and ``OUT/test`` (the package's splits, kept apart), with four
subsets:

    vqa             query = image + question              -> doc = the answer text
    classification  query = the image                     -> doc = its shape label (3 docs)
    retrieval       query = a description ("a blue circle") -> doc = the image
    captions        query = a caption ("a small red circle on the left") -> doc = ONE image
                    (task retrieval)

The retrieval subset has ONE query per distinct description (8 colours x 3 shapes at most) with a
positive pair to EVERY image that matches it: the descriptions cannot be unique per image, and a
query per image would give many queries with the same text and content-hash id.

The captions subset has the shape of real data instead: each caption is labelled with ONE image,
and other images of the subset match it too, unlabelled (what the judge is for). A caption names
the colour and shape and one or two of: the size (small: the longer side of the shape's bounding
box <= 15 px of 64; large: >= 24; medium between) and the position (the box centre's third of the
image across and down: "on the left", "at the top", "in the top left corner", "in the middle").
"a small red circle" therefore also matches the images labelled for "a small red circle on the
left" and "a small red circle at the top". Each distinct caption of the split is one query; the
captions, most specific first, each take the first matching image no caption has taken yet, and
those images are the subset's corpus. On easy-vqa 1.0 this gives train 908 captions over 904
images, 4.8 matching images per caption on average (median 4; 734 with more than one); test 784
captions over 704 images, 4.0 matches on average (median 3; 601 with more than one).

Beside the splits, ``OUT/truth/<split>.parquet`` holds the truth (``curation.truth``, a complete
truth): every (query, doc) of the split that really matches, i.e. the gold positives of vqa,
classification and retrieval (fully labelled) and, for each caption, every image of the captions
corpus it describes (each split's manifest names its file: ``extra.truth``, relative to the split,
beside ``extra.captions``, the subset's figures). It is not a dataset, so training never reads it;
``assay eval --truth`` and ``assay judge --truth`` do.

Images are copied once to ``OUT/images/{train,test}/<id>.png`` and referenced by path (the
datasets' data root is ``OUT``). Each image's shape and colour come from its questions ("what
shape is ...", "what color is the circle?", "is there a red shape?" answered yes, ...); about one
image in nine is never asked enough for that, so the shape and colour are also read from the pixels
(the shape's exact palette colour, and how much of its bounding box it fills) and the two must agree
on every image the questions do settle. An image left without both, or any disagreement, is an
error: the example is fixed data, so a surprise means the package changed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from assay.curation.dataset import MANIFEST, TMP_PREFIX, Dataset, Manifest, remove_stale_tmp
from assay.curation.examples_captions import Caption, Look, caption_figures, caption_truth, label_captions
from assay.curation.executor import Executor, LocalExecutor
from assay.curation.ingest import (
    CLASS_LABEL_INSTRUCTION,
    CLASSIFY_QUERY_INSTRUCTION,
    DEFAULT_ROWS_PER_SHARD,
    IMAGE_DOC_INSTRUCTION,
    IngestError,
)
from assay.curation.ingest_merge import run_ingest
from assay.curation.ingest_sources import parquet_tasks
from assay.curation.schema import CORPUS, PAIRS, QUERIES
from assay.curation.truth import TRUTH_DIR, split_truth_path, split_truth_ref, write_truth

EXAMPLES = ("easy-vqa",)
SPLITS = ("train", "test")
SUBSETS = ("vqa", "classification", "retrieval", "captions")
#: The MMEB meta-task of each subset, where it is not the subset's own name.
TASKS = {"captions": "retrieval"}

#: Per-subset instructions (query side, document side), in the style of the paper's templates.
INSTRUCTIONS = {
    "vqa": ("Represent the given image with the following question.", "Represent the given answer."),
    "classification": (CLASSIFY_QUERY_INSTRUCTION, CLASS_LABEL_INSTRUCTION),
    "retrieval": ("Find an image that matches the given description.", IMAGE_DOC_INSTRUCTION),
    "captions": ("Find an image that matches the given caption.", IMAGE_DOC_INSTRUCTION),
}
SHAPES = ("circle", "rectangle", "triangle")
#: The shapes are drawn in these exact colours (the CSS named colours).
PALETTE = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (0, 0, 0): "black",
    (128, 128, 128): "gray",
    (0, 128, 128): "teal",
    (165, 42, 42): "brown",
    (255, 255, 0): "yellow",
}
COLOURS = tuple(sorted(PALETTE.values()))
_NEGATION = re.compile(r"\b(not|no)\b")
_IMAGES_PER_TASK = 500


def ingest_example(
    name: str,
    out: str | os.PathLike,
    *,
    executor: Executor | None = None,
    overwrite: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> dict[str, Manifest]:
    """Write the bundled example ``name`` under ``out``: one finished dataset per split."""
    if name != "easy-vqa":
        raise IngestError(f"unknown example {name!r}; the bundled examples are {', '.join(EXAMPLES)}")
    train, test = ingest_easy_vqa(out, executor=executor, overwrite=overwrite, rows_per_shard=rows_per_shard)
    return {"train": train, "test": test}


def ingest_easy_vqa(
    out: str | os.PathLike,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> tuple[Manifest, Manifest]:
    """The easy-vqa example as ``OUT/train`` and ``OUT/test`` (see the module docstring).

    Resumable: a killed run rerun with the same arguments keeps the copied images and finished
    split, and ends with the same files; a rerun of a finished example does nothing.
    """
    try:
        import easy_vqa
    except ImportError as e:
        raise IngestError("the easy-vqa example needs the easy-vqa package: pip install easy-vqa") from e
    executor = executor or LocalExecutor()
    out = Path(out).resolve()
    if out.exists():
        if not out.is_dir():
            raise IngestError(f"{out} exists and is not a folder")
        unexpected = sorted(p.name for p in out.iterdir() if p.name not in (*SPLITS, "images", TRUTH_DIR))
        if overwrite:
            shutil.rmtree(out)
        elif unexpected:
            raise IngestError(
                f"{out} holds other files ({', '.join(unexpected[:5])}); choose a new folder "
                "or pass --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    if (out / "images").exists():
        remove_stale_tmp(out / "images")
    version = _package_version()
    api = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    manifests = []
    for split in SPLITS:
        questions, image_paths = api[split][0](), api[split][1]()
        config = {
            "format": "example",
            "example": "easy-vqa",
            "split": split,
            "easy_vqa_version": version,
            "questions": len(questions[0]),
            "images": len(image_paths),
            "subsets": list(SUBSETS),
            "rows_per_shard": rows_per_shard,
        }
        truth_path = split_truth_path(out, split)
        if (out / split / MANIFEST).exists() and truth_path.exists():  # finished: skip the image work too
            manifest = Dataset(out / split).manifest
            if manifest.config == config:
                manifests.append(manifest)
                continue
        measured = _copy_images(image_paths, out, split, executor)
        labels, from_pixels = _shape_and_colour(questions, measured, split)
        looks = {i: Look.of(*labels[i], measured[i][2]) for i in labels if measured[i][2] is not None}
        if len(looks) < len(labels):
            raise IngestError(f"easy-vqa {split}: no shape found in the pixels of some images")
        captions = label_captions(looks)
        flat = _flat_rows(questions, labels, captions, split)

        def plan(progress: Path, flat=flat, split=split) -> list[dict[str, Any]]:
            path = progress / "example" / f"easy-vqa-{split}.parquet"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
                pq.write_table(flat, tmp, row_group_size=8192, compression="zstd")
                os.replace(tmp, path)
            return parquet_tasks([path], [f"easy-vqa/{split}"])

        extra = {
            "example": "easy-vqa",
            "split": split,
            "shape_colour_from_pixels": from_pixels,
            "captions": caption_figures(captions, looks),
            "truth": split_truth_ref(split),
        }
        manifest = run_ingest(
            out / split,
            config=config,
            spec={"mapping": {}, "defaults": {}, "data_root": str(out), "embed_images": False},
            data_root=str(out),
            plan_tasks=plan,
            rows_per_shard=rows_per_shard,
            executor=executor,
            overwrite=overwrite,
            extra=extra,
        )
        _write_truth(out, split, captions, looks, truth_path)
        manifests.append(manifest)
    return manifests[0], manifests[1]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easy-vqa")
    except PackageNotFoundError:
        return "unknown"


def _copy_images(image_paths: dict[int, str], out: Path, split: str, executor: Executor) -> dict[int, list]:
    """Copy the split's images to OUT/images/<split>/ and measure each: {id: [colour, fill, box]}."""
    items = [[i, image_paths[i], str(out / "images" / split / f"{i}.png")] for i in sorted(image_paths)]
    tasks = [{"items": items[k : k + _IMAGES_PER_TASK]} for k in range(0, len(items), _IMAGES_PER_TASK)]
    measured: dict[int, list] = {}
    for result in executor.map(copy_and_measure, tasks, desc=f"easy-vqa: {split} images"):
        measured.update({int(k): v for k, v in result["measured"].items()})
    return measured


def copy_and_measure(task: dict[str, Any]) -> dict[str, Any]:
    """Copy images (skipping finished copies) and read each one's shape colour, fill ratio and box."""
    from PIL import Image

    images = []
    for image_id, src, dst in task["items"]:
        data = Path(src).read_bytes()
        dst = Path(dst)
        if not (dst.exists() and dst.stat().st_size == len(data)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        with Image.open(io.BytesIO(data)) as im:
            images.append((str(image_id), im.convert("RGB")))
    return {"measured": _measure(images)}


def _measure(images: list[tuple[str, Any]]) -> dict[str, list]:
    """{id: [colour name or None, fill ratio or None, box or None]} of PIL images. The shape is drawn
    in the palette colour with most pixels, the background is the commonest other colour; a pixel
    belongs to the shape when it is nearer (L1) the shape's colour than the background's
    (anti-aliased edges split halfway), the box is the shape's bounding box ``[top, left, height,
    width, image height, image width]`` and the fill ratio is the shape's share of it."""
    out: dict[str, list] = {}
    by_size: dict[tuple, list] = defaultdict(list)
    for image_id, im in images:
        colours = im.getcolors(im.width * im.height)
        fg = max(((n, c) for n, c in colours if c in PALETTE), default=None)
        bg = max(((n, c) for n, c in colours if c not in PALETTE), default=None)
        if fg is None or bg is None:
            out[image_id] = [None, None, None]
        else:
            by_size[im.size].append((image_id, im, fg[1], bg[1]))
    for group in by_size.values():  # one vectorised pass per image size
        pixels = np.stack([np.asarray(im, dtype=np.int16) for _, im, _, _ in group])
        fg = np.array([g[2] for g in group], np.int16)[:, None, None, :]
        bg = np.array([g[3] for g in group], np.int16)[:, None, None, :]
        mask = np.abs(pixels - fg).sum(-1) < np.abs(pixels - bg).sum(-1)
        rows, cols = mask.any(2), mask.any(1)
        top, left = rows.argmax(1), cols.argmax(1)
        height = rows.shape[1] - rows[:, ::-1].argmax(1) - top
        width = cols.shape[1] - cols[:, ::-1].argmax(1) - left
        fill = mask.sum((1, 2)) / np.maximum(height * width, 1)
        for k, ((image_id, im, colour, _), any_) in enumerate(zip(group, rows.any(1), strict=True)):
            box = [int(top[k]), int(left[k]), int(height[k]), int(width[k]), im.height, im.width]
            out[image_id] = [PALETTE[colour], float(fill[k]), box] if any_ else [PALETTE[colour], None, None]
    return out


def _shape_from_fill(fill: float | None) -> str | None:
    """Triangles fill about half their bounding box, circles pi/4, rectangles all of it; the bands
    between are left undecided (measured on easy-vqa: triangles <= 0.66, circles 0.74-0.91,
    rectangles >= 0.955)."""
    if fill is None:
        return None
    if fill <= 0.69:
        return "triangle"
    if 0.71 <= fill <= 0.93:
        return "circle"
    if fill >= 0.94:
        return "rectangle"
    return None


def _shape_and_colour(
    questions: tuple[list, list, list],
    measured: dict[int, list],
    split: str,
) -> tuple[dict[int, tuple[str, str]], int]:
    """{image id: (colour, shape)} from the questions, completed from the pixels; see the module
    docstring. Returns the labels and how many images needed the pixels."""
    said: dict[str, dict[int, set]] = {"shape": defaultdict(set), "colour": defaultdict(set)}
    for text, answer, image in zip(*questions, strict=True):
        words = set(re.findall(r"[a-z]+", text.lower()))
        shapes, colours = words & set(SHAPES), words & set(COLOURS)
        if answer in SHAPES:  # what shape is ... / what is the blue shape?
            said["shape"][image].add(answer)
            said["colour"][image] |= colours
        elif answer in COLOURS:  # what color is the circle? / what is the color of the shape?
            said["colour"][image].add(answer)
            said["shape"][image] |= shapes
        elif answer in ("yes", "no") and (answer == "yes") != bool(_NEGATION.search(text)):
            said["shape"][image] |= shapes  # is there a circle? yes / is there not a red shape? no
            said["colour"][image] |= colours
    labels, from_pixels, problems = {}, 0, []
    for image, (p_colour, fill, _) in sorted(measured.items()):
        p_shape = _shape_from_fill(fill)
        q_shape, q_colour = said["shape"].get(image, set()), said["colour"].get(image, set())
        for what, q, p in (("shape", q_shape, p_shape), ("colour", q_colour, p_colour)):
            if len(q) > 1:
                problems.append(
                    f"image {image}: the questions give more than one {what} ({', '.join(sorted(q))})"
                )
            elif q and p is not None and p not in q:
                problems.append(f"image {image}: the questions say {what} {next(iter(q))}, the pixels {p}")
        shape = next(iter(q_shape)) if len(q_shape) == 1 else p_shape
        colour = next(iter(q_colour)) if len(q_colour) == 1 else p_colour
        if shape is None or colour is None:
            problems.append(
                f"image {image}: no {'shape' if shape is None else 'colour'} from questions or pixels"
            )
            continue
        from_pixels += len(q_shape) != 1 or len(q_colour) != 1
        labels[image] = (colour, shape)
    missing = set(questions[2]) - set(measured)
    if missing:
        problems.append(f"questions name images without a file: {sorted(missing)[:5]}")
    if problems:
        raise IngestError(
            f"easy-vqa {split}: cannot tell the shape and colour of every image: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    return labels, from_pixels


def _flat_rows(
    questions: tuple[list, list, list],
    labels: dict[int, tuple[str, str]],
    captions: dict[Caption, int],
    split: str,
) -> pa.Table:
    """One flat row per positive pair of the four subsets, in a fixed order."""
    rows: dict[str, list] = defaultdict(list)

    def add(subset: str, query_text, query_image, doc_text, doc_image) -> None:
        q_instr, d_instr = INSTRUCTIONS[subset]
        for key, value in (
            ("subset", subset),
            ("task", TASKS.get(subset, subset)),
            ("query_text", query_text),
            ("query_image", query_image),
            ("query_instruction", q_instr),
            ("doc_text", doc_text),
            ("doc_image", doc_image),
            ("doc_instruction", d_instr),
        ):
            rows[key].append(value)

    def path(image: int) -> str:
        return f"images/{split}/{image}.png"

    for text, answer, image in zip(*questions, strict=True):
        add("vqa", text, path(image), answer, None)
    for image, (_, shape) in sorted(labels.items()):
        add("classification", None, path(image), shape, None)
    for image, (colour, shape) in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):
        add("retrieval", f"a {colour} {shape}", None, None, path(image))
    for caption in sorted(captions, key=Caption.text):
        add("captions", caption.text(), None, None, path(captions[caption]))
    return pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})


def _write_truth(
    out: Path, split: str, captions: dict[Caption, int], looks: dict[Any, Look], path: Path
) -> Path:
    """Write the split's complete truth (see the module docstring), with the ids the ingest gave."""
    ds = Dataset(out / split)
    caption_query: dict[str, str] = {}  # caption text -> query id
    for batch in ds.iter_batches(QUERIES, columns=["query_id", "subset", "text"]):
        for qid, subset, text in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if subset == "captions":
                caption_query[text] = qid
    doc_of: dict[int, str] = {}  # image id -> captions doc id
    for batch in ds.iter_batches(CORPUS, columns=["doc_id", "subset", "image"]):
        for did, subset, image in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if subset == "captions":
                doc_of[int(Path(image["path"]).stem)] = did
    pairs: set[tuple[str, str]] = set()
    labelled: set[tuple[str, str]] = set()
    caption_queries = set(caption_query.values())
    for batch in ds.iter_batches(PAIRS, columns=["query_id", "doc_id", "label"]):
        for qid, did, label in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if label == "positive":
                (labelled if qid in caption_queries else pairs).add((qid, did))
    for caption, images in caption_truth(captions, looks).items():
        qid = caption_query[caption.text()]
        pairs.update((qid, doc_of[i]) for i in images)
    if not labelled <= pairs:  # the labelled image of a caption is one of its matches, by construction
        raise IngestError(f"easy-vqa {split}: a caption's labelled image is not among its matches")
    return write_truth(path, sorted(pairs))
