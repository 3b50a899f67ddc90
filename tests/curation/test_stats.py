"""stats: the numbers on a small dataset, and the CLI's tables with the lineage."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from assay.curation.dataset import Dataset, write_dataset
from assay.curation.filter import filter_dataset
from assay.curation.stats import MISSING_QUERY, NULL_KEY, dataset_stats, format_stats
from assay.pipelines.commands.stats import command as stats_command


def qrow(table, reason, stage):
    return {
        "table": table,
        "id": None,
        "reason": reason,
        "detail": "",
        "stage": stage,
        "source": "x",
        "record_format": "raw",
        "record": b"{}",
    }


@pytest.fixture
def ds(tmp_path, make_png) -> Dataset:
    queries = [
        {
            "query_id": "q0",
            "subset": "vqa",
            "task": "vqa",
            "text": "a?",
            "image": {"bytes": make_png(), "path": None},
        },
        {
            "query_id": "q1",
            "subset": "vqa",
            "task": "vqa",
            "text": "b?",
            "image": {"bytes": None, "path": "b.png"},
        },
        {"query_id": "q2", "subset": "coco", "task": "retrieval", "text": "c", "image": None},
        {"query_id": "q3", "subset": None, "task": "retrieval", "text": "d", "image": None},
    ]
    corpus = [
        {"doc_id": "d0", "subset": "vqa", "text": "yes", "image": None},
        {
            "doc_id": "d1",
            "subset": "coco",
            "text": None,
            "image": {"bytes": make_png((0, 255, 0)), "path": "x.png"},
        },
        {"doc_id": "d2", "subset": "coco", "text": "no", "image": None},
    ]
    pairs = [
        {"query_id": "q0", "doc_id": "d0", "label": "positive", "judge_p_yes": 0.9, "judge_verdict": "yes"},
        {
            "query_id": "q0",
            "doc_id": "d2",
            "label": "hard_negative",
            "judge_p_yes": 0.1,
            "judge_verdict": "no",
        },
        {"query_id": "q1", "doc_id": "d0", "label": "positive"},
        {"query_id": "q2", "doc_id": "d1", "label": "positive"},
        {
            "query_id": "q2",
            "doc_id": "d2",
            "label": "false_negative",
            "judge_p_yes": 0.8,
            "judge_verdict": "yes",
        },
        {"query_id": "q9", "doc_id": "d2", "label": None},
    ]
    quarantine = [
        qrow("queries", "missing_id", "ingest"),
        qrow("queries", "missing_id", "ingest"),
        qrow("corpus", "unreadable_image", "validate"),
    ]
    return write_dataset(
        tmp_path / "ds",
        {"queries": queries, "corpus": corpus, "pairs": pairs, "quarantine": quarantine},
        rows_per_shard=2,
    )


def test_numbers(ds):
    s = dataset_stats(ds)
    assert s["rows"] == {"queries": 4, "corpus": 3, "pairs": 6, "quarantine": 3}
    assert s["queries"]["by_subset"] == {"vqa": 2, NULL_KEY: 1, "coco": 1}
    assert s["queries"]["by_task"] == {"retrieval": 2, "vqa": 2}
    assert s["queries"]["by_subset_task"]["vqa"] == {"vqa": 2}
    assert s["corpus"]["by_subset"] == {"coco": 2, "vqa": 1}
    assert s["pairs"]["by_label"] == {"positive": 3, NULL_KEY: 1, "false_negative": 1, "hard_negative": 1}
    assert s["pairs"]["by_subset"] == {"vqa": 3, "coco": 2, MISSING_QUERY: 1}
    assert s["pairs"]["by_subset_label"]["vqa"] == {"positive": 2, "hard_negative": 1}
    assert s["pairs"]["by_subset_label"]["coco"] == {"false_negative": 1, "positive": 1}
    assert s["pairs"]["judged"] == 3
    assert s["pairs"]["by_verdict"] == {NULL_KEY: 3, "yes": 2, "no": 1}
    assert s["quarantine"]["by_stage"] == {"ingest": {"missing_id": 2}, "validate": {"unreadable_image": 1}}
    assert s["quarantine"]["by_table"] == {"queries": 2, "corpus": 1}
    assert s["images"] == {
        "queries": {"inline": 1, "path": 1, "none": 2},
        "corpus": {"inline": 1, "path": 0, "none": 2},
    }
    assert [step["stage"] for step in s["lineage"]] == ["write"]
    json.dumps(s)  # JSON-able


def test_cli_prints_tables_and_lineage(ds, tmp_path):
    filter_dataset(ds, tmp_path / "f", "label != 'false_negative'")
    runner = CliRunner()
    res = runner.invoke(stats_command, [str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "queries per subset:" in out and "pairs per label:" in out
    assert "quarantine per stage and reason:" in out and "missing_id" in out
    assert "lineage (oldest first):" in out
    assert "1. write" in out
    assert "2. filter" in out
    assert "where=\"label != 'false_negative'\"" in out
    # pairs with a null label compare false and are dropped, as is the false_negative
    assert "queries=4 corpus=3 pairs=4 quarantine=3" in out
    res = runner.invoke(stats_command, [str(tmp_path / "f"), "--json"])
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert [s["stage"] for s in data["lineage"]] == ["write", "filter"]
    assert data["lineage"][1]["config"]["where"] == "label != 'false_negative'"
    assert data["pairs"]["by_label"] == {"positive": 3, "hard_negative": 1}


def test_format_stats_empty_dataset(tmp_path):
    empty = write_dataset(tmp_path / "e", {})
    text = format_stats(dataset_stats(empty))
    assert "queries per subset: none" in text and "quarantine: empty" in text


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(stats_command, [str(tmp_path / "nope")])
    assert res.exit_code != 0 and "not an assay dataset" in res.output
    res = CliRunner().invoke(stats_command, ["--help"])
    assert res.exit_code == 0 and "lineage" in res.output
