"""Training and evaluation on object storage (a local S3 server): `assay train` with its data and its
output on s3:// computes what a local run computes, bit for bit; a run killed on s3:// resumes from the
URI alone (another machine: an empty local cache); a checkpoint on s3:// is committed by a marker put
last and read by `assay eval` and `local_checkpoint` only when committed and verified; and
`assay train --workers 2` on the two-node cluster (whose worker node cannot see this process's
scratch folders) trains s3:// data into an s3:// run folder.

The datasets keep their images as files under the data root (an s3:// data root on the s3:// side),
so the images too are read from the store. Every run is stage 1 of the tiny model on the colours,
a few steps long.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers.colours import TINY, colour_dataset
from helpers.kill import assay_cmd, run_and_kill

pytest_plugins = ["helpers.s3_server", "helpers.ray_cluster"]  # their fixtures: s3, s3_bucket, ray_cluster
s3fs = pytest.importorskip("s3fs")
torch = pytest.importorskip("torch")

import assay  # noqa: E402
from assay.curation import storage  # noqa: E402
from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.training.checkpoint import (  # noqa: E402
    COMMIT_MARKER,
    CheckpointError,
    UnsafeCheckpointError,
    cached_checkpoint_path,
    local_checkpoint,
    publish_checkpoint,
)
from assay.training.config import config_from_dict  # noqa: E402
from assay.training.remote_run import prepare, working_dir  # noqa: E402
from assay.training.trainer import COMPLETE_FILE, LOG_FILE, final_checkpoint, train  # noqa: E402

pytestmark = pytest.mark.objectstore

STAGE1 = {
    "stage": "1",
    "tiny": TINY,
    "tokens_per_tile": 16,
    "lr": 3e-3,
    "batch_size": 8,
    "mini_batch": 4,
    "epochs": 4,
    "max_steps": 6,
    "save_every": 2,
    "keep_checkpoints": 2,
    "progress": False,
}


def _with_image_files(inline: Path, root: Path) -> dict[str, list[dict]]:
    """The colours dataset's tables with every image moved to a file under ``root`` (by path)."""
    ds = Dataset(inline)
    tables: dict[str, list[dict]] = {}
    for table in ("queries", "corpus", "pairs"):
        rows = [r for name in ds.shards(table) for r in ds.read_shard(table, name).to_pylist()]
        for r in rows:
            image = r.get("image")
            if image and image.get("bytes"):
                key = r.get("query_id") or r.get("doc_id")
                (root / "img").mkdir(parents=True, exist_ok=True)
                (root / "img" / f"{key}.png").write_bytes(image["bytes"])
                r["image"] = {"bytes": None, "path": f"img/{key}.png"}
        tables[table] = rows
    return tables


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """This process's cache root (working folders, checkpoint copies): a scratch folder, not ~/.cache."""
    root = tmp_path_factory.mktemp("assay-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASSAY_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> tuple[Path, dict[str, list[dict]], Path]:
    """(the local dataset, its tables, its data root): the colours, images as files."""
    base = tmp_path_factory.mktemp("colours")
    tables = _with_image_files(colour_dataset(base / "inline"), base / "root")
    write_dataset(base / "ds", tables, data_root=str(base / "root"))
    return base / "ds", tables, base / "root"


@pytest.fixture
def s3_data(local_data, s3_bucket) -> str:
    """The same dataset on s3://, its images under an s3:// data root."""
    _, tables, root = local_data
    s3fs.S3FileSystem().put(str(root), f"{s3_bucket}/root", recursive=True)
    write_dataset(f"{s3_bucket}/ds", tables, data_root=f"{s3_bucket}/root")
    return f"{s3_bucket}/ds"


@pytest.fixture(scope="module")
def reference(local_data, cache_dir, tmp_path_factory) -> Path:
    """The local run every s3:// run is compared with: its final checkpoint."""
    out = tmp_path_factory.mktemp("local") / "stage1"
    t0 = time.perf_counter()
    final = train(config_from_dict({**STAGE1, "data": [str(local_data[0])], "output": str(out)}))
    print(f"local run: {time.perf_counter() - t0:.1f} s")
    return final


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(checkpoint) / "model.safetensors")


