"""Datasets on object storage: the curation stages write on s3:// (a local S3 server) what they write on
a local disk, a reader reads only what the manifest lists, a killed stage resumes on s3:// to the same
files, one writer at a time holds an output there, and the two-node cluster (whose worker node cannot
see this process's scratch folder) curates s3:// data to the local result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from helpers.badrows import make_fuzz_rows, queries_table
from helpers.kill import assay_cmd, assert_same_dataset, run_and_kill, run_ok

import assay
from assay.curation import lease, storage
from assay.curation.dataset import Dataset, write_dataset
from assay.curation.lock import OutputInUse, output_lock

pytest_plugins = ["helpers.s3_server", "helpers.ray_cluster"]  # their fixtures: s3, s3_bucket, ray_cluster
s3fs = pytest.importorskip("s3fs")

pytestmark = pytest.mark.objectstore
STAGES = [
    ("validate", {"max_text_chars": 1000}),
    ("dedup", {}),
    ("filter", {"where": "query_id != 'q-good-3'"}),
]


def _fuzz(tmp_path: Path, n_good: int = 300, n_bad: int = 40, rows_per_shard: int = 100):
    """Good and bad rows with images by path, as (tables, data root). The root holds no symlink:
    an object store has none (an upload copies the file a link points to)."""
    root = tmp_path / "root"
    queries, corpus, pairs, _ = make_fuzz_rows(
        root, tmp_path / "outside", n_good=n_good, n_bad=n_bad, seed=7, max_text_chars=1000
    )
    (root / "img" / "escape.png").unlink()
    return {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs}, root, rows_per_shard


def _both_sides(tmp_path: Path, bucket: str, **fuzz):
    """The same dataset on local disk and on s3:// (its images under an s3:// data root); the
    quarantine's details name the data root, so compare with ``roots=_roots(tmp_path, bucket)``."""
    tables, root, rows = _fuzz(tmp_path, **fuzz)
    s3fs.S3FileSystem().put(str(root), f"{bucket}/root", recursive=True)
    write_dataset(tmp_path / "raw", tables, rows_per_shard=rows, data_root=str(root))
    write_dataset(f"{bucket}/raw", tables, rows_per_shard=rows, data_root=f"{bucket}/root")
    return tmp_path / "raw", f"{bucket}/raw"


def _roots(tmp_path: Path, bucket: str) -> tuple[str, str]:
    """The data roots' folders (a path that leaves the root is named from there)."""
    return str(tmp_path), bucket


def _download(uri: str, to: Path) -> Path:
    s3fs.S3FileSystem().get(uri, str(to), recursive=True)
    return to


def test_curation_stages_on_s3_write_what_they_write_locally(tmp_path, s3_bucket):
    local, remote = _both_sides(tmp_path, s3_bucket)
    for stage, options in STAGES:
        a = getattr(assay, stage)(local, tmp_path / stage, executor="local", **options)
        b = getattr(assay, stage)(remote, f"{s3_bucket}/{stage}", executor="local", **options)
        assert (a.counts, a.quarantined) == (b.counts, b.quarantined), stage
        assert str(b.out) == f"{s3_bucket}/{stage}"
        rows = assert_same_dataset(
            tmp_path / stage,
            _download(f"{s3_bucket}/{stage}", tmp_path / f"{stage}-s3"),
            roots=_roots(tmp_path, s3_bucket),
        )
        assert rows == sum(a.counts.values())
        local, remote = a.out, str(b.out)
    assert a.counts["quarantine"] and a.details["dropped"]["queries"]  # rows were refused and dropped
    assert assay.stats(remote).counts == assay.stats(local).counts
    # Nothing but the dataset is left under its prefix: no _progress/, no temporary object.
    found = s3fs.S3FileSystem().find(remote)
    assert found and all(
        p.split("/")[2] in ("manifest.json", "queries", "corpus", "pairs", "quarantine") for p in found
    )


def test_a_reader_reads_only_the_shards_the_manifest_lists(tmp_path, s3_bucket):
    _, remote = _both_sides(tmp_path, s3_bucket)
    out = assay.validate(remote, f"{s3_bucket}/valid", executor="local", max_text_chars=1000).out
    before = Dataset(out).num_rows("queries")
    # What a dead attempt leaves behind: a shard the manifest does not name, and no manifest at all.
    stray = pa.table({"query_id": ["stray"], "text": ["left by a killed writer"]})
    storage.put_bytes(f"{out}/queries/part-09999.parquet", storage.parquet_bytes(stray))
    assert Dataset(out).num_rows("queries") == before
    assert "stray" not in {r["query_id"] for b in Dataset(out).iter_batches("queries") for r in b.to_pylist()}
    storage.put_bytes(f"{s3_bucket}/dead/queries/part-00000.parquet", storage.parquet_bytes(stray))
    storage.put_bytes(f"{s3_bucket}/dead/_progress/run.json", b"{}")
    with pytest.raises(Exception, match="unfinished run"):
        Dataset(f"{s3_bucket}/dead")


