"""Every ingest form README documents, through the whole recipe: no good row is lost on the way.

Each form (JSONL, CSV, Parquet, a saved HF dataset with a ``ClassLabel``, an image folder with one
sub-folder per class, an image folder with a labels CSV, one with a captions CSV) holds the same six
generated pictures, each a different shape, and goes ingest -> validate -> dedup -> two steps of
stage 2 -> eval through the ``assay`` CLI. Every stage must keep every row and quarantine none.

The tabular forms name their class-name column ``label`` (the Hugging Face convention), and the CSV
also carries a ``score`` column of ratings that are not numbers: neither is the pair's relevance
label or score unless mapped, so neither may cost a row (issue 15: each form lost every row).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from assay.curation.ingest import CLASS_LABEL_INSTRUCTION, CLASSIFY_QUERY_INSTRUCTION  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402
from assay.training.model import MMEmbedder  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

SIZE = 32
#: Six pictures that differ in structure (pHash 20+ bits apart), not only in colour, so dedup's
#: near-duplicate check keeps all six whether or not it looks at colour.
SHAPES = ("circle", "frame", "triangle", "stripes", "plus", "cross")
COLOURS = ((200, 30, 30), (30, 90, 200), (30, 150, 60), (140, 50, 150), (190, 140, 20), (40, 40, 40))
CLASSES = ("round", "round", "pointed", "lined", "lined", "pointed")
CAPTIONS = tuple(f"a {shape} drawn in dark ink" for shape in SHAPES)
N = len(SHAPES)


def picture(i: int) -> bytes:
    img = Image.new("RGB", (SIZE, SIZE), (240, 240, 240))
    d, c = ImageDraw.Draw(img), COLOURS[i]
    if SHAPES[i] == "circle":
        d.ellipse((6, 6, 26, 26), fill=c)
    elif SHAPES[i] == "frame":
        d.rectangle((4, 4, 28, 28), outline=c, width=3)
    elif SHAPES[i] == "triangle":
        d.polygon([(16, 3), (29, 28), (3, 28)], fill=c)
    elif SHAPES[i] == "stripes":
        for y in range(0, SIZE, 8):
            d.rectangle((0, y, SIZE, y + 3), fill=c)
    elif SHAPES[i] == "plus":
        d.rectangle((13, 2, 19, 30), fill=c)
        d.rectangle((2, 13, 30, 19), fill=c)
    else:
        d.line((0, 0, SIZE, SIZE), fill=c, width=5)
        d.line((0, SIZE, SIZE, 0), fill=c, width=5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_csv(path: Path, header: list[str], body: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    return path


def write_pictures(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(picture(i))


# Each form writes its files under ``d`` and returns `assay ingest`'s SOURCE and the options after OUT.
CLASSIFY = ["--map", "query_image=image", "--map", "doc_text=label", "--task", "classification"]


def make_jsonl(d: Path) -> list[str]:
    write_pictures(d, [f"img/{i}.png" for i in range(N)])
    rows = [{"image": f"img/{i}.png", "label": CLASSES[i]} for i in range(N)]
    (d / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(d / "shapes.jsonl"), *CLASSIFY]


def make_csv(d: Path) -> list[str]:
    write_pictures(d, [f"img/{i}.png" for i in range(N)])
    body = [[f"img/{i}.png", CLASSES[i], "high" if i % 2 else "low"] for i in range(N)]
    write_csv(d / "shapes.csv", ["image", "label", "score"], body)  # score: a rating, not a number
    return [str(d / "shapes.csv"), *CLASSIFY]


def make_parquet(d: Path) -> list[str]:
    table = pa.table(
        {
            "image": [{"bytes": picture(i), "path": None} for i in range(N)],
            "label": list(CLASSES),
        }
    )
    pq.write_table(table, d / "shapes.parquet", row_group_size=4)
    return [str(d / "shapes.parquet"), *CLASSIFY]


def make_hf(d: Path) -> list[str]:
    datasets = pytest.importorskip("datasets")
    names = sorted(set(CLASSES))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    hf = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": picture(i), "path": None} for i in range(N)],
            "label": [names.index(c) for c in CLASSES],
        },
        features=features,
    )
    hf.save_to_disk(str(d / "shapes-hf"))
    return [str(d / "shapes-hf"), "--format", "hf", *CLASSIFY]


def make_class_folders(d: Path) -> list[str]:
    write_pictures(d / "folder", [f"{CLASSES[i]}/{i}.png" for i in range(N)])
    return [str(d / "folder"), "--format", "imagefolder"]


def make_labels_csv(d: Path) -> list[str]:
    write_pictures(d / "flat", [f"{i}.png" for i in range(N)])
    write_csv(d / "labels.csv", ["file", "label"], [[f"{i}.png", CLASSES[i]] for i in range(N)])
    return [str(d / "flat"), "--format", "imagefolder", "--labels", str(d / "labels.csv")]


def make_captions_csv(d: Path) -> list[str]:
    write_pictures(d / "flat", [f"{i}.png" for i in range(N)])
    write_csv(d / "captions.csv", ["file", "caption"], [[f"{i}.png", CAPTIONS[i]] for i in range(N)])
    return [str(d / "flat"), "--format", "imagefolder", "--captions", str(d / "captions.csv")]


#: form -> (how to make it, documents after ingest); every form gives N queries and N pairs.
FORMS = {
    "jsonl": (make_jsonl, len(set(CLASSES))),
    "csv": (make_csv, len(set(CLASSES))),
    "parquet": (make_parquet, len(set(CLASSES))),
    "hf-classlabel": (make_hf, len(set(CLASSES))),
    "imagefolder-classes": (make_class_folders, len(set(CLASSES))),
    "imagefolder-labels-csv": (make_labels_csv, len(set(CLASSES))),
    "imagefolder-captions-csv": (make_captions_csv, N),
}


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory) -> Path:
    """A tiny randomly initialised embedder, saved once: the stage-2 starting point of every form."""
    texts = [*CLASSES, *CAPTIONS, CLASSIFY_QUERY_INSTRUCTION, CLASS_LABEL_INSTRUCTION]
    model, processor = build_tiny(
        texts, tokens_per_tile=16, image_size=SIZE, hidden_size=32, num_layers=1, vocab_size=300
    )
    path = tmp_path_factory.mktemp("init") / "ckpt"
    MMEmbedder(model, processor).save_pretrained(path)
    return path


def assay(*args: str) -> str:
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, f"assay {' '.join(args)}:\n{res.output}"
    return res.output


def counts(dataset: Path) -> dict[str, int]:
    return json.loads((dataset / "manifest.json").read_text())["counts"]


@pytest.mark.parametrize("form", list(FORMS))
def test_every_ingest_form_keeps_every_row_through_the_recipe(form, init_checkpoint, tmp_path):
    make, n_docs = FORMS[form]
    source_args = make(tmp_path)
    expected = {"queries": N, "corpus": n_docs, "pairs": N, "quarantine": 0}

    raw, valid, clean = tmp_path / "raw", tmp_path / "valid", tmp_path / "clean"
    assay("ingest", source_args[0], str(raw), *source_args[1:], "--executor", "local")
    assert counts(raw) == expected
    pairs = pq.read_table(raw / "pairs").to_pylist()
    assert {p["label"] for p in pairs} == {"positive"}  # a class name is never a relevance label
    assert {p["score"] for p in pairs} == {None}  # nor is a column that merely is named score
    assay("validate", str(raw), str(valid), "--executor", "local")
    assert counts(valid) == expected
    assay("dedup", str(valid), str(clean), "--executor", "local")
    assert counts(clean) == expected

    config = {
        "stage": "2",
        "data": [str(clean)],
        "output": str(tmp_path / "stage2"),
        "init": str(init_checkpoint),
        "lora": {"rank": 4},
        "batch_size": 4,
        "mini_batch": 4,
        "max_steps": 2,
        "save_every": 100,
        "device": "cpu",
    }
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(config))
    out = assay("train", str(tmp_path / "stage2.yaml"), "--no-progress")
    final = Path(out.strip().splitlines()[-1].removeprefix("final checkpoint: "))
    assert final.is_dir(), out
    log = [json.loads(line) for line in (tmp_path / "stage2" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and sum(step["units"] for step in log) == N  # one epoch: every query trained on

    metrics_path = tmp_path / "metrics.json"
    assay("eval", str(final), str(clean), "--device", "cpu", "--out", str(metrics_path))
    metrics = json.loads(metrics_path.read_text())
    assert metrics["overall"]["queries"] == N and metrics["overall"]["queries_without_positive"] == 0
