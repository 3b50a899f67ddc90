"""Ingest and export on object storage (a local S3 server): every input form read from s3:// into an
s3:// dataset gives the rows the local ingest gives; an export from an s3:// dataset to s3:// gives
the bytes and rows of the local export, for a file format and for folder formats; and a folder export
that fails or is killed mid-upload leaves nothing that looks finished, and its rerun redoes it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers.kill import assay_cmd, assert_same_dataset

import assay
from assay.curation import storage
from assay.curation.dataset import Dataset, write_dataset
from assay.curation.export import INCOMPLETE, ExportError

pytest_plugins = ["helpers.s3_server", "helpers.ray_cluster"]  # their fixtures: s3, s3_bucket, ray_cluster
s3fs = pytest.importorskip("s3fs")

pytestmark = pytest.mark.objectstore


def _upload(local: Path, uri: str) -> None:
    s3fs.S3FileSystem().put(str(local), uri, recursive=True)


def _download(uri: str, to: Path) -> Path:
    s3fs.S3FileSystem().get(uri, str(to), recursive=True)
    return to


def _jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def _csv(path: Path, header: list[str], body: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return path


def _inputs(root: Path, png) -> None:
    """Every input form under ``root`` (uploaded as it is): bad rows, images by path (one leaving
    the data root, one missing), inline bytes, nested folders."""
    (root / "secret.png").write_bytes(png((9, 9, 9)))  # outside every data root below
    for i in range(4):
        p = root / "jsonl" / "img" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png((i * 40, 0, 0), size=(8 + i, 8)))
    _jsonl(
        root / "jsonl" / "a.jsonl",
        [
            {"query_text": "good one", "doc_image": "img/0.png", "score": 0.5},
            b"{not json",
            b'{"query_text": "caf\xe9", "doc_text": "x"}',
            {"query_text": 12, "doc_text": "x"},
            {"query_text": "escape", "doc_image": "../secret.png"},
            {"query_text": "gone", "doc_image": "img/missing.png"},
            {"query_text": "bad score", "doc_text": "x", "score": "high"},
            {"query_text": "good one", "doc_image": "img/0.png", "score": 0.5},  # an exact repeat
        ],
    )
    _jsonl(
        root / "jsonl" / "sub" / "b.jsonl",
        [{"query_text": f"q{i}", "doc_image": f"img/{i}.png", "doc_text": f"d{i}"} for i in range(1, 4)],
    )
    _csv(
        root / "csv" / "pairs.csv",
        ["question", "passage", "picture"],
        [["what?", "this", "1.png"], ["short row"], ["where?", "", "../secret.png"], ["who?", "him", ""]],
    )
    (root / "csv" / "mapping.yaml").write_text(
        "query_text: question\ndoc_text: passage\ndoc_image: picture\n"
    )
    for i in range(3):
        (root / "images" / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{i}.png").write_bytes(png((0, i * 50, 0)))
    table = pa.table(
        {
            "query_text": [f"pq {i}" for i in range(5)],
            "doc_text": [None, "b", "c", None, "e"],
            "doc_image": [{"bytes": png((0, 0, i * 40)), "path": None} for i in range(5)],
        }
    )
    (root / "pq").mkdir()
    pq.write_table(table, root / "pq" / "pairs.parquet", row_group_size=2)
    for label, colour in (("cat", (1, 2, 3)), ("dog", (4, 5, 6)), ("dog-2", (7, 8, 9))):
        for i in range(2):
            p = root / "photos" / label / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(png(colour, size=(8 + i, 8)))
    (root / "photos" / "stray.png").write_bytes(png())  # in no class folder: quarantined
    for i in range(3):
        (root / "flat" / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "flat" / f"{i}.png").write_bytes(png((i, i, i)))
    _csv(
        root / "flat" / "captions.csv",
        ["file", "caption"],
        [["0.png", "black"], ["1.png", ""], ["2.png", "grey"]],
    )
    for split, n in (("train", 2), ("test", 1)):
        for label, colour in (("cat", (1, 2, 3)), ("dog", (4, 5, 6))):
            for i in range(n):
                p = root / "splits" / split / label / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(png(colour, size=(8 + i, 8)))


def _hf_input(root: Path, png) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green", "blue"])}
    )
    rows = {"image": [{"bytes": png(c), "path": None} for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]}
    rows["label"] = [0, 1, 2]
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "hf"))


#: form -> (source below the inputs, ingest options; "{in}" is the inputs' root, local or s3://)
FORMS = {
    "jsonl": ("jsonl", {"embed_images": True, "map": ["score=score"]}),
    "csv": ("csv/pairs.csv", {"mapping": "{in}/csv/mapping.yaml", "data_root": "{in}/images"}),
    "parquet": ("pq", {"embed_images": True}),
    "imagefolder": ("photos", {}),
    "captions": ("flat", {"captions": "{in}/flat/captions.csv", "embed_images": True}),
    "documents": ("photos", {"documents": True, "embed_images": True}),
    "hf": ("hf", {"format": "hf", "map": ["query_image=image", "doc_text=label"], "task": "classification"}),
    "splits": ("splits", {}),
}
#: the data root a form's quarantine details name (its folder), below the inputs' root
ROOTS = {"csv": "images", "jsonl": "jsonl"}


@pytest.mark.parametrize("form", list(FORMS))
def test_ingest_from_s3_to_s3_gives_the_local_dataset(form, tmp_path, s3_bucket, make_png, monkeypatch):
    local_in, remote_in = tmp_path / "in", f"{s3_bucket}/in"
    local_in.mkdir()
    _inputs(local_in, make_png) if form != "hf" else _hf_input(local_in, make_png)
    _upload(local_in, remote_in)
    rel, options = FORMS[form]
    (tmp_path / "tmp").mkdir()  # where the parts are written before they go up (and the HF copy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def run(inputs: str, out: str):
        opts = {k: v.replace("{in}", inputs) if isinstance(v, str) else v for k, v in options.items()}
        return assay.ingest(f"{inputs}/{rel}", out, executor="local", rows_per_shard=3, **opts)

    a = run(str(local_in), str(tmp_path / "local"))
    b = run(remote_in, f"{s3_bucket}/out")
    assert (a.counts, a.quarantined) == (b.counts, b.quarantined)
    assert a.counts.get("quarantine", 0) or form in ("parquet", "hf", "documents", "splits")
    assert str(b.out) == f"{s3_bucket}/out"
    got = _download(f"{s3_bucket}/out", tmp_path / "got")
    sub = ROOTS.get(form, rel)
    roots = (str((local_in / sub).resolve()), f"{remote_in}/{sub}")
    splits = list(b.parts) or [None]
    for split in splits:
        a_dir, b_dir = (
            (tmp_path / "local", got) if split is None else (tmp_path / "local" / split, got / split)
        )
        assert assert_same_dataset(a_dir, b_dir, roots=roots) == sum(
            (a.parts[split] if split else a).counts.values()
        )
        manifest = Dataset(b_dir).manifest
        expected_root = f"{remote_in}/{sub}" if split is None else f"{remote_in}/{rel}/{split}"
        assert manifest.data_root == expected_root
    if form == "splits":  # and the truth files, the same bytes
        for split in splits:
            truth = f"truth/{split}.parquet"
            assert (got / truth).read_bytes() == (tmp_path / "local" / truth).read_bytes()
    assert storage.names(f"{s3_bucket}/out") == sorted(os.listdir(got))
    assert "_progress" not in os.listdir(got)  # the parts lived there and are gone
    assert not list((tmp_path / "tmp").glob("assay-ingest-part-*"))  # each removed once put
    assert (form == "hf") == (tmp_path / "tmp" / "assay-hf-inputs").is_dir()


def test_ingest_cli_reads_every_option_from_s3(tmp_path, s3_bucket, make_png):
    """The CLI takes URIs for the source, OUT, --mapping and --data-root; a rerun finds it complete."""
    from assay.pipelines.cli import cli

    local_in = tmp_path / "in"
    local_in.mkdir()
    _inputs(local_in, make_png)
    _upload(local_in, f"{s3_bucket}/in")
    rin = f"{s3_bucket}/in"
    args = [f"{rin}/csv/pairs.csv", f"{s3_bucket}/cli", "--mapping", f"{rin}/csv/mapping.yaml"]
    args += ["--data-root", f"{rin}/images", "--embed-images", "--executor", "local"]
    res = CliRunner().invoke(cli, ["ingest", *args])
    assert res.exit_code == 0, res.output
    assay.ingest(
        local_in / "csv" / "pairs.csv",
        tmp_path / "local",
        mapping=local_in / "csv" / "mapping.yaml",
        data_root=local_in / "images",
        embed_images=True,
        executor="local",
    )
    roots = (str((local_in / "images").resolve()), f"{rin}/images")
    assert assert_same_dataset(
        tmp_path / "local", _download(f"{s3_bucket}/cli", tmp_path / "got"), roots=roots
    )
    again = CliRunner().invoke(cli, ["ingest", *args])
    assert again.exit_code == 0, again.output
    missing = CliRunner().invoke(
        cli, ["ingest", f"{rin}/csv/pairs.csv", f"{s3_bucket}/x", "--data-root", f"{rin}/nope"]
    )
    assert missing.exit_code != 0 and "does not exist" in missing.output


KILLED_INGEST = """
import os, signal, sys
from assay.curation import ingest_merge
from assay.curation.dataset import ShardSink
from assay.curation.ingest import ingest

