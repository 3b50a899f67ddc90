"""SIGKILL `assay dedup` mid-run, rerun it, and find the output identical to a clean run."""

from __future__ import annotations

import pytest
from helpers.dedup_data import dedup_inputs
from helpers.kill import assay_cmd, assert_same_dataset, run_and_kill, run_ok

from assay.curation.dataset import Dataset


@pytest.mark.parametrize(
    ("kill_at", "count"),
    [
        ("_progress/scan/corpus/part-*.parquet", 2),
        ("_progress/eval-scan/*/queries/part-*.parquet", 1),
        ("_progress/done/corpus/*.json", 2),
    ],
)
def test_dedup_killed_mid_run_resumes_to_the_same_output(tmp_path, kill_at, count):
    src, ev = dedup_inputs(tmp_path, 320, size=96, distinct_docs=200)
    args = ["dedup", str(src.root), None, "--against", str(ev.root), "--executor", "local"]

    def cmd(out):
        return assay_cmd(*[a if a is not None else str(out) for a in args])

    run_ok(cmd(tmp_path / "clean"))
    killed = tmp_path / "killed"
    assert run_and_kill(cmd(killed), killed, kill_at, count=count), "dedup finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    out = run_ok(cmd(killed))
    assert "near_duplicate_image" in out and "contaminated" in out

    rows = assert_same_dataset(tmp_path / "clean", killed)
    clean, resumed = Dataset(tmp_path / "clean").manifest, Dataset(killed).manifest
    assert resumed.counts == clean.counts and resumed.quarantine_reasons == clean.quarantine_reasons
    # none lost, none duplicated: every input row is in the output or in the quarantine, once
    assert rows == sum(resumed.counts[t] for t in ("queries", "corpus", "pairs", "quarantine"))
    assert resumed.counts["quarantine"] > 0
    assert sum(resumed.counts[t] for t in ("queries", "corpus", "pairs", "quarantine")) == sum(
        src.num_rows(t) for t in ("queries", "corpus", "pairs")
    )
