"""validate: every reason on its own, a fuzz mix of 200+ bad rows of 18 kinds, and the Ray path."""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers.badrows import (
    huge_png_header,
    make_fuzz_rows,
    marker_of,
    png,
    queries_table,
    stated_pairs,
    truncated_png,
)

from assay.curation.dataset import Dataset, DatasetError, write_dataset
from assay.curation.quarantine import decode_record
from assay.curation.validate import ValidateConfig, check_image, validate


def quarantine_rows(root) -> list[dict]:
    rows = []
    qdir = os.path.join(root, "quarantine")
    for name in sorted(os.listdir(qdir)) if os.path.isdir(qdir) else []:
        for r in pq.read_table(os.path.join(qdir, name)).to_pylist():
            r["row"] = decode_record(r["record"])
            rows.append(r)
    return rows


def table_rows(ds: Dataset, table: str) -> list[dict]:
    return [r for b in ds.iter_batches(table) for r in b.to_pylist()]


CFG = ValidateConfig()


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ({"bytes": png(), "path": None}, None),
        ({"bytes": b"hello, I am text", "path": None}, "unreadable_image"),
        ({"bytes": truncated_png(), "path": None}, "truncated_image"),
        ({"bytes": huge_png_header(), "path": None}, "image_too_large"),
        ({"bytes": None, "path": "../x.png"}, "image_path_outside_root"),
        ({"bytes": None, "path": "/etc/hostname"}, "image_path_outside_root"),
        ({"bytes": None, "path": "nothing-here.png"}, "image_not_found"),
    ],
)
def test_check_image_reasons(tmp_path, image, reason):
    got = check_image(image, str(tmp_path), CFG)
    assert (got[0] if got else None) == reason


def test_image_limits_are_settings(tmp_path):
    big = {"bytes": png(size=(100, 100)), "path": None}
    assert check_image(big, str(tmp_path), ValidateConfig(max_pixels=100 * 100)) is None
    assert check_image(big, str(tmp_path), ValidateConfig(max_pixels=100 * 100 - 1))[0] == "image_too_large"
    assert check_image(big, str(tmp_path), ValidateConfig(max_image_bytes=10))[0] == "image_too_large"


def test_symlink_out_of_the_data_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "a.png").write_bytes(png())
    os.symlink(outside / "a.png", root / "link.png")
    os.symlink(outside, root / "dirlink")
    for path in ("link.png", "dirlink/a.png"):
        assert check_image({"bytes": None, "path": path}, str(root), CFG)[0] == "image_path_outside_root"
    (root / "inside.png").write_bytes(png())
    os.symlink(root / "inside.png", root / "ok-link.png")
    assert check_image({"bytes": None, "path": "ok-link.png"}, str(root), CFG) is None


def test_wrong_column_type_quarantines_the_shard_with_a_clear_detail(tmp_path):
    good = write_dataset(tmp_path / "ds", {"queries": [{"query_id": "q1", "text": "fine"}]})
    # a second shard whose text column holds integers
    pq.write_table(
        pa.table({"query_id": ["q2", "q3"], "text": [1, 2]}), good.root / "queries" / "part-00001.parquet"
    )
    manifest = json.loads((good.root / "manifest.json").read_text())  # a reader reads what it lists
    manifest["files"]["queries"].append("part-00001.parquet")
    (good.root / "manifest.json").write_text(json.dumps(manifest))
    m = validate(Dataset(good.root), tmp_path / "out")
    assert m.counts["queries"] == 1
    q = quarantine_rows(tmp_path / "out")
    assert {r["id"] for r in q} == {"q2", "q3"}
    assert {r["reason"] for r in q} == {"wrong_type"}
    assert "column text has type int64, expected string" in q[0]["detail"]