def _losses(log_text: str) -> list[float]:
    return [json.loads(line)["loss"] for line in log_text.splitlines() if line.strip()]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_with_data_and_output_on_s3_computes_the_local_run(reference, s3_data, s3_bucket, cache_dir):
    uri = f"{s3_bucket}/run/stage1"
    t0 = time.perf_counter()
    result = assay.train({**STAGE1, "data": [s3_data], "output": uri})
    print(f"s3 run: {time.perf_counter() - t0:.1f} s")
    final = result.out

    assert str(final) == f"{uri}/step-000006" == str(final_checkpoint(uri))
    assert result.details["output"] == uri and result.counts == {"steps": 6}
    # keep_checkpoints: 2 on the URI too; each one committed by its marker, the run by complete.json
    assert storage.names(uri) == [COMPLETE_FILE, "step-000004", "step-000006", LOG_FILE]
    for step in ("step-000004", "step-000006"):
        marker = json.loads(storage.read_bytes(f"{uri}/{step}/{COMMIT_MARKER}"))
        assert marker["step"] == int(step[-6:]) and marker["format"] == "assay-checkpoint-commit"
    local = local_checkpoint(final)
    assert _same_weights(local, reference)  # bit for bit: same batches, same inputs, same steps
    log = storage.path(f"{uri}/{LOG_FILE}").read_text()
    assert _losses(log) == _losses((reference.parent / LOG_FILE).read_text())
    # the working folder is gone; the final checkpoint moved into the cache local_checkpoint reads
    assert not working_dir(uri).exists()
    assert local.is_relative_to(cache_dir / "checkpoints")

    # a rerun of the complete stage returns it at once
    assert str(assay.train({**STAGE1, "data": [s3_data], "output": uri}).out) == str(final)
    # killed after its last checkpoint was committed, before complete.json: the rerun only finishes
    storage.remove_file(f"{uri}/{COMPLETE_FILE}")
    assert str(assay.train({**STAGE1, "data": [s3_data], "output": uri}).out) == str(final)
    assert storage.is_file(f"{uri}/{COMPLETE_FILE}") and _same_weights(local_checkpoint(final), reference)


def test_a_lora_stage_starts_from_a_checkpoint_on_s3(reference, local_data, s3_data, s3_bucket, tmp_path):
    """init: a checkpoint URI (fetched, verified); the LoRA adapter is published under adapter/."""
    init = f"{s3_bucket}/run/stage1/step-000006"
    publish_checkpoint(reference, init)
    stage2 = {"stage": "2", "lora": {"rank": 4}, "lr": 1e-3, "batch_size": 8, "mini_batch": 4}
    stage2 |= {"max_steps": 2, "progress": False}
    here = train(config_from_dict({**stage2, "data": [str(local_data[0])], "init": str(reference),
                                   "output": str(tmp_path / "stage2")}))  # fmt: skip
    there = assay.train({**stage2, "data": [s3_data], "init": init, "output": f"{s3_bucket}/run/stage2"}).out
    assert storage.is_file(f"{there}/adapter/adapter_model.safetensors")
    copy = local_checkpoint(there)
    assert _same_weights(copy, here)
    assert (
        json.loads((copy / "checkpoint.json").read_text())["parent"]
        == json.loads((here / "checkpoint.json").read_text())["parent"]
    )


def test_a_run_killed_on_s3_resumes_from_the_uri_alone(
    local_data, s3_data, s3_bucket, cache_dir, tmp_path, monkeypatch
):
    config = {**STAGE1, "max_steps": 10, "data": [s3_data], "output": f"{s3_bucket}/run/stage1"}
    uri = config["output"]
    whole = train(
        config_from_dict({**config, "data": [str(local_data[0])], "output": str(tmp_path / "whole")})
    )
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "ASSAY_CACHE_DIR": str(tmp_path / "machine-a"), "PYTHONUNBUFFERED": "1"}
    killed = run_and_kill(
        assay_cmd("train", str(path)), storage.path(uri), f"step-000002/{COMMIT_MARKER}", env=env
    )
    assert killed, "the run finished before it could be killed: make it longer"
    assert final_checkpoint(uri) is None

    committed = sorted(n for n in storage.names(uri) if storage.is_file(f"{uri}/{n}/{COMMIT_MARKER}"))
    assert committed and committed[-1] < "step-000010"
    # what a kill mid-upload leaves: files of the next checkpoint, no marker; nobody may trust it
    nxt = f"{uri}/step-{int(committed[-1][-6:]) + 2:06d}"
    assert nxt < f"{uri}/step-000010"
    storage.remove_file(f"{nxt}/{COMMIT_MARKER}")
    storage.put_bytes(f"{nxt}/model.safetensors", b"half an upload")
    with pytest.raises(CheckpointError, match="no _committed.json: not a committed checkpoint"):
        local_checkpoint(nxt)
    print(f"killed after {committed[-1]} was committed")

    # on machine A, a rerun would resume from its working folder's copy (the very checkpoint committed)
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "machine-a"))
    found = prepare(config_from_dict(config), 0, LOG_FILE).resume
    assert found == working_dir(uri) / committed[-1] and not (tmp_path / "machine-a" / "checkpoints").exists()
    # another machine: nothing of machine A's working folder or cache
    monkeypatch.setenv("ASSAY_CACHE_DIR", str(tmp_path / "machine-b"))
    resumed = assay.train(config)
    assert str(resumed.out) == f"{uri}/step-000010"
    assert _same_weights(local_checkpoint(resumed.out), whole)
    assert _losses(storage.path(f"{uri}/{LOG_FILE}").read_text()) == _losses(
        (whole.parent / LOG_FILE).read_text()
    )
    assert storage.names(uri) == [COMPLETE_FILE, "step-000008", "step-000010", LOG_FILE]


