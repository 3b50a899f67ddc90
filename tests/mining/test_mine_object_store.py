"""`assay mine` with its dataset, output, checkpoint and embedding cache on object storage (the local S3
server), in this process and as a task on the two-node Ray cluster: the same negatives as on local
disk; a second mine over the cache on S3 encodes and searches nothing; a checkpoint on S3 is copied
once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("transformers")
s3fs = pytest.importorskip("s3fs")

from helpers.colours import COLOURS, TINY, png  # noqa: E402

import assay  # noqa: E402
from assay.curation import storage  # noqa: E402
from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.mining.embed_cache import EmbeddingCache  # noqa: E402
from assay.mining.encoders import AssayEncoder, EncoderError, load_encoder  # noqa: E402
from assay.mining.stage import mine_dataset  # noqa: E402

pytest_plugins = ["helpers.s3_server", "helpers.ray_cluster"]  # their fixtures: s3, s3_bucket, ray_cluster
CKPT = "tiny-mine-ckpt"  # the checkpoint folder's name, locally and on S3: part of the encoder's id
RULES = "top:3"


def _colour_tables() -> tuple[dict[str, list[dict]], dict[str, bytes]]:
    """The colour data (helpers.colours) with every image a file under the data root, by path."""
    files: dict[str, bytes] = {}
    queries, corpus, pairs = [], [], []
    for name, (r, g, b) in COLOURS.items():
        corpus.append(
            {"doc_id": f"ans-{name}", "subset": "vqa", "text": name, "instruction": "Represent the answer."}
        )
        queries.append({"query_id": f"find-{name}", "subset": "retrieval", "task": "retrieval",
                        "text": f"a {name} image", "instruction": "Find the image."})  # fmt: skip
        for k in range(4):
            rel = f"images/{name}-{k}.png"
            files[rel] = png((max(0, r - 12 * k), max(0, g - 12 * k), max(0, b - 12 * k)))
            cell = {"bytes": None, "path": rel}
            queries.append({"query_id": f"q-{name}-{k}", "subset": "vqa", "task": "vqa",
                            "text": "What colour is it?", "image": cell, "instruction": "Answer the question."})  # fmt: skip
            corpus.append({"doc_id": f"img-{name}-{k}", "subset": "retrieval", "image": cell,
                           "instruction": "Represent the image."})  # fmt: skip
            pairs.append({"query_id": f"q-{name}-{k}", "doc_id": f"ans-{name}", "label": "positive"})
            pairs.append({"query_id": f"find-{name}", "doc_id": f"img-{name}-{k}", "label": "positive"})
    return {"queries": queries, "corpus": corpus, "pairs": pairs}, files


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The dataset and the tiny checkpoint on local disk, and the local mine of them (the reference)."""
    from assay.training.model import MMEmbedder
    from assay.training.tiny import build_tiny

    root = tmp_path_factory.mktemp("mine-local")
    tables, files = _colour_tables()
    write_dataset(root / "ds", tables, rows_per_shard=7)
    for rel, data in files.items():
        (root / "ds" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "ds" / rel).write_bytes(data)
    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny(["a red image", "What colour is it?"], tokens_per_tile=16, **settings)
    MMEmbedder(model, processor).save_pretrained(root / CKPT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASSAY_CACHE_DIR", str(root / "assay-cache"))
        result = assay.mine(root / "ds", root / "out", encoder=str(root / CKPT), rules=RULES,
                            cache=root / "emb", no_progress=True)  # fmt: skip
    return {"root": root, "files": files, "tables": tables, "result": result}


@pytest.fixture
def remote(local, s3_bucket):
    """The same dataset (images by path, under its data root on S3) and checkpoint, on S3."""
    fs = s3fs.S3FileSystem()
    ds = f"{s3_bucket}/data/ds"
    write_dataset(ds, local["tables"], rows_per_shard=7)
    for rel, data in local["files"].items():
        fs.pipe(f"{ds}/{rel}", data)
    # Training writes checkpoints to local folders: this one is uploaded as a user would.
    fs.put(str(local["root"] / CKPT), f"{s3_bucket}/models/", recursive=True)
    assert fs.isfile(f"{s3_bucket}/models/{CKPT}/model.safetensors")
    return {"bucket": s3_bucket, "ds": ds, "ckpt": f"{s3_bucket}/models/{CKPT}"}


def _rows(path: str | Path, table: str) -> list[dict]:
    ds = Dataset(path)
    rows = [r for n in ds.shards(table) for r in ds.read_shard(table, n).to_pylist()]
    key = "doc_id" if table == "corpus" else "query_id"
    return sorted(rows, key=lambda r: (r[key], r.get("doc_id") or "", r.get("label") or ""))


def _same_output(a: str | Path, b: str | Path) -> None:
    for table in ("queries", "corpus", "pairs"):
        assert _rows(a, table) == _rows(b, table), table
    assert Dataset(a).manifest.extra["mine"] == Dataset(b).manifest.extra["mine"]
    assert Dataset(a).manifest.counts == Dataset(b).manifest.counts


def _counting(monkeypatch) -> list[int]:
    """Rows handed to any assay encoder from now on."""
    calls: list[int] = []
    real = AssayEncoder.encode
    monkeypatch.setattr(
        AssayEncoder, "encode", lambda self, rows, side: calls.append(len(rows)) or real(self, rows, side)
    )
    return calls


@pytest.mark.objectstore
def test_mine_on_s3_gives_the_local_negatives(local, remote, tmp_path, monkeypatch):
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "assay-cache"))
    out = f"{remote['bucket']}/runs/mined"
    result = assay.mine(remote["ds"], out, encoder=remote["ckpt"], rules=RULES,
                        cache=f"{remote['bucket']}/cache/emb", no_progress=True)  # fmt: skip

    assert str(result.out) == out
    mined = [p for p in _rows(out, "pairs") if p["label"] == "hard_negative"]
    assert len(mined) == 3 * 20  # top 3 for each of the 20 queries with a positive
    _same_output(out, local["root"] / "out")
    assert Dataset(out).manifest.data_root == remote["ds"]
    assert result.details["encoder"] == local["result"].details["encoder"]
    # the cache is Parquet segments on S3, no SQLite file anywhere
    files = storage.files_under(f"{remote['bucket']}/cache/emb", ".parquet")
    segments = [f for f in files if not f.startswith("search/")]  # search/: the search cache's entries
    assert segments and all(s.split("/")[-1].startswith("seg-") for s in segments)
    assert len(files) - len(segments) == 2  # one search per subset
    assert not list((tmp_path / "assay-cache").rglob("*.sqlite"))
    # the checkpoint was copied once to local disk, under the folder's own name
    copies = list((tmp_path / "assay-cache" / "models").glob(f"*/{CKPT}"))
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()


