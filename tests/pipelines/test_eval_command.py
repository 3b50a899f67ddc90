"""`assay eval`: a tiny saved checkpoint scored on a small two-subset dataset, through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from assay.curation.dataset import write_dataset  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402
from assay.training.model import MMEmbedder  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255)}
TEXTS = [
    "Represent the given image with the following question.",
    "what colour is the square? red green blue",
    "Retrieve the passage that answers the question. cats dogs birds fly bark meow",
]


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, processor = build_tiny(TEXTS, tokens_per_tile=16, image_size=32)
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    MMEmbedder(model, processor).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    instr = "Represent the given image with the following question."
    queries, corpus, pairs = [], [], []
    for c in COLOURS:
        corpus.append({"doc_id": f"vqa-{c}", "subset": "colours", "text": c})
    for i, (c, rgb) in enumerate(COLOURS.items()):
        qid = f"vq{i}"
        queries.append(
            {
                "query_id": qid,
                "subset": "colours",
                "task": "vqa",
                "instruction": instr,
                "text": "what colour is the square?",
                "image": {"bytes": png(rgb), "path": None},
            }
        )
        pairs += [
            {"query_id": qid, "doc_id": f"vqa-{o}", "label": "positive" if o == c else "negative"}
            for o in COLOURS
        ]
    animals = {"cats": "cats meow", "dogs": "dogs bark", "birds": "birds fly"}
    for i, (a, passage) in enumerate(animals.items()):
        corpus.append({"doc_id": f"ret-{a}", "subset": "animals", "text": passage})
        queries.append(
            {
                "query_id": f"rq{i}",
                "subset": "animals",
                "task": "retrieval",
                "instruction": "Retrieve the passage that answers the question.",
                "text": f"what do {a} do?",
            }
        )
        pairs.append({"query_id": f"rq{i}", "doc_id": f"ret-{a}", "label": "positive"})
    root = tmp_path_factory.mktemp("eval") / "mini"
    write_dataset(root, {"queries": queries, "corpus": corpus, "pairs": pairs})
    return root


def test_eval_prints_table_and_writes_metrics(checkpoint, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        cli, ["eval", str(checkpoint), str(dataset), "--batch-size", "2", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    for name in ("colours", "animals", "P@1", "chance", "R@10", "overall"):
        assert name in res.output
    out = tmp_path / "mini.metrics.json"  # the default: <dataset name>.metrics.json in the cwd
    m = json.loads(out.read_text())
    assert set(m["per_subset"]) == {"colours", "animals"}
    for entry in m["per_subset"].values():
        assert 0.0 <= entry["p_at_1"] <= 1.0
        assert entry["queries"] == 3
    assert m["per_subset"]["colours"]["candidates_per_query"] == 3
    assert "recall@5" in m["per_subset"]["animals"] and "recall@5" not in m["per_subset"]["colours"]
    assert m["checkpoint"] == str(checkpoint.resolve())
    assert m["dataset"] == str(dataset.resolve())
    assert 0.0 <= m["overall"]["p_at_1"] <= 1.0


def test_eval_subset_and_out(checkpoint, dataset, tmp_path):
    out = tmp_path / "sub" / "m.json"
    res = CliRunner().invoke(
        cli,
        [
            "eval",
            str(checkpoint),
            str(dataset),
            "--subset",
            "animals",
            "--candidates",
            "subset",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert list(m["per_subset"]) == ["animals"] and m["settings"]["candidate_set"] == "subset"


def test_eval_with_a_truth_counts_every_matching_doc(checkpoint, dataset, tmp_path):
    from assay.curation.truth import write_truth

    # the truth: every passage answers every animal question (the labels name one each)
    docs = ["ret-cats", "ret-dogs", "ret-birds"]
    truth = write_truth(tmp_path / "truth.parquet", [(f"rq{i}", d) for i in range(3) for d in docs])
    out = tmp_path / "m.json"
    args = [
        "eval",
        str(checkpoint),
        str(dataset),
        "--subset",
        "animals",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(cli, [*args, "--truth", str(truth)])
    assert res.exit_code == 0, res.output
    assert "6 unlabelled matches counted as relevant" in res.output
    m = json.loads(out.read_text())
    animals = m["per_subset"]["animals"]
    assert animals["p_at_1"] == 1.0 and animals["positives_per_query"] == 3.0
    assert m["settings"]["truth"]["path"] == str(truth)
    res = CliRunner().invoke(cli, [*args, "--truth", str(tmp_path / "nope.parquet")])
    assert res.exit_code != 0 and "nope.parquet" in res.output


def test_eval_unknown_subset_is_refused(checkpoint, dataset, tmp_path):
    res = CliRunner().invoke(cli, ["eval", str(checkpoint), str(dataset), "--subset", "nope"])
    assert res.exit_code != 0 and "nope" in res.output and "animals" in res.output


def test_eval_missing_checkpoint(dataset, tmp_path):
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "no-such-ckpt"), str(dataset)])
    assert res.exit_code == 1
    assert "checkpoint not found" in res.output
    assert not (tmp_path / "mini.metrics.json").exists()


def test_eval_checkpoint_without_config(dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "empty"), str(dataset)])
    assert res.exit_code == 1 and "no config.json" in res.output


def test_eval_not_a_dataset(checkpoint, tmp_path):
    (tmp_path / "plain").mkdir()
    res = CliRunner().invoke(cli, ["eval", str(checkpoint), str(tmp_path / "plain")])
    assert res.exit_code == 1 and "not an assay dataset" in res.output