def test_pairs_refer_to_refused_rows_are_refused_too(tmp_path):
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [{"query_id": "q1", "text": "  "}, {"query_id": "q2", "text": "ok"}],
            "corpus": [{"doc_id": "d1", "text": "doc"}],
            "pairs": [
                {"query_id": "q1", "doc_id": "d1", "label": "positive"},
                {"query_id": "q2", "doc_id": "d1", "label": "positive"},
                {"query_id": "q2", "doc_id": "d9", "label": "negative"},
            ],
        },
    )
    validate(ds, tmp_path / "out")
    out = Dataset(tmp_path / "out")
    assert [(r["query_id"], r["doc_id"]) for r in table_rows(out, "pairs")] == [("q2", "d1")]
    reasons = Counter((r["table"], r["reason"]) for r in quarantine_rows(out.root))
    assert reasons == {
        ("queries", "empty_text"): 1,
        ("pairs", "unknown_query_id"): 1,
        ("pairs", "unknown_doc_id"): 1,
    }


def test_a_repeated_id_keeps_its_pairs_only_when_the_rows_say_the_same(tmp_path):
    """Issue 15: q5 names two queries of different content, each row with its own pair; keeping the
    first row would hand it the second's pair (a positive no row stated). Every row and pair of q5
    goes; q1, given twice with the same content, keeps its first row and both its pairs; d2, a
    document id given to two contents, takes its rows and pairs too."""
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [
                {"query_id": "q1", "text": "a red square"},
                {"query_id": "q5", "text": "a orange square number 5"},
                {"query_id": "q1", "text": "a red square"},
                {"query_id": "q5", "text": "a red square"},
                {"query_id": "q7", "text": "a green circle"},
            ],
            "corpus": [
                {"doc_id": "d0", "text": "red.png"},
                {"doc_id": "d1", "text": "orange.png"},
                {"doc_id": "d2", "text": "green.png"},
                {"doc_id": "d2", "text": "blue.png"},
            ],
            "pairs": [
                {"query_id": "q5", "doc_id": "d1", "label": "positive"},
                {"query_id": "q5", "doc_id": "d0", "label": "positive"},
                {"query_id": "q1", "doc_id": "d0", "label": "positive"},
                {"query_id": "q1", "doc_id": "d0", "label": "positive"},
                {"query_id": "q7", "doc_id": "d2", "label": "positive"},
            ],
        },
        rows_per_shard=2,
    )
    m = validate(ds, tmp_path / "out")
    out = Dataset(tmp_path / "out")
    assert [r["query_id"] for r in table_rows(out, "queries")] == ["q1", "q7"]
    assert [r["doc_id"] for r in table_rows(out, "corpus")] == ["d0", "d1"]
    assert [(r["query_id"], r["doc_id"]) for r in table_rows(out, "pairs")] == [("q1", "d0"), ("q1", "d0")]
    got = Counter((r["table"], r["id"], r["reason"]) for r in quarantine_rows(out.root))
    assert got == {
        ("queries", "q1", "duplicate_id"): 1,
        ("queries", "q5", "conflicting_id"): 2,
        ("corpus", "d2", "conflicting_id"): 2,
        ("pairs", "q5->d1", "conflicting_id"): 1,
        ("pairs", "q5->d0", "conflicting_id"): 1,
        ("pairs", "q7->d2", "conflicting_id"): 1,
    }
    detail = next(
        r["detail"] for r in quarantine_rows(out.root) if r["id"] == "q5" and r["table"] == "queries"
    )
    assert "2 rows of different content" in detail and "part-00000.parquet row 1" in detail
    assert "part-00001.parquet row 1" in detail
    assert m.quarantine_reasons == {"validate:duplicate_id": 1, "validate:conflicting_id": 7}