def test_a_stage_killed_on_s3_resumes_to_the_same_files(tmp_path, s3_bucket):
    _, remote = _both_sides(tmp_path, s3_bucket, n_good=2000, n_bad=200, rows_per_shard=100)
    args = ["--max-text-chars", "1000", "--executor", "local"]
    run_ok(assay_cmd("validate", remote, f"{s3_bucket}/clean", *args))
    killed = storage.path(f"{s3_bucket}/killed")
    assert run_and_kill(
        assay_cmd("validate", remote, str(killed), *args), killed, "_progress/done/queries/*.json", count=3
    ), "validate finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    run_ok(assay_cmd("validate", remote, str(killed), *args))
    assert_same_dataset(
        _download(f"{s3_bucket}/clean", tmp_path / "clean"), _download(str(killed), tmp_path / "killed")
    )


def test_a_stage_on_s3_reads_back_nothing_its_own_tasks_wrote(tmp_path, s3_bucket, monkeypatch):
    """Every object read is a request: an uninterrupted stage plans from the side tables its scan
    tasks return and adds up the markers its write tasks return, so it reads nothing under its own
    ``_progress/`` (a rerun after a kill reads what the dead attempt left there)."""
    _, remote = _both_sides(tmp_path, s3_bucket, n_good=300, n_bad=40, rows_per_shard=100)
    read: list[str] = []
    for name in ("read_table", "read_many", "read_bytes", "footers"):
        real = getattr(storage, name)

        def spy(what, *a, real=real, **kw):
            read.extend(map(str, what) if isinstance(what, list) else [str(what)])
            return real(what, *a, **kw)

        monkeypatch.setattr(storage, name, spy)
    assay.validate(remote, f"{s3_bucket}/v", max_text_chars=1000, executor="local")
    assay.dedup(f"{s3_bucket}/v", f"{s3_bucket}/d", executor="local")
    assert read and not [p for p in read if "/_progress/" in p]
    assert Dataset(f"{s3_bucket}/d").manifest.counts["quarantine"] > 0


HOLD = """
import sys, time
from assay.curation.lock import output_lock
with output_lock(sys.argv[1], command="holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_writer_at_a_time_on_s3_and_a_dead_holders_lease_ends(s3_bucket, monkeypatch):
    monkeypatch.setenv(lease.LEASE_ENV, "3")
    out = f"{s3_bucket}/ds"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(OutputInUse, match=rf"pid {holder.pid} .*holder"):
            assay.validate(f"{s3_bucket}/nothing-here", out, executor="local")
        assert time.monotonic() - t0 < 5
        time.sleep(4)  # longer than the lease: a live holder has renewed it meanwhile
        with pytest.raises(OutputInUse), output_lock(out):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    lock = lease.lock_location(out)
    assert lock.exists()  # a SIGKILLed holder cannot clean up ...
    time.sleep(3.5)
    with output_lock(out):  # ... but its lease ends, and the next writer takes the lock over
        assert lock.exists()
    assert not lock.exists()  # a clean release removes it


def test_a_store_without_conditional_puts_is_refused_unless_unlocked(tmp_path, monkeypatch):
    tables, root, _ = _fuzz(tmp_path, n_good=30, n_bad=0)
    src = write_dataset(tmp_path / "raw", tables, data_root=str(root))
    with pytest.raises(lease.LockUnsupported, match=r"memory://.*ASSAY_LOCK=off"):
        assay.validate(src.root, "memory://bucket/valid", executor="local")
    monkeypatch.setenv(lease.OFF_ENV, "off")  # fsspec's in-memory filesystem: any fsspec store works
    out = assay.validate(src.root, "memory://bucket/valid", executor="local", max_text_chars=1000)
    assert (
        out.counts
        == assay.validate(src.root, tmp_path / "valid", executor="local", max_text_chars=1000).counts
    )


def test_credentials_never_reach_the_output_or_the_logs(tmp_path, s3_bucket):
    tables, root, _ = _fuzz(tmp_path, n_good=30, n_bad=5)
    src = write_dataset(tmp_path / "raw", tables, data_root=str(root))
    res = subprocess.run(
        assay_cmd("validate", str(src.root), f"{s3_bucket}/valid", "--executor", "local"),
        capture_output=True,
        text=True,
        env={**os.environ, "AWS_SECRET_ACCESS_KEY": "testing-SECRET-42"},
    )
    assert res.returncode == 0, res.stderr
    assert "SECRET-42" not in res.stdout + res.stderr
    assert b"SECRET-42" not in storage.read_bytes(f"{s3_bucket}/valid/manifest.json")
    assert storage.display("ftp://user:pw@host/x") == "ftp://***@host/x"


@pytest.mark.cluster
def test_the_two_node_cluster_curates_s3_data_to_the_local_result(tmp_path, s3_bucket, ray_cluster):
    local, remote = _both_sides(tmp_path, s3_bucket)
    for stage, options in STAGES:
        getattr(assay, stage)(local, tmp_path / stage, executor="local", **options)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        res = subprocess.run(
            assay_cmd(stage, remote, f"{s3_bucket}/{stage}", *flags, "--ray-address", ray_cluster.address),
            capture_output=True,
            text=True,
            env=ray_cluster.env,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert_same_dataset(
            tmp_path / stage,
            _download(f"{s3_bucket}/{stage}", tmp_path / f"{stage}-s3"),
            roots=_roots(tmp_path, s3_bucket),
        )
        local, remote = tmp_path / stage, f"{s3_bucket}/{stage}"
    assert ray_cluster.hidden, "unshare was not permitted: the worker node could read this process's files"
