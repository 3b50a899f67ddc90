"""SIGKILL `assay validate` mid-run, rerun it, and find the output identical to a clean run."""

from __future__ import annotations

import pytest
from helpers.badrows import make_fuzz_rows, queries_table
from helpers.kill import assay_cmd, assert_same_dataset, run_and_kill, run_ok

from assay.curation.dataset import Dataset, write_dataset


def _dataset(tmp_path):
    queries, corpus, pairs, expected = make_fuzz_rows(
        tmp_path / "root", tmp_path / "outside", n_good=3000, n_bad=400, seed=11, max_text_chars=1000
    )
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=200,
        data_root=str(tmp_path / "root"),
    )
    return ds, len(expected)


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.ray)])
@pytest.mark.parametrize(
    "kill_at", ["_progress/scan/queries/part-*.parquet", "_progress/done/queries/*.json"]
)
def test_validate_killed_mid_run_resumes_to_the_same_output(tmp_path, executor, kill_at):
    ds, n_bad = _dataset(tmp_path)
    args = ["validate", str(ds.root), "--max-text-chars", "1000", "--executor", executor, "--num-cpus", "2"]
    run_ok(assay_cmd(*args[:2], str(tmp_path / "clean"), *args[2:]))

    killed = tmp_path / "killed"
    assert run_and_kill(assay_cmd(*args[:2], str(killed), *args[2:]), killed, kill_at, count=3), (
        "validate finished before it could be killed"
    )
    assert not (killed / "manifest.json").exists()
    run_ok(assay_cmd(*args[:2], str(killed), *args[2:]))

    rows = assert_same_dataset(tmp_path / "clean", killed)
    out = Dataset(killed)
    assert out.manifest.counts["quarantine"] == n_bad
    assert rows == sum(out.manifest.counts[t] for t in ("queries", "corpus", "pairs", "quarantine"))