src, out, at = sys.argv[1:]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if at == "merge":  # every part read, nothing planned
    ingest_merge._plan_shards = die
else:  # two shards written
    real, written = ShardSink.write_shard, []

    def write_then_die(self, *args, **kwargs):
        if len(written) >= 2:
            die()
        written.append(1)
        return real(self, *args, **kwargs)

    ShardSink.write_shard = write_then_die
ingest(src, out, embed_images=True, mapping={"score": "score"}, chunk_bytes=64, rows_per_shard=2)
"""


@pytest.mark.parametrize("at", ["merge", "write"])
def test_an_ingest_killed_on_s3_resumes_from_its_parts_to_the_same_dataset(
    at, tmp_path, s3_bucket, make_png, monkeypatch
):
    from assay.curation import ingest_merge
    from assay.curation.ingest import ingest

    local_in = tmp_path / "in"
    local_in.mkdir()
    _inputs(local_in, make_png)
    _upload(local_in, f"{s3_bucket}/in")
    src, out = f"{s3_bucket}/in/jsonl", f"{s3_bucket}/out"
    res = subprocess.run([sys.executable, "-c", KILLED_INGEST, src, out, at], check=False)
    assert res.returncode == -9
    assert "manifest.json" not in storage.names(out)
    parts = [p for p in storage.files_under(f"{out}/_progress/parts") if p.endswith("/done.json")]
    assert len(parts) > 5  # many byte ranges, all read before the kill
    reads = []
    real = ingest_merge.run_parse_task
    monkeypatch.setattr(ingest_merge, "run_parse_task", lambda task: reads.append(task) or real(task))
    options = {"embed_images": True, "mapping": {"score": "score"}, "chunk_bytes": 64, "rows_per_shard": 2}
    ingest(src, out, **options)
    assert reads == []  # the finished parts were not read again
    ingest(local_in / "jsonl", tmp_path / "local", **options)
    roots = (str((local_in / "jsonl").resolve()), src)
    assert assert_same_dataset(tmp_path / "local", _download(out, tmp_path / "got"), roots=roots) > 10
    assert "_progress" not in storage.names(out)


@pytest.mark.cluster
def test_the_two_node_cluster_ingests_s3_inputs_to_the_local_result(
    tmp_path, s3_bucket, make_png, ray_cluster
):
    """The read and write tasks run on the worker node, which cannot see this process's files: the
    inputs, the parts and the plans all go through the bucket."""
    local_in = tmp_path / "in"
    local_in.mkdir()
    _inputs(local_in, make_png)
    _upload(local_in, f"{s3_bucket}/in")
    flags = ["--embed-images", "--map", "score=score", "--rows-per-shard", "3"]
    src, out = f"{s3_bucket}/in/jsonl", f"{s3_bucket}/out"
    res = subprocess.run(
        assay_cmd("ingest", src, out, *flags, "--ray-address", ray_cluster.address),
        capture_output=True,
        text=True,
        env=ray_cluster.env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assay.ingest(local_in / "jsonl", tmp_path / "local", executor="local", embed_images=True, map=["score=score"],
                 rows_per_shard=3)  # fmt: skip
    roots = (str((local_in / "jsonl").resolve()), src)
    assert assert_same_dataset(tmp_path / "local", _download(out, tmp_path / "got"), roots=roots) > 10
    assert ray_cluster.hidden, "unshare was not permitted: the worker node could read this process's files"


# ---------------------------------------------------------------------------------------------- export


def _export_source(tmp_path: Path, bucket: str, png) -> tuple[Dataset, Dataset]:
    """The same dataset locally and on s3:// (its media under an s3:// data root): inline images
    shared by two queries, images by path, a missing image, a text side, negatives."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(png((0, 0, 255)))
    (media / "sub").mkdir()
    (media / "sub" / "dog.png").write_bytes(png((0, 255, 0)))
    red = png((255, 0, 0))
    queries = [
        {"query_id": f"q{i}", "subset": "vqa", "task": "vqa", "instruction": "Answer:", "text": f"what {i}?",
         "image": {"bytes": red, "path": None}}
        for i in range(2)
    ] + [{"query_id": "q2", "subset": "ret", "task": "retrieval", "instruction": None, "text": "a cat", "image": None}]  # fmt: skip
    corpus = [
        {"doc_id": "d0", "subset": "vqa", "instruction": None, "text": "red", "image": None},
        {"doc_id": "d1", "subset": "vqa", "instruction": None, "text": "blue", "image": None},
        {"doc_id": "d2", "subset": "ret", "instruction": "Image:", "text": None, "image": {"bytes": None, "path": "cat.png"}},
        {"doc_id": "d3", "subset": "ret", "instruction": None, "text": "a dog", "image": {"bytes": None, "path": "sub/dog.png"}},
        {"doc_id": "d4", "subset": "ret", "instruction": None, "text": None, "image": {"bytes": None, "path": "gone.png"}},
    ]  # fmt: skip
    pairs = [
        {"query_id": "q0", "doc_id": "d0", "label": "positive", "judge_p_yes": 0.9},
        {"query_id": "q0", "doc_id": "d3", "label": "negative"},
        {"query_id": "q0", "doc_id": "d1", "label": "hard_negative", "rank": 1},
        {"query_id": "q1", "doc_id": "d1", "label": "positive"},
        {"query_id": "q2", "doc_id": "d2", "label": "positive"},
        {"query_id": "q2", "doc_id": "d3", "label": "hard_negative"},
        {"query_id": "q2", "doc_id": "d4", "label": "negative"},
    ]
    tables = {"queries": queries, "corpus": corpus, "pairs": pairs}
    _upload(media, f"{bucket}/media")
    local = write_dataset(tmp_path / "ds", tables, data_root=str(media), rows_per_shard=2)
    remote = write_dataset(f"{bucket}/ds", tables, data_root=f"{bucket}/media", rows_per_shard=2)
    return local, remote


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_file_export_from_s3_to_s3_is_the_local_export(tmp_path, s3_bucket, make_png):
    local, remote = _export_source(tmp_path, s3_bucket, make_png)
    (tmp_path / "exp").mkdir()
    runs = [("jsonl", "train.jsonl", {"num_negatives": 2}), ("parquet", "pairs.parquet", {})]
    for fmt, name, opts in runs:  # the second finds the first's images there: writes none
        a = assay.export(local, tmp_path / "exp" / name, format=fmt, copy_images=True, **opts)
        b = assay.export(remote, f"{s3_bucket}/exp/{name}", format=fmt, copy_images=True, **opts)
        assert a.details["rows"] == b.details["rows"] > 0 and a.details["skipped"] == b.details["skipped"]
        assert a.details["images_written"] == b.details["images_written"]
        assert b.details["path"] == f"{s3_bucket}/exp/{name}"
        assert b.details["images_dir"] == f"{s3_bucket}/exp/images"
    assert runs and a.details["images_written"] == 0
    got = _download(f"{s3_bucket}/exp", tmp_path / "got")
    want = _files(tmp_path / "exp")
    assert sorted(_files(got)) == sorted(want) and len([n for n in want if n.startswith("images/")]) == 3
    assert _files(got)["train.jsonl"] == want["train.jsonl"]  # the same bytes
    for name in want:
        if name.endswith(".parquet"):
            assert pq.read_table(got / name).equals(pq.read_table(tmp_path / "exp" / name))
        else:
            assert (got / name).read_bytes() == want[name], name
    with pytest.raises(ExportError, match="already exists"):
        assay.export(remote, f"{s3_bucket}/exp/train.jsonl", format="jsonl")


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_folder_export_from_s3_to_s3_is_the_local_export(fmt, tmp_path, s3_bucket, make_png):
    local, remote = _export_source(tmp_path, s3_bucket, make_png)
    a = assay.export(local, tmp_path / "exp", format=fmt)  # images by path: their full names
    b = assay.export(remote, f"{s3_bucket}/exp", format=fmt)
    assert (a.counts, a.details["skipped"], a.details["images_written"]) == (
        b.counts,
        b.details["skipped"],
        b.details["images_written"],
    )
    got = _download(f"{s3_bucket}/exp", tmp_path / "got")
    assert sorted(os.listdir(got)) == sorted(os.listdir(tmp_path / "exp"))  # no marker left
    assert _files(got / "images") == _files(tmp_path / "exp" / "images")  # the inline images
    if fmt == "parquet":
        ta, tb = pq.read_table(tmp_path / "exp" / "pairs.parquet"), pq.read_table(got / "pairs.parquet")
    else:
        import datasets

        ta = datasets.load_from_disk(str(tmp_path / "exp")).data.table
        tb = datasets.load_from_disk(str(got)).data.table
    media = str((tmp_path / "media").resolve())
    doc_images = [p for p in tb.column("doc_image").to_pylist() if p]
    assert doc_images and all(p.startswith(f"{s3_bucket}/media/") for p in doc_images)
    swapped = [p.replace(f"{s3_bucket}/media", media) if p else p for p in tb.column("doc_image").to_pylist()]
    tb = tb.set_column(tb.column_names.index("doc_image"), "doc_image", pa.array(swapped, pa.string()))
    assert ta.equals(tb.cast(ta.schema))
    info = json.loads((got / "export.json").read_text())
    assert info["rows"] == a.counts["rows"] and info["source"]["path"] == f"{s3_bucket}/ds"
    # --overwrite replaces it (and only an export is ever replaced)
    again = assay.export(remote, f"{s3_bucket}/exp", format=fmt, where="subset == 'vqa'", overwrite=True)
    assert again.counts["rows"] < b.counts["rows"]
    storage.put_bytes(f"{s3_bucket}/other/notes.txt", b"mine")
    with pytest.raises(ExportError, match="no earlier export"):
        assay.export(remote, f"{s3_bucket}/other", format=fmt, overwrite=True)


