"""Export: every format read back, images written once, text-only refusal, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from assay.curation.dataset import Dataset, write_dataset
from assay.curation.export import FLAT_COLUMNS, ExportError, export_dataset, image_extension
from assay.curation.filter_expr import FilterError
from assay.pipelines.commands.export import command as export_command


@pytest.fixture
def image_ds(tmp_path, make_png) -> Dataset:
    """Queries q0, q1 share one inline PNG; q2 is text. d2's image is a path under the data root;
    d4's path does not exist. One pair names a query that does not exist."""
    root = tmp_path / "media"
    root.mkdir()
    (root / "cat.png").write_bytes(make_png((0, 0, 255)))
    red = make_png((255, 0, 0))
    queries = [
        {
            "query_id": "q0",
            "subset": "vqa",
            "task": "vqa",
            "instruction": "Answer the question:",
            "text": "what color?",
            "image": {"bytes": red, "path": None},
        },
        {
            "query_id": "q1",
            "subset": "vqa",
            "task": "vqa",
            "instruction": "Answer the question:",
            "text": "what shape?",
            "image": {"bytes": red, "path": None},
        },
        {
            "query_id": "q2",
            "subset": "ret",
            "task": "retrieval",
            "instruction": None,
            "text": "a cat",
            "image": None,
        },
    ]
    corpus = [
        {"doc_id": "d0", "subset": "vqa", "instruction": None, "text": "red", "image": None},
        {"doc_id": "d1", "subset": "vqa", "instruction": None, "text": "blue", "image": None},
        {
            "doc_id": "d2",
            "subset": "ret",
            "instruction": "Represent the image.",
            "text": None,
            "image": {"bytes": None, "path": "cat.png"},
        },
        {"doc_id": "d3", "subset": "ret", "instruction": None, "text": "a dog", "image": None},
        {
            "doc_id": "d4",
            "subset": "ret",
            "instruction": None,
            "text": None,
            "image": {"bytes": None, "path": "gone.png"},
        },
    ]
    pairs = [
        {"query_id": "q0", "doc_id": "d0", "label": "positive", "judge_p_yes": 0.9},
        {"query_id": "q0", "doc_id": "d3", "label": "negative"},
        {"query_id": "q0", "doc_id": "d1", "label": "hard_negative", "rank": 1, "judge_p_yes": 0.2},
        {"query_id": "q0", "doc_id": "d2", "label": "false_negative"},
        {"query_id": "q1", "doc_id": "d1", "label": "positive"},
        {"query_id": "q2", "doc_id": "d2", "label": "positive"},
        {"query_id": "q2", "doc_id": "d3", "label": "hard_negative"},
        {"query_id": "q2", "doc_id": "d4", "label": "negative"},
        {"query_id": "qX", "doc_id": "d3", "label": "positive"},
    ]
    return write_dataset(
        tmp_path / "ds",
        {"queries": queries, "corpus": corpus, "pairs": pairs},
        data_root=str(root),
        rows_per_shard=2,
    )


