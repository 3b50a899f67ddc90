"""The dataset format's reader and writer: streaming, atomic shards, resume, lineage, quarantine."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assay.curation.dataset import (
    MANIFEST,
    Dataset,
    DatasetError,
    DatasetWriter,
    atomic_write_parquet,
    write_dataset,
)
from assay.curation.quarantine import QuarantineBuilder, decode_record, encode_record
from assay.curation.schema import DATA_TABLES, IMAGE_TYPE, SCHEMAS
from assay.curation.validate import validate


def _queries(n):
    return [{"query_id": f"q{i}", "subset": "s", "task": "vqa", "text": f"text {i}"} for i in range(n)]


def test_tables_are_written_in_shards_and_read_back_streaming(tmp_path):
    ds = write_dataset(tmp_path / "ds", {"queries": _queries(25)}, rows_per_shard=10)
    assert ds.shards("queries") == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    batches = list(ds.iter_batches("queries", batch_size=4))
    assert max(b.num_rows for b in batches) <= 4  # never more than a batch in memory
    assert [r["query_id"] for b in batches for r in b.to_pylist()] == [f"q{i}" for i in range(25)]
    assert ds.num_rows("queries") == 25 == ds.manifest.counts["queries"]
    assert pq.read_schema(ds.shard_path("queries", "part-00000.parquet")).field("image").type == IMAGE_TYPE


def test_every_table_has_the_design_columns():
    assert SCHEMAS["queries"].names == ["query_id", "subset", "task", "instruction", "text", "image"]
    assert SCHEMAS["corpus"].names == ["doc_id", "subset", "instruction", "text", "image"]
    assert SCHEMAS["pairs"].names == [
        "query_id",
        "doc_id",
        "label",
        "score",
        "rank",
        "judge_p_yes",
        "judge_verdict",
        "origin",
    ]
    assert DATA_TABLES == ("queries", "corpus", "pairs")


def test_a_folder_without_manifest_is_refused_with_a_reason(tmp_path):
    with pytest.raises(DatasetError, match="not an assay dataset"):
        Dataset(tmp_path)
    writer = DatasetWriter(tmp_path / "run", stage="validate", config={})
    writer.sink.write_shard(
        "queries", "part-00000.parquet", pa.Table.from_pylist(_queries(2), SCHEMAS["queries"])
    )
    with pytest.raises(DatasetError, match="unfinished run"):
        Dataset(tmp_path / "run")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DatasetError, match="schema_version 99 is not supported"):
        Dataset(tmp_path / "bad")


def test_an_unfinished_run_resumes_only_with_the_same_settings(tmp_path):
    w = DatasetWriter(tmp_path / "out", stage="validate", config={"a": 1})
    w.sink.write_shard("queries", "part-00000.parquet", pa.Table.from_pylist(_queries(1), SCHEMAS["queries"]))
    again = DatasetWriter(tmp_path / "out", stage="validate", config={"a": 1})
    assert again.is_done("queries", "part-00000.parquet")
    with pytest.raises(DatasetError, match="unfinished 'validate' run"):
        DatasetWriter(tmp_path / "out", stage="validate", config={"a": 2})
    fresh = DatasetWriter(tmp_path / "out", stage="validate", config={"a": 2}, overwrite=True)
    assert not fresh.is_done("queries", "part-00000.parquet")


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    import assay.curation.dataset as dataset_module

    def write_half_then_fail(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset_module.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_parquet(tmp_path / "sub" / "p.parquet", pa.table({"x": [1]}))
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob(".tmp-*"))


def test_lineage_and_quarantine_are_carried_to_every_descendant(tmp_path):
    ds = write_dataset(
        tmp_path / "raw", {"queries": _queries(3) + [{"query_id": "q9", "text": " "}]}, stage="ingest"
    )
    validate(ds, tmp_path / "v1")
    validate(Dataset(tmp_path / "v1"), tmp_path / "v2")
    v2 = Dataset(tmp_path / "v2")
    assert [s["stage"] for s in v2.manifest.lineage] == ["ingest", "validate", "validate"]
    assert v2.manifest.parents[0]["path"] == str((tmp_path / "v1").resolve())
    assert v2.manifest.counts["quarantine"] == 1  # the blank row refused in v1 is still visible in v2
    assert v2.manifest.quarantine_reasons == {"validate:empty_text": 1}


def _quarantine_rows(ds: Dataset) -> int:
    return sum(pq.read_metadata(ds.root / "quarantine" / n).num_rows for n in ds.quarantine_files())


def test_the_manifest_counts_every_quarantined_row_whether_added_up_or_read(tmp_path):
    """A stage adds up its quarantine count from its markers and its parent's manifest (no file
    read); a quarantine table written by hand is counted from the files. Either way the count is
    the rows the quarantine files hold."""
    rows = _queries(6) + [{"query_id": "q9", "text": " "}, {"query_id": "q1", "text": "again"}]
    by_hand = QuarantineBuilder("queries", "ingest", "in.jsonl")
    by_hand.add({"query_id": "q7"}, "unreadable", "line 8", id="q7", location="in.jsonl#line=8")
    raw = write_dataset(tmp_path / "raw", {"queries": rows, "quarantine": by_hand.to_table()}, stage="ingest")
    validate(raw, tmp_path / "v1")
    v1 = Dataset(tmp_path / "v1")
    written = write_dataset(tmp_path / "dup", {"queries": [*_queries(3), *_queries(3)]}, stage="ingest")
    validate(written, tmp_path / "v2")
    v2 = Dataset(tmp_path / "v2")
    validate(v1, tmp_path / "v3")  # a child of a stage that refused rows, refusing none itself
    v3 = Dataset(tmp_path / "v3")
    assert raw.manifest.counts["quarantine"] == _quarantine_rows(raw) == 1  # read from the file
    assert v1.manifest.counts["quarantine"] == _quarantine_rows(v1) == 4  # + blank, and q1 twice
    assert v2.manifest.counts["quarantine"] == _quarantine_rows(v2) == 3  # each repeat of q0-q2
    assert v3.manifest.counts["quarantine"] == _quarantine_rows(v3) == 4


def test_quarantine_records_round_trip_bytes_and_odd_values():
    row = {
        "query_id": "q",
        "image": {"bytes": b"\x89PNG\x00\xff", "path": None},
        "score": float("nan"),
        "text": "caf\u00e9",
    }
    back = decode_record(encode_record(row))
    assert back["image"]["bytes"] == row["image"]["bytes"] and back["text"] == "café"
    assert back["score"] != back["score"]  # NaN survives
    qb = QuarantineBuilder("input", "ingest", "f.jsonl")
    qb.add_raw(b"\xff\xfe not utf-8", "invalid_utf8", location="f.jsonl:3")
    t = qb.to_table()
    assert (
        t.column("record")[0].as_py() == b"\xff\xfe not utf-8"
        and t.column("source")[0].as_py() == "f.jsonl:3"
    )
