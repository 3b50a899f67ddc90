"""The object-storage and cluster fixtures themselves: a bucket on the local S3 server takes and gives
back objects; on the two-node cluster a task runs on the worker node, cannot see the test's scratch
folder, and reaches the S3 server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest_plugins = ["helpers.s3_server", "helpers.ray_cluster"]  # their fixtures: s3, s3_bucket, ray_cluster
s3fs = pytest.importorskip("s3fs")

# The driver runs in a process of its own, so that this process's Ray (other tests') is untouched.
DRIVER = """
import json, os, sys
import ray

address, secret, src, dst = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])

@ray.remote(num_cpus=1)
def probe(secret, src, dst):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe(dst, fs.cat(src) + b", and back")
    return {"node": ray.get_runtime_context().get_node_id(), "sees_secret": os.path.exists(secret)}

print(json.dumps({"head": head, **ray.get(probe.remote(secret, src, dst))}))
"""


@pytest.mark.objectstore
def test_s3_bucket_takes_and_gives_back_an_object(s3_bucket):
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/a/b.txt", b"hello")
    assert fs.cat(f"{s3_bucket}/a/b.txt") == b"hello"
    assert fs.ls(s3_bucket) == [f"{s3_bucket.removeprefix('s3://')}/a"]


@pytest.mark.objectstore
@pytest.mark.cluster
def test_a_task_runs_on_the_worker_node_blind_to_local_scratch(ray_cluster, s3_bucket, tmp_path):
    print(f"two-node cluster started in {ray_cluster.started_in:.1f} s; hidden: {ray_cluster.hidden}")
    secret = tmp_path / "secret.txt"
    secret.write_text("only on the driver's machine")
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/in.txt", b"from the test")

    res = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER,
            ray_cluster.address,
            str(secret),
            f"{s3_bucket}/in.txt",
            f"{s3_bucket}/out.txt",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ray_cluster.env,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])

    assert seen["node"] != seen["head"]
    assert fs.cat(f"{s3_bucket}/out.txt") == b"from the test, and back"
    assert ray_cluster.hidden, "unshare was not permitted: the worker node could read this process's files"
    assert not seen["sees_secret"]
