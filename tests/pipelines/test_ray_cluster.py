"""`--ray-address`: a stage runs on an existing Ray cluster and gives the same output as in process."""

from __future__ import annotations

import subprocess

import pytest
from helpers.badrows import make_fuzz_rows, queries_table
from helpers.kill import assay_cmd, assert_same_dataset, run_ok
from helpers.ray_head import ray_head

from assay.curation.dataset import write_dataset

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_cluster():
    with ray_head() as cluster:
        yield cluster


def test_validate_on_an_existing_cluster_matches_local(tmp_path, ray_cluster):
    queries, corpus, pairs, _ = make_fuzz_rows(
        tmp_path / "root", tmp_path / "outside", n_good=200, n_bad=60, seed=5, max_text_chars=1000
    )
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=50,
        data_root=str(tmp_path / "root"),
    )
    run_ok(assay_cmd("validate", str(ds.root), str(tmp_path / "local"), "--executor", "local"))
    address, env = ray_cluster
    res = subprocess.run(
        assay_cmd("validate", str(ds.root), str(tmp_path / "cluster"), "--ray-address", address),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"connected to the cluster at {address}" in res.stderr
    assert assert_same_dataset(tmp_path / "local", tmp_path / "cluster") > 0