@pytest.fixture
def text_ds(tmp_path) -> Dataset:
    queries = [
        {
            "query_id": f"q{i}",
            "subset": "s",
            "task": "retrieval",
            "instruction": "query:",
            "text": f"question {i}",
            "image": None,
        }
        for i in range(4)
    ]
    corpus = [
        {"doc_id": f"d{j}", "subset": "s", "instruction": None, "text": f"passage {j}", "image": None}
        for j in range(7)
    ]
    pairs = [
        {"query_id": "q0", "doc_id": "d0", "label": "positive"},
        {"query_id": "q0", "doc_id": "d1", "label": "negative", "rank": 1},
        {"query_id": "q0", "doc_id": "d2", "label": "hard_negative", "rank": 5},
        {"query_id": "q0", "doc_id": "d3", "label": "hard_negative", "rank": 2},
        {"query_id": "q0", "doc_id": "d4", "label": "false_negative"},
        {"query_id": "q1", "doc_id": "d1", "label": "positive"},
        {"query_id": "q1", "doc_id": "d5", "label": "positive"},
        {"query_id": "q1", "doc_id": "d2", "label": "hard_negative"},
        {"query_id": "q2", "doc_id": "d3", "label": "hard_negative"},  # no positive
        {"query_id": "q3", "doc_id": "d6", "label": "positive"},  # no negative
    ]
    return write_dataset(
        tmp_path / "text", {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=3
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def image_files(d: Path) -> list[Path]:
    return sorted((d / "images").iterdir()) if (d / "images").is_dir() else []


def test_parquet_flat_view_and_images(image_ds, tmp_path, make_png):
    out = tmp_path / "out"
    res = export_dataset(image_ds, out, "parquet")
    df = pl.read_parquet(out / "pairs.parquet")
    assert tuple(df.columns) == FLAT_COLUMNS
    # qX's pair has no query; the pair to d4 has a missing image file: both left out and counted
    assert res.rows == df.height == 7
    assert res.skipped == {"pairs whose query or doc is missing": 1, "pairs whose image file is missing": 1}
    assert df["doc_id"].to_list() == ["d0", "d3", "d1", "d2", "d1", "d2", "d3"]  # the dataset's order
    # the shared inline image is written once, by content hash, and referenced relatively
    files = image_files(out)
    red = make_png((255, 0, 0))
    assert [f.name for f in files] == [f"{hashlib.sha256(red).hexdigest()}.png"]
    assert res.images_written == 1
    q_imgs = dict(zip(df["query_id"], df["query_image"], strict=True))
    assert q_imgs["q0"] == q_imgs["q1"] == f"images/{files[0].name}"
    assert (out / q_imgs["q0"]).read_bytes() == red
    assert q_imgs["q2"] is None
    # an image stored as a path is written as an absolute path under the data root
    d2 = df.filter(pl.col("doc_id") == "d2")["doc_image"][0]
    assert Path(d2).is_absolute() and Path(d2) == (image_ds.data_root / "cat.png").resolve()
    info = json.loads((out / "export.json").read_text())
    assert (
        info["format"] == "parquet"
        and info["rows"] == 7
        and info["source"]["path"] == str(image_ds.root.resolve())
    )
    assert not list(tmp_path.glob(".tmp-out-*"))


def test_copy_images_and_file_output(image_ds, tmp_path, make_png):
    out = tmp_path / "exports" / "flat.parquet"
    res = export_dataset(image_ds, out, "parquet", copy_images=True)
    assert res.path == out and out.is_file()
    df = pl.read_parquet(out)
    d2 = df.filter(pl.col("doc_id") == "d2")["doc_image"][0]
    assert d2 == f"images/{hashlib.sha256(make_png((0, 0, 255))).hexdigest()}.png"
    assert (out.parent / d2).is_file()
    assert len(image_files(out.parent)) == 2
    # a second export into the same folder reuses the images instead of rewriting them
    res2 = export_dataset(image_ds, out.parent / "again.parquet", "parquet", copy_images=True)
    assert res2.images_written == 0 and len(image_files(out.parent)) == 2


def test_jsonl_vlm2vec_rows(image_ds, tmp_path):
    out = tmp_path / "out"
    res = export_dataset(image_ds, out, "jsonl")
    got = read_jsonl(out / "train.jsonl")
    img = image_files(out)[0].name
    cat = str((image_ds.data_root / "cat.png").resolve())
    assert got == [
        {
            "qry": "<|image_1|>\nAnswer the question: what color?",
            "qry_image_path": f"images/{img}",
            "pos_text": "red",
            "pos_image_path": "",
            "neg_text": ["blue", "a dog"],
            "neg_image_path": ["", ""],  # hard_negative first; never the false_negative
            "query_id": "q0",
            "subset": "vqa",
        },
        {
            "qry": "<|image_1|>\nAnswer the question: what shape?",
            "qry_image_path": f"images/{img}",
            "pos_text": "blue",
            "pos_image_path": "",
            "neg_text": [],
            "neg_image_path": [],
            "query_id": "q1",
            "subset": "vqa",
        },
        {
            "qry": "a cat",
            "qry_image_path": "",
            "pos_text": "<|image_1|>\nRepresent the image.",
            "pos_image_path": cat,
            "neg_text": ["a dog"],
            "neg_image_path": [""],
            "query_id": "q2",
            "subset": "ret",
        },
    ]
    assert res.rows == 3
    assert res.skipped["false_negative pairs (never negatives)"] == 1
    # --num-negatives and --where
    export_dataset(image_ds, tmp_path / "one.jsonl", "jsonl", num_negatives=1, where="subset == 'vqa'")
    got = read_jsonl(tmp_path / "one.jsonl")
    assert [r["query_id"] for r in got] == ["q0", "q1"]
    assert got[0]["neg_text"] == ["blue"]


def test_hf_save_to_disk(image_ds, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    res = export_dataset(image_ds, out, "hf", where="label != 'false_negative'")
    loaded = datasets.load_from_disk(str(out))
    assert loaded.num_rows == res.rows == 6
    assert loaded.column_names == list(FLAT_COLUMNS)
    assert loaded[0]["query_id"] == "q0" and loaded[0]["label"] == "positive"
    assert abs(loaded[0]["judge_p_yes"] - 0.9) < 1e-6
    assert (out / loaded[0]["query_image"]).is_file()
    assert not (out / "_work").exists()


def st(text_ds, tmp_path, fmt, **kw):
    out = tmp_path / fmt
    res = export_dataset(text_ds, out, fmt, **kw)
    return pl.read_parquet(out / "train.parquet").to_dicts(), res


def test_triplet(text_ds, tmp_path):
    rows, res = st(text_ds, tmp_path, "triplet")
    assert [(r["anchor"], r["positive"], r["negative"]) for r in rows] == [
        ("question 0", "passage 0", "passage 3"),  # hard negatives by rank, then negatives
        ("question 0", "passage 0", "passage 2"),
        ("question 0", "passage 0", "passage 1"),
        ("question 1", "passage 1", "passage 2"),
        ("question 1", "passage 5", "passage 2"),
    ]
    assert res.skipped == {
        "false_negative pairs (never negatives)": 1,
        "queries without a positive pair": 1,
        "positives whose query has no negative": 1,
    }
    rows, _ = st(text_ds, tmp_path / "n1", "triplet", num_negatives=1, with_instruction=True)
    assert [(r["anchor"], r["negative"]) for r in rows] == [
        ("query: question 0", "passage 3"),
        ("query: question 1", "passage 2"),
        ("query: question 1", "passage 2"),
    ]


def test_n_tuple(text_ds, tmp_path):
    rows, res = st(text_ds, tmp_path, "n-tuple", num_negatives=2)
    assert rows == [
        {
            "anchor": "question 0",
            "positive": "passage 0",
            "negative_1": "passage 3",
            "negative_2": "passage 2",
        }
    ]
    assert res.skipped["positives whose query has fewer than 2 negatives"] == 3  # q1 twice, q3
    assert res.skipped["queries with fewer than 2 negatives"] == 2
    with pytest.raises(ExportError, match="needs --num-negatives"):
        export_dataset(text_ds, tmp_path / "x", "n-tuple")


def test_labeled_pair(text_ds, tmp_path):
    rows, _ = st(text_ds, tmp_path, "labeled-pair", num_negatives=2)
    assert [(r["sentence1"], r["sentence2"], r["label"]) for r in rows] == [
        ("question 0", "passage 0", 1.0),
        ("question 0", "passage 3", 0.0),
        ("question 0", "passage 2", 0.0),
        ("question 1", "passage 1", 1.0),
        ("question 1", "passage 5", 1.0),
        ("question 1", "passage 2", 0.0),
        ("question 2", "passage 3", 0.0),
        ("question 3", "passage 6", 1.0),
    ]


def test_labeled_list_loads_with_datasets(text_ds, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows, res = st(text_ds, tmp_path, "labeled-list")
    assert rows == [
        {
            "query": "question 0",
            "docs": ["passage 0", "passage 3", "passage 2", "passage 1"],
            "labels": [1, 0, 0, 0],
        },
        {"query": "question 1", "docs": ["passage 1", "passage 5", "passage 2"], "labels": [1, 1, 0]},
        {"query": "question 3", "docs": ["passage 6"], "labels": [1]},
    ]
    assert res.skipped["queries without a positive pair"] == 1
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "labeled-list" / "train.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert loaded.column_names == ["query", "docs", "labels"]
    assert loaded[1]["labels"] == [1, 1, 0]


def test_st_formats_refuse_image_rows(image_ds, tmp_path):
    with pytest.raises(ExportError) as e:
        export_dataset(image_ds, tmp_path / "t", "triplet")
    msg = str(e.value)
    assert "7 of 8 pairs have an image (5 on the query side, 3 on the document side)" in msg
    assert "--skip-image-rows" in msg
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".tmp-t-*"))
    res = export_dataset(image_ds, tmp_path / "t", "labeled-pair", skip_image_rows=True)
    rows = pl.read_parquet(tmp_path / "t" / "train.parquet").to_dicts()
    assert rows == [{"sentence1": "a cat", "sentence2": "a dog", "label": 0.0}]
    assert res.skipped["pairs with an image"] == 7
    assert image_files(tmp_path / "t") == []


def test_export_argument_errors(image_ds, tmp_path):
    with pytest.raises(FilterError, match="unknown column 'nope'.*the export view has columns: query_id"):
        export_dataset(image_ds, tmp_path / "o", "parquet", where="nope == 1")
    with pytest.raises(ExportError, match="unknown export format"):
        export_dataset(image_ds, tmp_path / "o", "csv")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_dataset(image_ds, tmp_path / "exists", "parquet")
    export_dataset(image_ds, tmp_path / "exists", "parquet", overwrite=True)
    assert (tmp_path / "exists" / "pairs.parquet").is_file()
    export_dataset(image_ds, tmp_path / "exists", "jsonl", overwrite=True)  # an earlier export is replaced
    assert sorted(p.name for p in (tmp_path / "exists").iterdir()) == ["export.json", "images", "train.jsonl"]
    with pytest.raises(ExportError, match="must not contain it"):
        export_dataset(image_ds, image_ds.root.parent, "parquet", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="holds no earlier export"):
        export_dataset(image_ds, tmp_path / "other", "parquet", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").is_file()
    with pytest.raises(ExportError, match="outside the dataset"):
        export_dataset(image_ds, image_ds.root / "export", "parquet")


def test_image_extension():
    assert image_extension(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert image_extension(b"\xff\xd8\xff\xe0") == "jpg"
    assert image_extension(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert image_extension(b"GIF89a") == "gif"
    assert image_extension(b"????", ".JPEG") == "jpeg"
    assert image_extension(b"????") == "bin"


def test_cli(image_ds, text_ds, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        export_command, [str(image_ds.root), str(tmp_path / "j"), "--format", "jsonl", "-n", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "export: wrote 3 jsonl rows" in res.output
    assert "images written: 1" in res.output
    assert "left out: pairs whose query or doc is missing: 1" in res.output
    res = runner.invoke(
        export_command,
        [
            str(text_ds.root),
            str(tmp_path / "nt"),
            "-f",
            "n-tuple",
            "-n",
            "1",
            "--where",
            "label != 'negative'",
        ],
    )
    assert res.exit_code == 0, res.output
    assert pq.ParquetFile(tmp_path / "nt" / "train.parquet").metadata.num_rows == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-f", "n-tuple"], "needs --num-negatives"),
        (["-f", "csv"], "Invalid value for '--format'"),
        (["-f", "parquet", "--where", "lable == 'x'"], "unknown column 'lable'"),
        (["-f", "parquet", "--where", "().__class__"], "attribute access"),
        (["-f", "triplet"], "--skip-image-rows"),
        (["-f", "jsonl", "-n", "-1"], "Invalid value for '--num-negatives'"),
        ([], "Missing option '--format'"),
    ],
)
def test_cli_bad_arguments(image_ds, tmp_path, args, needle):
    res = CliRunner().invoke(export_command, [str(image_ds.root), str(tmp_path / "o"), *args])
    assert res.exit_code != 0
    assert needle in res.output
    assert not (tmp_path / "o").exists()


def test_cli_not_a_dataset(tmp_path):
    res = CliRunner().invoke(export_command, [str(tmp_path), str(tmp_path / "o"), "-f", "parquet"])
    assert res.exit_code != 0 and "not an assay dataset" in res.output
