"""`assay judge` and `assay curate --judge` with the dataset, the output, the judge checkpoint and the
judgment cache on s3:// (the local S3 server): the same output as a local run, a rerun served by
the cache on s3 (nothing judged again), and `assay curate --ray-address` on the two-node cluster,
whose judge actor runs on the worker node and reads the checkpoint from s3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
s3fs = pytest.importorskip("s3fs")

from click.testing import CliRunner  # noqa: E402
from helpers.colours import COLOURS, TINY, colour_dataset  # noqa: E402
from helpers.fake_judge import FakeJudge  # noqa: E402

from assay.curation import storage  # noqa: E402
from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.curation.judge.cache import JudgmentCache, Key, SegmentJudgmentCache, content_hash  # noqa: E402
from assay.curation.judge.scoring import JudgeItem, Score  # noqa: E402
from assay.curation.judge.stage import judge_dataset, read_failures  # noqa: E402
from assay.curation.remote_model import MODELS_DIR, local_model_dir, remote_files  # noqa: E402
from assay.curation.schema import DATA_TABLES  # noqa: E402
from assay.curation.segment_cache import SEGMENT_PREFIX  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402
from assay.training.model import MMEmbedder  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

pytest_plugins = ["helpers.s3_server", "helpers.ray_cluster"]  # their fixtures: s3, ray_cluster
pytestmark = pytest.mark.objectstore

EXTRA = [
    {"query_id": "q-red-0", "doc_id": f"ans-{c}", "label": "hard_negative"} for c in COLOURS if c != "red"
]
WHERE = "label != 'negative'"


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Path:
    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny(["What colour is it?", *COLOURS], tokens_per_tile=16, seed=1, **settings)
    path = tmp_path_factory.mktemp("judge") / "reranker"
    MMEmbedder(model, processor).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store(s3, reranker, tmp_path_factory) -> dict:
    """A bucket holding the dataset (written there by the dataset writer) and the judge checkpoint
    (uploaded); the same dataset on local disk."""
    bucket = s3.bucket(f"assay-judge-{uuid.uuid4().hex[:12]}")
    local = tmp_path_factory.mktemp("judge-data") / "data"
    colour_dataset(local, extra_pairs=EXTRA)
    colour_dataset(f"{bucket}/data", extra_pairs=EXTRA)
    fs = s3fs.S3FileSystem()
    fs.put(str(reranker), f"{bucket}/models/reranker", recursive=True)
    model = f"{bucket}/models/reranker"
    assert sorted(n for n, _ in remote_files(model)) == sorted(p.name for p in reranker.iterdir())
    return {"bucket": bucket, "data": f"{bucket}/data", "model": model, "local": local, "fs": fs}


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """ASSAY_CACHE_DIR of this test: where a checkpoint on s3 is copied to."""
    root = tmp_path / "assay-cache"
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(root))
    return root


def _invoke(args: list) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _contents(root: str | Path) -> dict[str, dict[str, list[dict]]]:
    """Every data shard's rows and every quarantine file's rows (but for ``source``, which names the
    dataset a row was refused from), by table and file name."""
    ds = Dataset(root)
    out = {t: {n: ds.read_shard(t, n).to_pylist() for n in ds.shards(t)} for t in DATA_TABLES}
    quarantine = {}
    for name in ds.quarantine_files():
        rows = storage.read_table(ds.root / "quarantine" / name).to_pylist()
        quarantine[name] = [{k: v for k, v in r.items() if k != "source"} for r in rows]
    out["quarantine"] = quarantine
    return out


def _segments(fs, prefix: str) -> list[str]:
    return sorted(f for f in fs.find(prefix) if f.rsplit("/", 1)[-1].startswith(SEGMENT_PREFIX))


def test_judge_on_s3_gives_the_local_output_and_reuses_the_s3_cache(store, reranker, tmp_path, cache_root):
    common = ["--no-progress", "--batch-size", 8]
    local_args = ["judge", store["local"], tmp_path / "out", "--model", reranker]
    _invoke([*local_args, "--cache", tmp_path / "c.sqlite", *common])
    b, fs = store["bucket"], store["fs"]
    cache = f"{b}/cache/judge"
    args = ["judge", store["data"], f"{b}/judged", "--model", store["model"], "--cache", cache, *common]
    start = time.perf_counter()
    first = _invoke(args)
    seconds = time.perf_counter() - start
    assert "judged 35 pairs" in first and "0 from the cache" in first, first

    # the same verdicts, row for row, and the same judge id (the weights hash of the copied checkpoint)
    local, remote = Dataset(tmp_path / "out"), Dataset(f"{b}/judged")
    assert _contents(f"{b}/judged") == _contents(tmp_path / "out")
    assert remote.manifest.extra["judge"]["model_id"] == local.manifest.extra["judge"]["model_id"]
    assert remote.manifest.extra["judge"]["model_id"].startswith("reranker@")
    # the checkpoint was copied once, to this machine's cache root (<key>/reranker)
    copies = list((cache_root / MODELS_DIR).iterdir())
    assert len(copies) == 1
    assert sorted(p.name for p in (copies[0] / "reranker").iterdir()) == sorted(
        p.name for p in reranker.iterdir()
    )
    # the cache is Parquet segments on s3 (one per batch of 8), no SQLite file anywhere there
    segments = _segments(fs, cache)
    assert len(segments) == 5 and not [f for f in fs.find(b) if f.endswith(".sqlite")]
    model_id = remote.manifest.extra["judge"]["model_id"]
    with JudgmentCache(cache) as opened:
        assert isinstance(opened, SegmentJudgmentCache) and opened.count(model_id) == 35

    # a rerun into another output judges nothing: every pair comes from the s3 cache
    again = _invoke([*args[:2], f"{b}/judged2", *args[3:]])
    assert "judged 0 pairs" in again and "35 from the cache" in again, again
    assert _contents(f"{b}/judged2") == _contents(tmp_path / "out")
    assert _segments(fs, cache) == segments  # nothing stored again
    assert local_model_dir(store["model"]) == copies[0] / "reranker"  # the copy is reused
    print(f"judge on s3 (35 pairs, checkpoint copied from s3): {seconds:.1f} s")


def _with_image_files(source: Path, root: str, images: str) -> None:
    """``source``'s rows written to ``root`` with each image as a file under the data root
    ``images`` (a folder or a URI) instead of inline bytes."""
    ds, tables = Dataset(source), {}
    for table in ("queries", "corpus", "pairs"):
        rows = [r for n in ds.shards(table) for r in ds.read_shard(table, n).to_pylist()]
        for r in rows:
            if r.get("image") and r["image"].get("bytes"):
                rel = f"img/{r['query_id' if table == 'queries' else 'doc_id']}.png"
                target = storage.path(images) / rel
                if not storage.is_remote(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(r["image"]["bytes"])
                r["image"] = {"bytes": None, "path": rel}
        tables[table] = rows
    write_dataset(root, tables, data_root=images)


def test_judge_reads_image_files_under_an_s3_data_root(store, reranker, tmp_path, cache_root):
    b = store["bucket"]
    _with_image_files(store["local"], str(tmp_path / "paths"), str(tmp_path / "images"))
    _with_image_files(store["local"], f"{b}/paths", f"{b}/images")
    common = ["--model", store["model"], "--no-progress", "--batch-size", 8]
    _invoke(["judge", tmp_path / "paths", tmp_path / "out", *common, "--cache", tmp_path / "c.sqlite"])
    output = _invoke(["judge", f"{b}/paths", f"{b}/paths-judged", *common, "--cache", f"{b}/cache/paths"])
    assert "judged 35 pairs" in output and "0 failed" in output, output
    assert _contents(f"{b}/paths-judged") == _contents(tmp_path / "out")


def test_the_s3_cache_keeps_every_committed_batch(store):
    cache_uri = f"{store['bucket']}/cache/unit"
    key = Key("q", "d", content_hash(JudgeItem([{"type": "text", "text": "x"}])))
    with JudgmentCache(cache_uri) as cache:
        assert isinstance(cache, SegmentJudgmentCache)
        cache.store("m", "p@v1", [(key, Score(margin=1.5))])
    with JudgmentCache(cache_uri) as cache:  # a new process: the batch is there
        assert cache.lookup("m", "p@v1", [key]) == {key: Score(margin=1.5)}
        assert cache.lookup("m", "p@v2", [key]) == {} and cache.lookup("other", "p@v1", [key]) == {}
        assert cache.lookup("m", "p@v1", [Key("q", "d", "other content")]) == {}
        cache.store("m", "p@v1", [(key, Score(error="boom"))])
        assert cache.lookup("m", "p@v1", [key]) == {}
        assert cache.lookup("m", "p@v1", [key], failures=True)[key].error == "boom"
    with JudgmentCache(cache_uri) as cache:  # the later segment wins
        assert cache.lookup("m", "p@v1", [key], failures=True)[key].error == "boom"
        assert cache.count("m") == 1 and cache.count() == 1
    assert len(_segments(store["fs"], cache_uri)) == 2


def test_a_killed_judge_on_s3_resumes_without_judging_a_pair_twice(store, tmp_path):
    reference = FakeJudge()
    judge_dataset(store["local"], tmp_path / "ref", reference, cache=tmp_path / "ref.sqlite", batch_size=5)
    b = store["bucket"]
    out, cache = f"{b}/killed", f"{b}/cache/killed"

    class Killed(Exception):
        pass

    def kill_after_three(done, total):
        if kill_after_three.batches == 2:
            raise Killed
        kill_after_three.batches += 1

    kill_after_three.batches = 0
    judge = FakeJudge()
    with pytest.raises(Killed):
        judge_dataset(store["data"], out, judge, cache=cache, batch_size=5, on_batch=kill_after_three)
    assert not store["fs"].exists(f"{out}/manifest.json")
    before = list(judge.calls)
    _, report = judge_dataset(store["data"], out, judge, cache=cache, batch_size=5)
    assert len(before) == 15 and report.cached == 15 and report.scored == 20
    assert sorted(judge.calls) == sorted(reference.calls)  # every pair judged exactly once overall
    assert _contents(out) == _contents(tmp_path / "ref")
    # pairs a judge cannot score: listed in OUT/judge_failures.parquet on s3, as on disk
    failing = FakeJudge("failing@0", fail_on="<<<blue>>>")
    judge_dataset(store["local"], tmp_path / "failed", failing, cache=tmp_path / "ref.sqlite")
    judge_dataset(store["data"], f"{b}/failed", FakeJudge("failing@0", fail_on="<<<blue>>>"), cache=cache)
    failures = read_failures(f"{b}/failed")
    assert failures.num_rows > 0 and failures.equals(read_failures(tmp_path / "failed"))
    assert _contents(f"{b}/failed") == _contents(tmp_path / "failed")


def test_a_checkpoint_on_s3_with_pickle_files_is_refused(store, tmp_path, cache_root):
    model = f"{store['bucket']}/models/pickled"
    store["fs"].pipe({f"{model}/config.json": b"{}", f"{model}/pytorch_model.bin": b"not read"})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["judge", str(store["local"]), str(out), "--model", model])
    assert result.exit_code != 0 and "pytorch_model.bin" in result.output and "pickle" in result.output
    assert not (out / "manifest.json").exists() and not cache_root.exists()  # nothing copied
    result = CliRunner().invoke(cli, ["judge", str(store["local"]), str(out), "--model", model + "-none"])
    assert result.exit_code != 0 and "is not a model directory" in result.output


@pytest.fixture(scope="module")
def local_curate(store, reranker, tmp_path_factory) -> Path:
    """`assay curate` with the judge, every location local: the reference."""
    root = tmp_path_factory.mktemp("curate-local")
    args = ["curate", store["local"], root / "out", "--judge", reranker, "--cache", root / "c.sqlite"]
    _invoke([*args, "--where", WHERE, "--executor", "local"])
    return root / "out"


def test_curate_on_s3_gives_the_local_output(store, local_curate, cache_root):
    b, fs = store["bucket"], store["fs"]
    out, cache = f"{b}/curated", f"{b}/cache/curate"
    args = ["curate", store["data"], out, "--judge", store["model"], "--cache", cache, "--where", WHERE]
    args += ["--executor", "local"]
    output = _invoke(args)
    assert "pairs scored, 0 from the cache" in output
    reference = _contents(local_curate)
    assert _contents(out) == reference
    assert sum(len(rows) for files in reference.values() for rows in files.values()) > 50
    assert [s["stage"] for s in Dataset(out).manifest.lineage][-4:] == [
        "validate",
        "dedup",
        "judge",
        "filter",
    ]
    record = json.loads(storage.path(f"{out}/curate.json").read_text())
    assert record["details"]["judge"]["scored"] == record["details"]["judge"]["selected"] > 0
    # the steps' datasets (the prefix .curated.curate/ beside OUT) are gone
    assert not fs.exists(f"{b}/.curated.curate") and not fs.find(f"{b}/.curated.curate")

    # a rerun of the finished run finds its record on s3 and returns at once: nothing rewritten
    run_id, segments = Dataset(out).manifest.run_id, _segments(fs, cache)
    _invoke(args)
    assert Dataset(out).manifest.run_id == run_id and _segments(fs, cache) == segments
    assert not fs.find(f"{b}/.curated.curate")

    # the same curate into another output: every pair from the s3 cache
    again = _invoke([*args[:2], f"{b}/curated2", *args[3:]])
    judged = json.loads(storage.path(f"{b}/curated2/curate.json").read_text())["details"]["judge"]
    assert judged["scored"] == 0 and judged["cached"] == judged["selected"] > 0, again
    assert _contents(f"{b}/curated2") == _contents(local_curate)


@pytest.mark.cluster
def test_curate_on_the_two_node_cluster_gives_the_local_output(store, local_curate, ray_cluster):
    b = store["bucket"]
    out = f"{b}/cluster"
    cmd = [
        sys.executable,
        "-m",
        "assay.pipelines.cli",
        "curate",
        store["data"],
        out,
        "--judge",
        store["model"],
    ]
    cmd += ["--cache", f"{b}/cache/cluster", "--where", WHERE, "--actors", "1"]
    cmd += ["--ray-address", ray_cluster.address]
    # the worker node copies the checkpoint to its cache root (<key>/reranker, a key of this
    # session's bucket): the copy is removed afterwards
    worker_root = Path(ray_cluster.env.get("ASSAY_CACHE_DIR") or Path.home() / ".cache" / "assay")
    models = worker_root / MODELS_DIR
    before = set(models.iterdir()) if models.is_dir() else set()
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ray_cluster.env)
    finally:
        after = set(models.iterdir()) if models.is_dir() else set()
        copies = [d for d in after - before if (d / "reranker").is_dir()]
        for d in copies:
            shutil.rmtree(d, ignore_errors=True)
    seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "in 1 actor(s), on CPUs" in res.stderr
    assert _contents(out) == _contents(local_curate)
    judged = json.loads(storage.path(f"{out}/curate.json").read_text())["details"]["judge"]
    assert judged["scored"] == judged["selected"] > 0 and judged["cached"] == 0
    assert not store["fs"].find(f"{b}/.cluster.curate")
    if not any(worker_root.resolve().is_relative_to(h) for h in ray_cluster.hidden):
        assert len(copies) == 1  # the actor, on the worker node, copied the checkpoint from s3
    print(f"curate with the judge on the two-node cluster, all on s3: {seconds:.1f} s")
    assert ray_cluster.hidden, "unshare was not permitted: the worker node could read this process's files"