@pytest.mark.objectstore
def test_a_second_mine_over_an_s3_cache_encodes_nothing(local, remote, tmp_path, monkeypatch):
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "assay-cache"))
    cache = f"{remote['bucket']}/cache/emb"
    calls = _counting(monkeypatch)
    enc = load_encoder(remote["ckpt"], image_root=remote["ds"])
    mine_dataset(remote["ds"], f"{remote['bucket']}/a", enc, cache_dir=cache, rules=RULES)
    first = sum(calls)
    assert first == 16 + 4 + 4 + 16  # vqa: 16 image queries, 4 answers; retrieval: 4 text queries, 16 images
    calls.clear()

    fs = storage.path(remote["ckpt"]).fs
    assert storage.path(remote["ckpt"]).fs is fs  # one cached filesystem: the one local_copy uses
    fetched: list[str] = []
    get_file = fs.get_file
    monkeypatch.setattr(fs, "get_file", lambda rpath, lpath, **kw: fetched.append(rpath) or get_file(rpath, lpath, **kw))  # fmt: skip
    enc2 = load_encoder(remote["ckpt"], image_root=remote["ds"])  # a new process would load it anew
    assert fetched == []  # the local copy of the checkpoint is reused: nothing downloaded
    _, stats = mine_dataset(remote["ds"], f"{remote['bucket']}/b", enc2, cache_dir=cache, rules=RULES)
    assert calls == []
    # nor searches: the search cache's entries are on S3 too, one per subset
    assert all(s["search_cached"] for s in stats.values()) and len(stats) == 2
    assert len(storage.files_under(f"{cache}/search", ".parquet")) == 2
    _same_output(f"{remote['bucket']}/a", f"{remote['bucket']}/b")
    with EmbeddingCache(cache, enc2) as c:
        assert (
            c.encoded == 0
            and len(c._segments.segments()) >= 1
            and sum(1 for _ in c._segments.items()) == first
        )
    # the local cache of the reference run held the same vectors: local SQLite, unchanged
    assert list((local["root"] / "emb").glob("*.sqlite"))


