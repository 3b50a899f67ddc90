"""Ingest: every input format into the dataset format, bad rows quarantined, resumable to the byte."""

from __future__ import annotations

import collections
import csv
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from assay.curation.dataset import Dataset, DatasetError
from assay.curation.executor import LocalExecutor
from assay.curation.ingest import IngestError, ingest, ingest_split_folders, split_folders
from assay.curation.quarantine import decode_record
from assay.curation.truth import read_truth
from assay.pipelines.commands.ingest import command

# ------------------------------------------------------------------------------------------ helpers


def rows(ds: Dataset, table: str) -> list[dict]:
    return [r for name in ds.shards(table) for r in ds.read_shard(table, name).to_pylist()]


def quarantine(root: Path) -> list[dict]:
    return [r for p in sorted((root / "quarantine").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def write_jsonl(path: Path, items: list) -> Path:
    with open(path, "wb") as f:
        for item in items:
            f.write(item if isinstance(item, bytes) else json.dumps(item).encode())
            f.write(b"\n")
    return path


def write_csv(path: Path, header: list[str], body: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    return path


def run_cli(*args: str):
    return CliRunner().invoke(command, [*args, "--executor", "local"])


def assert_pairs_resolve(ds: Dataset) -> None:
    qids = {r["query_id"] for r in rows(ds, "queries")}
    dids = {r["doc_id"] for r in rows(ds, "corpus")}
    for p in rows(ds, "pairs"):
        assert p["query_id"] in qids and p["doc_id"] in dids


# Three rows, two questions about one image, all answered "a cat": the doc is stored once.
PAIRS = [
    {"question": "what animal is this?", "img": "img/a.png", "answer": "a cat", "grade": 0.9},
    {"question": "what is on the sofa?", "img": "img/a.png", "answer": "a cat", "grade": 0.5},
    {"question": "what animal is this?", "img": "img/b.png", "answer": "a cat", "grade": None},
]
MAPPING = {"query_text": "question", "query_image": "img", "doc_text": "answer", "score": "grade"}


def check_pairs_dataset(out: Path, data_root: Path) -> Dataset:
    ds = Dataset(out)
    assert ds.manifest.stage == "ingest"
    assert ds.manifest.data_root == str(data_root.resolve())
    queries, corpus, pairs = rows(ds, "queries"), rows(ds, "corpus"), rows(ds, "pairs")
    assert [q["text"] for q in queries] == [p["question"] for p in PAIRS]
    assert [q["image"] for q in queries] == [{"bytes": None, "path": p["img"]} for p in PAIRS]
    assert {q["subset"] for q in queries} == {"vqa-set"} and {q["task"] for q in queries} == {"vqa"}
    assert len(corpus) == 1 and corpus[0]["text"] == "a cat" and corpus[0]["doc_id"].startswith("d-")
    assert [p["label"] for p in pairs] == ["positive"] * 3
    scores = [p["score"] for p in pairs]
    assert scores[:2] == pytest.approx([0.9, 0.5]) and scores[2] is None
    assert {p["doc_id"] for p in pairs} == {corpus[0]["doc_id"]}
    assert ds.manifest.counts == {"queries": 3, "corpus": 1, "pairs": 3, "quarantine": 0}
    assert_pairs_resolve(ds)
    return ds


# ------------------------------------------------------------------------------------------- formats


def write_source(fmt: str, tmp_path: Path) -> Path:
    """PAIRS as a file (or saved HF dataset) of the given format."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    if fmt == "csv":
        header = list(PAIRS[0])
        return write_csv(
            tmp_path / "pairs.csv", header, [["" if p[h] is None else p[h] for h in header] for p in PAIRS]
        )
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "pairs.parquet", row_group_size=2)
        return tmp_path / "pairs.parquet"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "pairs-hf"))
    return tmp_path / "pairs-hf"


@pytest.mark.parametrize("how", ["flags", "yaml"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_every_format_with_map_flags_or_a_yaml_mapping(tmp_path, fmt, how):
    src = write_source(fmt, tmp_path)
    if how == "flags":
        mapping = [arg for k, v in MAPPING.items() for arg in ("--map", f"{k}={v}")]
    else:
        (tmp_path / "map.yaml").write_text("".join(f"{k}: {v}\n" for k, v in MAPPING.items()))
        mapping = ["--mapping", str(tmp_path / "map.yaml")]
    args = [str(src), str(tmp_path / "out"), *mapping, "--subset", "vqa-set", "--task", "vqa"]
    res = run_cli(*args, "--data-root", str(tmp_path))  # format inferred from the extension / folder
    assert res.exit_code == 0, res.output
    assert "ingest: queries=3 corpus=1 pairs=3 quarantine=0" in res.output
    ds = check_pairs_dataset(tmp_path / "out", tmp_path)
    assert ds.manifest.config["format"] == fmt and ds.manifest.config["mapping"] == MAPPING


def test_python_api_mapping_and_flags_mixed_with_same_named_columns(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [{**p, "doc_text": p["answer"]} for p in PAIRS])
    (tmp_path / "map.yaml").write_text("query_text: question\nquery_image: img\nscore: grade\n")
    ingest(src, tmp_path / "out", mapping=tmp_path / "map.yaml", subset="vqa-set", task="vqa")
    check_pairs_dataset(tmp_path / "out", tmp_path)  # doc_text read from the same-named column


def test_parquet_row_groups_inline_bytes_and_same_named_columns(tmp_path, make_png):
    red, blue = make_png((255, 0, 0)), make_png((0, 0, 255))
    table = pa.table(
        {
            "query_text": ["a red square", "a blue square", "a red square again", "blue"],
            "doc_image": pa.array(
                [
                    {"bytes": red, "path": None},
                    {"bytes": blue, "path": "blue.png"},
                    {"bytes": red, "path": None},
                    {"bytes": blue, "path": "blue.png"},
                ]
            ),
            "label": ["positive", "positive", "positive", "hard_negative"],
            "subset": ["colours", "colours", "colours", None],
        }
    )
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=2)
    # the relevance label is read only when mapped, even from a column named label
    ingest(tmp_path / "pairs.parquet", tmp_path / "out", subset="fallback", mapping={"label": "label"})
    ds = Dataset(tmp_path / "out")
    corpus = rows(ds, "corpus")
    # same bytes, same subset -> one doc; the row without a subset gets --subset and its own doc
    assert [(c["subset"], c["image"]["bytes"]) for c in corpus] == [
        ("colours", red),
        ("colours", blue),
        ("fallback", blue),
    ]
    pairs = rows(ds, "pairs")
    assert [p["label"] for p in pairs] == ["positive", "positive", "positive", "hard_negative"]
    assert pairs[0]["doc_id"] == pairs[2]["doc_id"]
    assert {q["task"] for q in rows(ds, "queries")} == {"retrieval"}


def test_hf_save_to_disk_round_trip(tmp_path, make_png):
    datasets = pytest.importorskip("datasets")
    images = [make_png((255, 0, 0)), make_png((0, 255, 0)), make_png((0, 0, 255))]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["red", "green", "blue"]),
        }
    )
    hf = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in images],
            "caption": ["red", "green", "blue"],
            "label": [0, 1, 2],
        },
        features=features,
    )
    hf.save_to_disk(str(tmp_path / "hf"))
    ingest(
        tmp_path / "hf",
        tmp_path / "out",
        format="hf",
        mapping={"query_image": "image", "doc_text": "label"},
        task="classification",
    )
    ds = Dataset(tmp_path / "out")
    assert [q["image"]["bytes"] for q in rows(ds, "queries")] == images
    assert [c["text"] for c in rows(ds, "corpus")] == ["red", "green", "blue"]  # ClassLabel names
    assert {p["label"] for p in rows(ds, "pairs")} == {"positive"}  # the ClassLabel is not relevance
    assert {q["subset"] for q in rows(ds, "queries")} == {"hf"}
    # a DatasetDict: one split at a time, the error says so
    datasets.DatasetDict({"train": hf, "test": hf}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(IngestError, match="split"):
        ingest(tmp_path / "dd", tmp_path / "out2")


def test_imagefolder_one_folder_per_class(tmp_path, make_png):
    for label, colour in (("cat", (1, 2, 3)), ("dog", (4, 5, 6))):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "photos" / label / f"{i}.png").write_bytes(make_png(colour, size=(8 + i, 8)))
    (tmp_path / "photos" / "notes.txt").write_text("not an image")  # ignored
    (tmp_path / "photos" / "stray.png").write_bytes(make_png())  # in no class folder: quarantined
    m = ingest(tmp_path / "photos", tmp_path / "out")  # format inferred
    ds = Dataset(tmp_path / "out")
    queries, corpus, pairs = rows(ds, "queries"), rows(ds, "corpus"), rows(ds, "pairs")
    assert m.counts == {"queries": 6, "corpus": 2, "pairs": 6, "quarantine": 1}
    assert [(r["reason"], r["source"]) for r in quarantine(tmp_path / "out")] == [
        ("missing_field", "stray.png")
    ]
    assert [q["image"]["path"] for q in queries][:2] == ["cat/0.png", "cat/1.png"]
    assert {(q["subset"], q["task"], q["text"]) for q in queries} == {
        ("classification", "classification", None)
    }
    assert all(q["instruction"] for q in queries) and all(c["instruction"] for c in corpus)
    assert sorted(c["text"] for c in corpus) == ["cat", "dog"]
    label_of = {c["doc_id"]: c["text"] for c in corpus}
    assert [label_of[p["doc_id"]] for p in pairs] == ["cat"] * 3 + ["dog"] * 3
    assert {p["label"] for p in pairs} == {"positive"}  # the class is the doc, not the pair's label
    assert ds.manifest.data_root == str((tmp_path / "photos").resolve())


def test_an_image_folder_of_splits_becomes_one_dataset_per_split_and_its_truth(tmp_path, make_png):
    """SOURCE/{train,test}/<class>/ (Hugging Face's imagefolder layout) -> OUT/train, OUT/test and
    OUT/truth/<split>.parquet, the layout the bundled example writes (so its loop runs on it)."""
    for split, n in (("train", 3), ("test", 2)):
        for label, colour in (("cat", (1, 2, 3)), ("dog", (4, 5, 6))):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "photos" / split / label / f"{i}.png").write_bytes(
                    make_png(colour, size=(8 + i, 8))
                )
    assert split_folders(tmp_path / "photos") == ["train", "test"]
    assert split_folders(tmp_path / "photos" / "train") == []  # class folders, not splits
    with pytest.raises(IngestError, match="split folders"):  # not silently two classes
        ingest(tmp_path / "photos", tmp_path / "wrong")
    manifests = ingest_split_folders(tmp_path / "photos", tmp_path / "out")
    assert {s: m.counts["queries"] for s, m in manifests.items()} == {"train": 6, "test": 4}
    train, test = Dataset(tmp_path / "out" / "train"), Dataset(tmp_path / "out" / "test")
    assert {c["doc_id"] for c in rows(train, "corpus")} == {c["doc_id"] for c in rows(test, "corpus")}
    truth = read_truth(tmp_path / "out" / "truth" / "test.parquet")
    assert truth.complete and test.manifest.extra["truth"] == "../truth/test.parquet"
    for pair in rows(test, "pairs"):  # each image matches its own class and no other
        assert truth.relevant(pair["query_id"], pair["doc_id"]) is True
        other = next(c["doc_id"] for c in rows(test, "corpus") if c["doc_id"] != pair["doc_id"])
        assert truth.relevant(pair["query_id"], other) is False
    # the CLI finds the layout by itself
    res = CliRunner().invoke(
        command, [str(tmp_path / "photos"), str(tmp_path / "cli"), "--executor", "local"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "truth" / "train.parquet").is_file() and "[train]" in res.output


def test_imagefolder_with_labels_and_captions_csv(tmp_path, make_png):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.png").write_bytes(make_png((i, i, i)))
    labels = write_csv(
        tmp_path / "labels.csv", ["file", "label"], [["0.png", "dark"], ["1.png", "dark"], ["2.png", ""]]
    )
    ingest(flat, tmp_path / "by-label", format="imagefolder", labels=labels, subset="shades")
    ds = Dataset(tmp_path / "by-label")
    assert ds.manifest.counts == {"queries": 2, "corpus": 1, "pairs": 2, "quarantine": 1}
    (bad,) = quarantine(tmp_path / "by-label")
    assert (bad["reason"], bad["source"]) == ("missing_field", "labels.csv:4")
    assert {q["subset"] for q in rows(ds, "queries")} == {"shades"}
    assert [c["text"] for c in rows(ds, "corpus")] == ["dark"]
    assert {p["label"] for p in rows(ds, "pairs")} == {"positive"}

    captions = write_csv(
        flat / "captions.csv",  # inside the folder: --captions still means an image folder
        ["file", "caption"],
        [["0.png", "a black square"], ["1.png", "a nearly black square"], ["2.png", "grey"]],
    )
    ingest(flat, tmp_path / "by-caption", captions=captions, embed_images=True)
    ds = Dataset(tmp_path / "by-caption")
    queries, corpus = rows(ds, "queries"), rows(ds, "corpus")
    assert [q["text"] for q in queries] == ["a black square", "a nearly black square", "grey"]
    assert {q["task"] for q in queries} == {"retrieval"}
    assert [c["image"] for c in corpus] == [
        {"bytes": (flat / f"{i}.png").read_bytes(), "path": f"{i}.png"} for i in range(3)
    ]


# ------------------------------------------------------------------------------------------- easy-vqa


@pytest.fixture(scope="module")
def easy_vqa_out(tmp_path_factory):
    from assay.curation.examples import ingest_easy_vqa

    out = tmp_path_factory.mktemp("easy-vqa")
    train, test = ingest_easy_vqa(out)
    return out, train, test


def test_easy_vqa_three_subsets_with_package_counts(easy_vqa_out):
    import easy_vqa

    out, train, test = easy_vqa_out
    for split, manifest, questions, images in (
        ("train", train, easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", test, easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        ds = Dataset(out / split)
        assert ds.manifest.data_root == str(out.resolve())
        queries, corpus, pairs = rows(ds, "queries"), rows(ds, "corpus"), rows(ds, "pairs")
        q_by = collections.Counter((q["subset"], q["task"]) for q in queries)
        n_q, n_i = len(questions[0]), len(images)
        n_desc = len({q["text"] for q in queries if q["subset"] == "retrieval"})
        assert q_by == {
            ("vqa", "vqa"): n_q,
            ("classification", "classification"): n_i,
            ("retrieval", "retrieval"): n_desc,
            ("captions", "retrieval"): manifest.extra["captions"]["queries"],  # see test_examples.py
        }
        assert 3 <= n_desc <= 24
        c_by = collections.Counter(c["subset"] for c in corpus)
        n_cap = manifest.extra["captions"]["queries"]
        assert c_by == {
            "vqa": len(set(questions[1])),
            "classification": 3,
            "retrieval": n_i,
            "captions": manifest.extra["captions"]["corpus"],
        }
        assert len(pairs) == n_q + 2 * n_i + n_cap and {p["label"] for p in pairs} == {"positive"}
        assert manifest.counts["quarantine"] == 0
        # every query has a positive; every image path exists under the data root
        assert {q["query_id"] for q in queries} == {p["query_id"] for p in pairs}
        assert_pairs_resolve(ds)
        paths = {r["image"]["path"] for r in queries + corpus if r["image"]}
        assert all(p.startswith(f"images/{split}/") and (out / p).is_file() for p in paths)
        assert all(q["instruction"] for q in queries) and all(c["instruction"] for c in corpus)
        # retrieval: the description matches the classification label of each of its images
        shape_of_doc = {c["doc_id"]: c["text"] for c in corpus if c["subset"] == "classification"}
        image_shape = {
            q["image"]["path"]: shape_of_doc[p["doc_id"]]
            for q, p in zip(queries, pairs, strict=False)
            if q["subset"] == "classification"
        }
        qtext = {q["query_id"]: q["text"] for q in queries}
        dpath = {c["doc_id"]: c["image"]["path"] for c in corpus if c["subset"] == "retrieval"}
        for p in pairs:
            if p["doc_id"] in dpath:
                assert qtext[p["query_id"]].endswith(image_shape[dpath[p["doc_id"]]])
    train_paths = {r["image"]["path"] for r in rows(Dataset(out / "train"), "corpus") if r["image"]}
    test_paths = {r["image"]["path"] for r in rows(Dataset(out / "test"), "corpus") if r["image"]}
    assert train_paths and test_paths and not train_paths & test_paths


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at, count",
    [
        ("images/train/*.png", 1500),
        ("train/_progress/parts/*/done.json", 2),
        ("train/_progress/done/*/*.json", 1),
        ("test/_progress/parts/*/done.json", 1),
    ],
)
def test_easy_vqa_cli_killed_mid_run_resumes_to_the_same_output(tmp_path, easy_vqa_out, kill_at, count):
    from helpers.kill import assay_cmd, assert_same_dataset, run_and_kill, run_ok

    killed = tmp_path / "killed"
    args = ["ingest", "--format", "example", "easy-vqa", str(killed), "--executor", "local"]
    assert run_and_kill(assay_cmd(*args), killed, kill_at, count), "the ingest finished before the kill"
    run_ok(assay_cmd(*args))
    clean = easy_vqa_out[0]
    for split in ("train", "test"):
        assert_same_dataset(clean / split, killed / split)
        names = sorted(p.name for p in (clean / "images" / split).iterdir())
        assert names == sorted(p.name for p in (killed / "images" / split).iterdir())
        assert all(
            (clean / "images" / split / n).read_bytes() == (killed / "images" / split / n).read_bytes()
            for n in names
        )


def test_easy_vqa_rerun_finds_it_complete(easy_vqa_out):
    from assay.curation.examples import ingest_easy_vqa

    out, train, test = easy_vqa_out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert ingest_easy_vqa(out) == (train, test)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------- bad rows


def test_bad_rows_are_quarantined_with_reason_and_location(tmp_path, make_png):
    (tmp_path / "ok.png").write_bytes(make_png())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(make_png())
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes(make_png())
    os.symlink(tmp_path / "outside" / "secret.png", data / "link.png")
    lines = [
        {"query_text": "good one", "doc_image": "ok.png"},  # 1
        b"{not json",  # 2 invalid_json
        b'{"query_text": "caf\xe9", "doc_text": "x"}',  # 3 invalid_utf8
        {"query_text": 12, "doc_text": "x"},  # 4 wrong_type: number
        {"query_text": {"a": 1}, "doc_text": "x"},  # 5 wrong_type: object
        {"query_text": "no doc"},  # 6 missing_content
        b"[1, 2]",  # 7 wrong_type: not an object
        b"",  # 8 blank: skipped
        {"query_text": "escape", "doc_image": "../outside/secret.png"},  # 9 outside the root
        {"query_text": "symlink", "doc_image": "link.png"},  # 10 outside, via a symlink
        {"query_text": "gone", "doc_image": "missing.png"},  # 11 no file
        {"query_text": "bad score", "doc_text": "x", "score": "high"},  # 12 wrong_type
        {"query_text": "good two", "doc_text": "y", "score": 1},  # 13
    ]
    src = write_jsonl(data / "in.jsonl", lines)
    # many tiny byte ranges; score is read only when mapped
    m = ingest(src, tmp_path / "out", embed_images=True, chunk_bytes=64, mapping={"score": "score"})
    ds = Dataset(tmp_path / "out")
    assert [q["text"] for q in rows(ds, "queries")] == ["good one", "good two"]
    assert rows(ds, "corpus")[0]["image"] == {"bytes": (data / "ok.png").read_bytes(), "path": "ok.png"}
    got = {r["source"]: r for r in quarantine(tmp_path / "out")}
    expect = {
        2: "invalid_json",
        3: "invalid_utf8",
        4: "wrong_type",
        5: "wrong_type",
        6: "missing_content",
        7: "wrong_type",
        9: "image_path_outside_root",
        10: "image_path_outside_root",
        11: "image_not_found",
        12: "wrong_type",
    }
    assert {s: r["reason"] for s, r in got.items()} == {f"in.jsonl:{n}": r for n, r in expect.items()}
    assert got["in.jsonl:3"]["record_format"] == "raw" and got["in.jsonl:3"]["record"] == lines[2]
    assert "query_text is a number" in got["in.jsonl:4"]["detail"]
    assert "query_text is an object" in got["in.jsonl:5"]["detail"]
    assert decode_record(got["in.jsonl:6"]["record"]) == {"query_text": "no doc"}
    assert {r["stage"] for r in got.values()} == {"ingest"}
    assert m.quarantine_reasons["ingest:wrong_type"] == 4 and m.counts["quarantine"] == 10


def test_bad_csv_rows(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(
        b"query_text,doc_text,score\n"
        b"good,doc,0.5\n"
        b"short\n"
        b"too,many,1,2\n"
        b'"multi\nline",doc,\n'
        b"caf\xe9,doc,\n"
        b"x,y,notanumber\n"
    )
    ingest(src, tmp_path / "out", mapping={"score": "score"})
    ds = Dataset(tmp_path / "out")
    assert [q["text"] for q in rows(ds, "queries")] == ["good", "multi\nline"]
    got = {r["source"]: r["reason"] for r in quarantine(tmp_path / "out")}
    assert got == {
        "in.csv:3": "missing_field",
        "in.csv:4": "invalid_csv",
        "in.csv:7": "invalid_utf8",
        "in.csv:8": "wrong_type",
    }


# ------------------------------------------------------------------------- relevance labels, scores


def test_columns_named_label_and_score_are_content_not_the_pairs_label_and_score(tmp_path, make_png):
    """The HF convention: `label` holds class names. Unmapped, it is never the relevance label (nor
    a `score` of ratings the pair's score), so validate keeps every row (issue 15)."""
    (tmp_path / "a.png").write_bytes(make_png((255, 0, 0)))
    (tmp_path / "b.png").write_bytes(make_png((0, 0, 255), shape="box"))
    items = [
        {"image": "a.png", "label": "eight", "score": "five stars"},
        {"image": "b.png", "label": "three", "score": 4.5},
    ]
    src = write_jsonl(tmp_path / "digits.jsonl", items)
    m = ingest(src, tmp_path / "out", mapping={"query_image": "image", "doc_text": "label"})
    ds = Dataset(tmp_path / "out")
    assert m.counts == {"queries": 2, "corpus": 2, "pairs": 2, "quarantine": 0}
    assert [c["text"] for c in rows(ds, "corpus")] == ["eight", "three"]
    assert [(p["label"], p["score"]) for p in rows(ds, "pairs")] == [("positive", None)] * 2
    from assay.curation.validate import validate

    assert validate(ds, tmp_path / "valid").counts == m.counts


def test_an_unread_label_column_that_denies_a_pair_refuses_the_row(tmp_path):
    """A column named label that nobody mapped is not read, but where it says `negative` the row is
    refused (not turned into a positive pair the input denies); class names and `positive` pass."""
    items = [
        {"q": "a", "d": "x", "label": "positive"},  # 1
        {"q": "b", "d": "y", "label": "negative"},  # 2 refused
        {"q": "c", "d": "z", "label": "cat"},  # 3 a class name: content nobody asked for, ignored
        {"q": "d", "d": "w", "label": "hard_negative"},  # 4 refused
    ]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    m = ingest(src, tmp_path / "out", mapping={"query_text": "q", "doc_text": "d"})
    assert m.counts["pairs"] == 2 and m.counts["quarantine"] == 2
    assert [p["label"] for p in rows(Dataset(tmp_path / "out"), "pairs")] == ["positive", "positive"]
    got = {r["source"]: r for r in quarantine(tmp_path / "out")}
    assert set(got) == {"in.jsonl:2", "in.jsonl:4"}
    assert {r["reason"] for r in got.values()} == {"unmapped_label"}
    assert "--map label=label" in got["in.jsonl:2"]["detail"]
    # mapped, the same file reads as labelled pairs
    m = ingest(src, tmp_path / "mapped", mapping={"query_text": "q", "doc_text": "d", "label": "label"})
    assert m.counts["quarantine"] == 1  # only "cat", now invalid_label
    labels = sorted(p["label"] for p in rows(Dataset(tmp_path / "mapped"), "pairs"))
    assert labels == ["hard_negative", "negative", "positive"]


def test_a_mapped_label_column_must_hold_relevance_labels(tmp_path):
    items = [
        {"q": "a", "d": "x", "rel": "positive"},  # 1
        {"q": "b", "d": "x", "rel": "hard_negative"},  # 2
        {"q": "c", "d": "x", "rel": ""},  # 3 empty: a positive pair
        {"q": "d", "d": "x", "rel": "cat"},  # 4 a class name: refused here, not at validate
        {"q": "e", "d": "x", "rel": 1},  # 5 a number
        {"q": "f", "d": "x", "rel": "Positive"},  # 6 labels are exact
    ]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    res = run_cli(
        str(src), str(tmp_path / "out"), "--map", "query_text=q", "--map", "doc_text=d", "--map", "label=rel"
    )
    assert res.exit_code == 0, res.output
    assert "invalid_label" in res.output
    ds = Dataset(tmp_path / "out")
    assert [p["label"] for p in rows(ds, "pairs")] == ["positive", "hard_negative", "positive"]
    got = {r["source"]: r for r in quarantine(tmp_path / "out")}
    assert set(got) == {"in.jsonl:4", "in.jsonl:5", "in.jsonl:6"}
    assert {r["reason"] for r in got.values()} == {"invalid_label"}
    detail = got["in.jsonl:4"]["detail"]
    assert "label (column 'rel') is 'cat'" in detail and "--map label=" in detail and "doc_text" in detail
    assert "is 1," in got["in.jsonl:5"]["detail"]
    assert decode_record(got["in.jsonl:4"]["record"]) == items[3]


def test_a_mapped_score_column_must_hold_numbers(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["q", "d", "rating"], [["a", "x", "0.25"], ["b", "x", "high"]])
    ingest(src, tmp_path / "out", mapping={"query_text": "q", "doc_text": "d", "score": "rating"})
    assert [p["score"] for p in rows(Dataset(tmp_path / "out"), "pairs")] == [0.25]
    (bad,) = quarantine(tmp_path / "out")
    assert (bad["reason"], bad["source"]) == ("wrong_type", "in.csv:3")
    assert "score (column 'rating') is 'high'" in bad["detail"]


# ------------------------------------------------------------------------------------- id merging


def test_content_hash_ids_merge_identical_docs_and_repeats(tmp_path):
    items = [
        {"q": "first", "d": "shared doc"},
        {"q": "second", "d": "shared doc"},
        {"q": "third", "d": "shared doc"},
        {"q": "first", "d": "shared doc"},  # an exact repeat of row 1: written once
        {"q": "first", "d": "shared doc", "l": "hard_negative"},  # same ids, another label: kept
    ]
    ingest(
        write_jsonl(tmp_path / "in.jsonl", items),
        tmp_path / "out",
        mapping={"query_text": "q", "doc_text": "d", "label": "l"},
        chunk_bytes=40,
    )
    ds = Dataset(tmp_path / "out")
    assert len(rows(ds, "corpus")) == 1
    assert [q["text"] for q in rows(ds, "queries")] == ["first", "second", "third"]
    pairs = rows(ds, "pairs")
    assert [p["label"] for p in pairs] == ["positive"] * 3 + ["hard_negative"]
    assert ds.manifest.extra["exact_repeats_dropped"] == {"queries": 2, "corpus": 4, "pairs": 1}


def test_user_ids_with_different_content_are_refused_with_their_pair(tmp_path):
    # issue 15: the second q1 row would hand its pair to the first row's content; it goes, whole
    items = [
        {"query_id": "q1", "query_text": "a", "doc_id": "d1", "doc_text": "x"},
        {"query_id": "q1", "query_text": "b", "doc_id": "d1", "doc_text": "x"},  # q1 reused, other text
        {"query_id": 7, "query_text": "c", "doc_id": "d1", "doc_text": "x"},  # an integer id
    ]
    ingest(write_jsonl(tmp_path / "in.jsonl", items), tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert [(q["query_id"], q["text"]) for q in rows(ds, "queries")] == [("q1", "a"), ("7", "c")]
    assert [c["doc_id"] for c in rows(ds, "corpus")] == ["d1"]
    assert [(p["query_id"], p["doc_id"]) for p in rows(ds, "pairs")] == [("q1", "d1"), ("7", "d1")]
    [refused] = quarantine(tmp_path / "out")
    assert (refused["reason"], refused["source"]) == ("conflicting_id", "in.jsonl:2")
    assert "in.jsonl:1" in refused["detail"]


# ---------------------------------------------------------------------------------- documents only


def test_documents_only_writes_a_corpus_whose_ids_match_the_same_docs_in_pairs(tmp_path, make_png):
    (tmp_path / "cat.png").write_bytes(make_png((200, 10, 10)))
    pairs = [
        {"question": "what animal?", "answer": "a cat", "img": None},
        {"question": "show me a cat", "answer": None, "img": "cat.png"},
    ]
    ingest(
        write_jsonl(tmp_path / "pairs.jsonl", pairs),
        tmp_path / "pairs",
        mapping={"query_text": "question", "doc_text": "answer", "doc_image": "img"},
        subset="animals",
    )
    docs = [
        {"passage": "a cat", "picture": None},  # 1: the same doc as pair 1
        {"passage": None, "picture": "cat.png"},  # 2: the same doc as pair 2
        {"passage": "a dog", "picture": None, "doc_id": "dog-1"},  # 3: the user's own id
        {"passage": None, "picture": None, "label": "x"},  # 4: no content
        {"passage": "a cat", "picture": None},  # 5: an exact repeat of 1, stored once
    ]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    res = run_cli(
        str(src),
        str(tmp_path / "pool"),
        "--documents",
        "--map",
        "doc_text=passage",
        "--map",
        "doc_image=picture",
        "--subset",
        "animals",
    )
    assert res.exit_code == 0, res.output
    assert "ingest: queries=0 corpus=3 pairs=0 quarantine=1" in res.output
    pool = Dataset(tmp_path / "pool")
    assert pool.manifest.config["documents_only"] is True
    corpus = rows(pool, "corpus")
    pair_docs = rows(Dataset(tmp_path / "pairs"), "corpus")
    assert [c["doc_id"] for c in corpus[:2]] == [d["doc_id"] for d in pair_docs]  # one id either way
    assert corpus[2]["doc_id"] == "dog-1" and {c["subset"] for c in corpus} == {"animals"}
    (bad,) = quarantine(tmp_path / "pool")
    assert (bad["reason"], bad["source"]) == ("missing_content", "docs.jsonl:4")
    assert "doc_text (column 'passage')" in bad["detail"]
    assert rows(pool, "queries") == [] and rows(pool, "pairs") == []

    # a normal dataset: validate and dedup read it and keep every document
    from assay.curation.dedup import dedup
    from assay.curation.validate import validate

    valid = validate(pool, tmp_path / "valid")
    assert valid.counts == {"queries": 0, "corpus": 3, "pairs": 0, "quarantine": 1}
    clean = dedup(Dataset(tmp_path / "valid"), tmp_path / "clean")
    assert clean.counts == valid.counts
    assert [c["doc_id"] for c in rows(Dataset(tmp_path / "clean"), "corpus")] == [c["doc_id"] for c in corpus]


def test_documents_only_from_an_image_folder_matches_the_captions_ids(tmp_path, make_png):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.png").write_bytes(make_png((40 * i, 0, 0), size=(8 + i, 8)))
    captions = write_csv(
        tmp_path / "captions.csv", ["file", "caption"], [["0.png", "zero"], ["2.png", "two"]]
    )
    ingest(flat, tmp_path / "captioned", captions=captions)
    m = ingest(flat, tmp_path / "pool", format="imagefolder", documents_only=True)
    assert m.counts == {"queries": 0, "corpus": 3, "pairs": 0, "quarantine": 0}
    pool = {c["image"]["path"]: c["doc_id"] for c in rows(Dataset(tmp_path / "pool"), "corpus")}
    captioned = {c["image"]["path"]: c["doc_id"] for c in rows(Dataset(tmp_path / "captioned"), "corpus")}
    assert set(pool) == {"0.png", "1.png", "2.png"}
    assert captioned == {p: pool[p] for p in ("0.png", "2.png")}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--map", "query_text=passage"], "the mapping's query_text do not apply"),
        (["--map", "label=passage"], "the mapping's label do not apply"),
        (["--task", "vqa"], "--task does not apply to --documents"),
    ],
)
def test_documents_only_refuses_what_belongs_to_queries_or_pairs(tmp_path, extra, message):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"passage": "a cat"}])
    res = run_cli(str(src), str(tmp_path / "o"), "--documents", *extra)
    assert res.exit_code != 0 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------- kill/resume


class Killed(Exception):
    pass


class DyingExecutor:
    """Runs tasks in process and dies (like a SIGKILL) before task number ``after``; it leaves a
    half-written temporary file behind, as a killed writer would."""

    name = "dying"

    def __init__(self, after: int, out: Path):
        self.left = after
        self.out = out

    def map(self, fn, tasks, desc):
        results = []
        for task in tasks:
            if self.left == 0:
                (self.out / "_progress" / ".tmp-part-00000.parquet.999").write_bytes(b"PAR1 half")
                raise Killed(desc)
            self.left -= 1
            results.append(fn(task))
        return results


def resumable_input(tmp_path: Path, make_png) -> Path:
    (tmp_path / "img.png").write_bytes(make_png())
    items = []
    for i in range(60):
        items.append({"q": f"question {i % 25}", "d": f"answer {i % 7}", "img": "img.png" if i % 3 else None})
        if i % 11 == 0:
            items.append(b"{broken")
    return write_jsonl(tmp_path / "in.jsonl", items)


@pytest.mark.parametrize("after", [0, 3, 8, 9, 14, 20])  # 8 read tasks, then 13 writes
def test_killed_ingest_resumes_to_the_same_files(tmp_path, make_png, after):
    src = resumable_input(tmp_path, make_png)
    kw = {
        "mapping": {"query_text": "q", "doc_text": "d", "query_image": "img"},
        "rows_per_shard": 10,
        "chunk_bytes": 400,
        "embed_images": True,
    }
    clean = tmp_path / "clean"
    ingest(src, clean, **kw)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        ingest(src, out, executor=DyingExecutor(after, out), **kw)
    with pytest.raises(DatasetError, match="unfinished"):
        Dataset(out)
    ingest(src, out, **kw)
    files = sorted(p.relative_to(clean) for p in clean.rglob("*.parquet"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert len([f for f in files if f.parts[0] == "pairs"]) > 1 and len(files) > 5
    for rel in files:
        assert (clean / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert not list(out.rglob(".tmp-*")) and not (out / "_progress").exists()
    assert Dataset(out).manifest.counts == Dataset(clean).manifest.counts


def test_jsonl_byte_ranges_do_not_change_the_result(tmp_path, make_png):
    src = resumable_input(tmp_path, make_png)
    mapping = {"query_text": "q", "doc_text": "d", "query_image": "img"}
    ingest(src, tmp_path / "one", mapping=mapping)
    ingest(src, tmp_path / "many", mapping=mapping, chunk_bytes=100)
    for table in ("queries", "corpus", "pairs"):
        assert rows(Dataset(tmp_path / "one"), table) == rows(Dataset(tmp_path / "many"), table)
    sources = [r["source"] for r in quarantine(tmp_path / "many")]
    assert sources == [r["source"] for r in quarantine(tmp_path / "one")]
    assert sources[:2] == ["in.jsonl:2", "in.jsonl:14"]


def test_rerun_of_a_finished_ingest(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"query_text": "a", "doc_text": "b"}])
    first = ingest(src, tmp_path / "out")
    assert ingest(src, tmp_path / "out") == first  # same inputs and settings: nothing to do
    with pytest.raises(DatasetError, match="overwrite"):
        ingest(src, tmp_path / "out", subset="other")
    again = ingest(src, tmp_path / "out", subset="other", overwrite=True, executor=LocalExecutor())
    assert again.counts["queries"] == 1


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: [str(d / "in.jsonl"), str(d / "o"), "--format", "xml"], "'xml' is not one of"),
        (lambda d: [str(d / "nope.jsonl"), str(d / "o")], "nope.jsonl: no such file"),
        (lambda d: [str(d / "in.txt"), str(d / "o")], "cannot tell the format"),
        (
            lambda d: [str(d / "in.csv"), str(d / "o"), "--map", "query_text=question"],
            "in.csv has no column 'question'",
        ),
        (
            lambda d: [str(d / "in.jsonl"), str(d / "o"), "--map", "query_text=question"],
            "has the key 'question'",
        ),
        (
            lambda d: [str(d / "in.jsonl"), str(d / "o"), "--map", "query_txt=text"],
            "unknown target 'query_txt'",
        ),
        (lambda d: [str(d / "in.jsonl"), str(d / "o"), "--map", "query_text"], "expected TARGET=COLUMN"),
        (
            lambda d: [str(d / "in.jsonl"), str(d / "o"), "--mapping", str(d / "bad-key.yaml")],
            "bad-key.yaml: unknown target 'question'",
        ),
        (
            lambda d: [str(d / "in.jsonl"), str(d / "o"), "--mapping", str(d / "list.yaml")],
            "list.yaml: expected a mapping",
        ),
        (lambda d: [str(d / "in.jsonl"), str(d / "o"), "--labels", str(d / "in.csv")], "image folders"),
        (lambda d: ["nope-example", str(d / "o"), "--format", "example"], "unknown example 'nope-example'"),
        (lambda d: ["easy-vqa", str(d / "o"), "--format", "example", "--subset", "x"], "--subset"),
    ],
)
def test_bad_cli_arguments_exit_non_zero_with_a_clear_message(tmp_path, make_args, message):
    write_jsonl(tmp_path / "in.jsonl", [{"query_text": "a", "doc_text": "b"}])
    write_csv(tmp_path / "in.csv", ["query_text", "doc_text"], [["a", "b"]])
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "bad-key.yaml").write_text("question: query_text\n")
    (tmp_path / "list.yaml").write_text("- query_text\n")
    res = run_cli(*make_args(tmp_path))
    assert res.exit_code != 0
    assert message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o").exists()


def test_cli_help_teaches():
    res = CliRunner().invoke(command, ["--help"])
    assert res.exit_code == 0
    for word in ("--map", "query_text=question", "imagefolder", "easy-vqa", "quarantine", "resumes"):
        assert word in res.output


@pytest.mark.ray
def test_cli_through_ray(tmp_path, ray_local):
    src = write_jsonl(tmp_path / "in.jsonl", [*PAIRS, b"oops"])
    res = CliRunner().invoke(
        command,
        [
            str(src),
            str(tmp_path / "out"),
            "--map",
            "query_text=question",
            "--map",
            "query_image=img",
            "--map",
            "doc_text=answer",
            "--map",
            "score=grade",
            "--subset",
            "vqa-set",
            "--task",
            "vqa",
            "--executor",
            "ray",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "quarantine=1" in res.output and "invalid_json" in res.output
    ds = Dataset(tmp_path / "out")
    assert ds.manifest.counts == {"queries": 3, "corpus": 1, "pairs": 3, "quarantine": 1}