def test_fuzz_every_bad_row_quarantined_with_its_reason_and_every_good_row_kept(tmp_path):
    cfg = ValidateConfig(max_text_chars=2_000)
    queries, corpus, pairs, expected, statements = make_fuzz_rows(
        tmp_path / "root",
        tmp_path / "outside",
        n_good=300,
        n_bad=260,
        seed=7,
        max_text_chars=cfg.max_text_chars,
        with_statements=True,
    )
    kinds = Counter(reason for _, reason in expected.values())
    assert len(expected) >= 200 and len(kinds) >= 10
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=97,
        data_root=str(tmp_path / "root"),
    )
    m = validate(ds, tmp_path / "out", cfg)

    got = {}
    for r in quarantine_rows(tmp_path / "out"):
        mark = marker_of(r["table"], r["row"])
        assert mark not in got, f"{mark} quarantined twice"
        got[mark] = (r["table"], r["reason"])
        assert r["stage"] == "validate" and "#row=" in r["source"]
    assert got == expected

    out = Dataset(tmp_path / "out")
    kept_q = {r["query_id"] for r in table_rows(out, "queries")}
    repeated = {k for k, (_, reason) in expected.items() if reason == "duplicate_id"}
    assert kept_q == {f"q-good-{i}" for i in range(300)} | repeated  # the first of a repeat is kept
    kept_pairs = table_rows(out, "pairs")
    # the good rows' pairs, and both pairs of a repeated row (the same statement twice)
    assert len(kept_pairs) == 300 + 2 * len(repeated) and all(p["label"] == "positive" for p in kept_pairs)
    assert m.counts["quarantine"] == len(expected)
    # Nothing is added that the input did not say: every kept pair, read through the kept rows its
    # ids name, is a (query, document) that some input row stated (issue 15: an id given to two
    # contents takes both rows and both pairs with it).
    kept = stated_pairs(table_rows(out, "queries"), table_rows(out, "corpus"), kept_pairs)
    assert kept <= statements, kept - statements
    assert Counter(r for _, r in expected.values())["conflicting_id"] >= 4
    # The whole row is in the quarantine: an inline image comes back byte for byte.
    trunc = [r for r in quarantine_rows(tmp_path / "out") if r["reason"] == "truncated_image"]
    assert trunc and trunc[0]["row"]["image"]["bytes"] == truncated_png()


def test_rerun_of_a_finished_run_is_a_no_op_and_other_settings_are_refused(tmp_path):
    ds = write_dataset(tmp_path / "ds", {"queries": [{"query_id": "q1", "text": "fine"}]})
    first = validate(ds, tmp_path / "out")
    again = validate(ds, tmp_path / "out")
    assert again.created == first.created  # nothing was redone
    with pytest.raises(DatasetError, match="other inputs or settings"):
        validate(ds, tmp_path / "out", ValidateConfig(max_text_chars=5))
    assert (
        validate(ds, tmp_path / "out", ValidateConfig(max_text_chars=5), overwrite=True).config[
            "max_text_chars"
        ]
        == 5
    )


def test_cli_prints_counts_per_reason(tmp_path):
    from assay.pipelines.cli import cli

    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [
                {"query_id": "q1", "text": "fine"},
                {"query_id": "q2", "text": ""},
                {"query_id": "q3", "text": None},
            ]
        },
    )
    res = CliRunner().invoke(cli, ["validate", str(ds.root), str(tmp_path / "out"), "--executor", "local"])
    assert res.exit_code == 0, res.output
    assert "empty_text" in res.output and "missing_content" in res.output
    assert "queries=1" in res.output


def test_cli_bad_arguments_exit_non_zero(tmp_path):
    from assay.pipelines.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(tmp_path), str(tmp_path / "out"), "--executor", "local"])
    assert res.exit_code != 0 and "not an assay dataset" in res.output
    res = runner.invoke(cli, ["validate", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "does not exist" in res.output
    ds = write_dataset(tmp_path / "ds", {"queries": [{"query_id": "q1", "text": "fine"}]})
    res = runner.invoke(cli, ["validate", str(ds.root), str(tmp_path / "o2"), "--max-pixels", "0"])
    assert res.exit_code == 2


@pytest.mark.ray
def test_ray_executor_gives_the_same_output_as_local(tmp_path, ray_local):
    from assay.pipelines.executors import RayExecutor

    queries, corpus, pairs, _ = make_fuzz_rows(
        tmp_path / "root", tmp_path / "outside", n_good=60, n_bad=40, seed=3, max_text_chars=1000
    )
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=20,
        data_root=str(tmp_path / "root"),
    )
    cfg = ValidateConfig(max_text_chars=1000)
    validate(ds, tmp_path / "local", cfg)
    validate(ds, tmp_path / "ray", cfg, executor=RayExecutor())
    for sub in ("queries", "corpus", "pairs", "quarantine"):
        a = sorted(os.listdir(tmp_path / "local" / sub))
        assert a == sorted(os.listdir(tmp_path / "ray" / sub))
        for name in a:
            assert pq.read_table(tmp_path / "local" / sub / name).equals(
                pq.read_table(tmp_path / "ray" / sub / name)
            )