KILLED_EXPORT = """
import os, signal, sys, threading
import assay
from assay.curation import storage

ds, out, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, done, one_at_a_time = storage._put_file, [], threading.Lock()

def put_then_die(fs, lpath, rpath):
    with one_at_a_time:
        if len(done) >= after:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-upload, `after` files put
        real(fs, lpath, rpath)
        done.append(rpath)

storage._put_file = put_then_die
assay.export(ds, out, format="parquet", copy_images=True)
"""


def test_a_killed_folder_export_looks_unfinished_and_its_rerun_redoes_it(tmp_path, s3_bucket, make_png):
    local, remote = _export_source(tmp_path, s3_bucket, make_png)
    out = f"{s3_bucket}/exp"
    res = subprocess.run([sys.executable, "-c", KILLED_EXPORT, f"{s3_bucket}/ds", out, "1"], check=False)
    assert res.returncode == -9  # it died in the upload
    left = storage.names(out)
    assert INCOMPLETE in left and "export.json" not in left and "pairs.parquet" not in left
    assert storage.files_under(out, ".png")  # part of it went up: a half export, marked as one
    b = assay.export(remote, out, format="parquet", copy_images=True)  # no --overwrite needed
    a = assay.export(local, tmp_path / "exp", format="parquet", copy_images=True)
    got = _download(out, tmp_path / "got")
    assert sorted(_files(got)) == sorted(_files(tmp_path / "exp"))
    assert pq.read_table(got / "pairs.parquet").equals(pq.read_table(tmp_path / "exp" / "pairs.parquet"))
    assert a.counts == b.counts