def test_eval_reads_a_checkpoint_and_a_dataset_on_s3(reference, local_data, s3_data, s3_bucket, tmp_path):
    from click.testing import CliRunner

    from assay.pipelines.cli import cli

    uri = f"{s3_bucket}/ckpt/step-000006"
    publish_checkpoint(reference, uri)
    here = assay.evaluate(reference, local_data[0], out=tmp_path / "local.json", device="cpu", batch_size=8)
    there = assay.evaluate(uri, s3_data, out=f"{s3_bucket}/metrics.json", device="cpu", batch_size=8)
    for key in ("overall", "per_subset", "per_task", "chance_p_at_1", "counts"):
        assert there.details[key] == here.details[key], key
    assert here.details["overall"]["queries"] == 20
    assert there.details["checkpoint"] == uri and there.details["dataset"] == s3_data
    assert json.loads(storage.read_bytes(f"{s3_bucket}/metrics.json"))["overall"] == here.details["overall"]

    res = CliRunner().invoke(
        cli, ["eval", uri, s3_data, "--device", "cpu", "--out", str(tmp_path / "cli.json")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli.json").read_text())["overall"] == here.details["overall"]


def test_local_checkpoint_takes_only_committed_verified_safetensors(reference, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/ckpt/step-000006"
    marker = publish_checkpoint(reference, uri)
    cache = tmp_path / "cache"
    copy = local_checkpoint(uri, cache_dir=cache)
    assert copy == cached_checkpoint_path(marker, "step-000006", cache) and _same_weights(copy, reference)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in reference.iterdir())
    storage.remove_file(f"{uri}/model.safetensors")  # fetched once: the copy is what the marker commits
    assert local_checkpoint(uri, cache_dir=cache) == copy
    assert local_checkpoint(reference) == reference  # a local path is itself

    publish_checkpoint(reference, uri)
    storage.put_bytes(f"{uri}/pytorch_model.bin", b"not read")  # planted beside a committed checkpoint
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not in the manifest"):
        local_checkpoint(uri, cache_dir=tmp_path / "other")

    publish_checkpoint(reference, uri)
    storage.put_bytes(f"{uri}/model.safetensors", b"tampered")  # committed, then changed
    with pytest.raises(CheckpointError, match="model.safetensors has sha256"):
        local_checkpoint(uri, cache_dir=tmp_path / "third")
    assert not list((tmp_path / "third").rglob("*.safetensors"))  # nothing half-fetched left

    storage.remove_file(f"{uri}/{COMMIT_MARKER}")
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        local_checkpoint(uri, cache_dir=tmp_path / "fourth")

    manifest = json.loads((reference / "checkpoint.json").read_text())
    manifest["files"].append({"name": "extra.pt", "sha256": "0" * 64, "bytes": 1})
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    (bad / "checkpoint.json").write_text(json.dumps(manifest))
    (bad / "extra.pt").write_bytes(b"x")
    publish_checkpoint(bad, f"{s3_bucket}/bad")
    with pytest.raises(UnsafeCheckpointError, match="pickle files"):
        local_checkpoint(f"{s3_bucket}/bad", cache_dir=tmp_path / "fifth")


@pytest.mark.cluster
def test_two_workers_on_the_two_node_cluster_train_s3_data_into_s3(
    reference, s3_data, s3_bucket, ray_cluster, tmp_path
):
    uri = f"{s3_bucket}/run/stage1"
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump({**STAGE1, "data": [s3_data], "output": uri}))
    env = {**ray_cluster.env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    t0 = time.perf_counter()
    res = subprocess.run(
        assay_cmd("train", str(path), "--workers", "2", "--ray-address", ray_cluster.address),
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )
    print(f"cluster run: {time.perf_counter() - t0:.1f} s")
    try:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
        assert f"final checkpoint: {uri}/step-000006" in res.stdout
        assert "ray train: stage 1 trained by 2 workers" in res.stderr
        assert storage.is_file(f"{uri}/step-000006/{COMMIT_MARKER}") and final_checkpoint(uri) is not None
        print("on s3:", storage.files_under(uri))
        assert {COMPLETE_FILE, "step-000004", "step-000006", LOG_FILE} <= set(storage.names(uri))
        ours, ref = _weights(local_checkpoint(f"{uri}/step-000006")), _weights(reference)
        diff = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ours)
        assert diff < 1e-4, f"2 workers on the cluster differ from 1 local process by {diff}"
        assert ray_cluster.hidden, (
            "unshare was not permitted: the worker node could read this process's files"
        )
    finally:  # the worker node's cache root is its own (~/.cache/assay unless the cluster's env says)
        node_cache = Path(ray_cluster.env.get("ASSAY_CACHE_DIR") or Path.home() / ".cache" / "assay")
        shutil.rmtree(node_cache / "train" / working_dir(uri).parent.name, ignore_errors=True)
        if storage.is_file(f"{uri}/step-000006/{COMMIT_MARKER}"):
            marker = storage.read_bytes(f"{uri}/step-000006/{COMMIT_MARKER}")
            shutil.rmtree(
                cached_checkpoint_path(marker, "x", node_cache / "checkpoints").parent, ignore_errors=True
            )
        for folder in ("train", "checkpoints"):  # gone if this test made them
            with contextlib.suppress(OSError):
                (node_cache / folder).rmdir()