@pytest.mark.objectstore
def test_a_killed_mine_on_s3_resumes_to_the_same_output(local, remote, tmp_path, monkeypatch):
    import assay.mining.stage as stage

    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "assay-cache"))
    out, cache = f"{remote['bucket']}/runs/resumed", f"{remote['bucket']}/cache/emb"
    enc = load_encoder(remote["ckpt"], image_root=remote["ds"])
    real, seen = stage._mine_subset, []

    def dies_on_second(*args, **kw):
        seen.append(args[1])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(stage, "_mine_subset", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        mine_dataset(remote["ds"], out, enc, cache_dir=cache, rules=RULES)
    assert not storage.is_file(f"{out}/manifest.json") and storage.files_under(f"{out}/_progress")
    monkeypatch.setattr(stage, "_mine_subset", lambda *a, **k: seen.append(a[1]) or real(*a, **k))
    mine_dataset(remote["ds"], out, enc, cache_dir=cache, rules=RULES)
    assert seen == ["retrieval", "vqa", "vqa"]  # the finished subset was not mined again
    _same_output(out, local["root"] / "out")
    assert not storage.files_under(f"{out}/_progress")


@pytest.mark.objectstore
def test_a_checkpoint_on_s3_with_pickle_files_is_refused_before_any_download(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "assay-cache"))
    fs = s3fs.S3FileSystem()
    bad = f"{remote['bucket']}/models/pickled"
    fs.copy(f"{remote['ckpt']}/config.json", f"{bad}/config.json")
    fs.pipe(f"{bad}/pytorch_model.bin", b"not really a pickle")
    with pytest.raises(EncoderError, match="pytorch_model.bin.*refusing"):
        load_encoder(bad)
    with pytest.raises(EncoderError, match="not a model directory"):
        load_encoder(f"{remote['bucket']}/models/nothing-here")
    assert not (tmp_path / "assay-cache" / "models").exists()


@pytest.mark.objectstore
def test_a_changed_checkpoint_on_s3_is_copied_again(remote, tmp_path):
    fs = s3fs.S3FileSystem()
    first = storage.local_copy(remote["ckpt"], tmp_path / "m")
    assert storage.local_copy(remote["ckpt"], tmp_path / "m") == first
    fs.pipe(f"{remote['ckpt']}/extra.json", b"{}")
    second = storage.local_copy(remote["ckpt"], tmp_path / "m")
    assert second != first and second.name == first.name == CKPT and (second / "extra.json").is_file()
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.objectstore
@pytest.mark.cluster
def test_mine_on_the_cluster_gives_the_local_negatives(local, remote, ray_cluster, tmp_path):
    out = f"{remote['bucket']}/runs/cluster"
    models = Path.home() / ".cache" / "assay" / "models"  # the worker node's own cache (not hidden)
    existed = models.is_dir()
    before = set(models.glob("*")) if existed else set()
    try:
        res = subprocess.run(
            [sys.executable, "-m", "assay.pipelines.cli", "mine", remote["ds"], out, "--encoder", remote["ckpt"],
             "--rules", RULES, "--cache", f"{remote['bucket']}/cache/emb", "--no-progress",
             "--ray-address", ray_cluster.address],
            capture_output=True, text=True, timeout=600, env=ray_cluster.env,
        )  # fmt: skip
    finally:
        for p in (set(models.glob("*")) if models.is_dir() else set()) - before:
            if (p / CKPT).is_dir():
                shutil.rmtree(p, ignore_errors=True)
        if not existed and models.is_dir() and not any(models.iterdir()):
            models.rmdir()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "mining in one task" in res.stderr and "2 node(s)" in res.stderr
    _same_output(out, local["root"] / "out")
    assert ray_cluster.hidden, "unshare was not permitted: the worker node could read this process's files"
    # the task ran where the test's scratch folders are hidden: everything it read came from S3
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert manifest["data_root"] == remote["ds"]