def test_a_failed_export_to_s3_leaves_nothing(tmp_path, s3_bucket, make_png, monkeypatch):
    _, remote = _export_source(tmp_path, s3_bucket, make_png)
    real, calls, fail_at = storage._put_file, [], {"n": 3, "suffix": ""}

    def put_then_fail(fs, lpath, rpath):
        calls.append(rpath)
        if len(calls) >= fail_at["n"] and rpath.endswith(fail_at["suffix"]):
            raise OSError("the store went away")
        real(fs, lpath, rpath)

    monkeypatch.setattr(storage, "_put_file", put_then_fail)
    with pytest.raises(OSError, match="went away"):
        assay.export(remote, f"{s3_bucket}/exp", format="hf", copy_images=True)
    assert storage.names(f"{s3_bucket}/exp") == []
    calls.clear()
    fail_at.update(n=1, suffix="train.jsonl")
    with pytest.raises(OSError, match="went away"):  # a file: its images go up, then the file fails
        assay.export(remote, f"{s3_bucket}/files/train.jsonl", format="jsonl", copy_images=True)
    assert len(calls) == 4 and calls[-1].endswith("train.jsonl")  # 3 images, then the file
    assert storage.files_under(f"{s3_bucket}/files") == []  # the images it put are removed again
    monkeypatch.setattr(storage, "_put_file", real)
    done = assay.export(remote, f"{s3_bucket}/exp", format="hf", copy_images=True)
    assert done.counts["rows"] > 0 and "export.json" in storage.names(f"{s3_bucket}/exp")
