"""``assay mine --ray-address ADDRESS``: the mining stage run as one Ray task on a cluster.

The stage itself (``mining.stage.mine_dataset``, through ``assay.mine``) is unchanged: the task calls
it on whichever node the cluster gives it (one CPU, or one GPU with ``--device cuda``), and the
driver waits for its :class:`~assay.pipelines.result.Result`. The nodes of a cluster share no disk,
so everything the task reads and writes should be where every node can reach it: the dataset, the
output, the encoder (a checkpoint on object storage is copied once to the node's local cache, see
``mining.encoders``) and the embedding cache (a URI: Parquet segments, see ``mining.embed_cache``).
A local path is read on the node the task runs on, which is only right where nodes mount the same
disk. The user's opt-in to pickle files (``ASSAY_ALLOW_PICKLE``) goes with the task; the node's own
``ASSAY_CACHE_DIR`` (its local disk) is used for its caches.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.curation.safety import ALLOW_ENV
from assay.pipelines.result import Result


def _location(source: Any) -> Any:
    """A dataset argument as the task can take it: a Dataset by its location."""
    return storage.absolute(source.root) if isinstance(source, Dataset) else source


def _mine_task(options: dict[str, Any]) -> dict[str, Any]:
    from assay.pipelines.api_models import mine

    return mine(**options).to_json()


def mine_on_cluster(address: str, options: dict[str, Any]) -> Result:
    """Run ``assay.mine(**options)`` as one task on the Ray cluster at ``address``."""
    import ray

    owns = not ray.is_initialized()
    if owns:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        forwarded = {ALLOW_ENV: os.environ[ALLOW_ENV]} if os.environ.get(ALLOW_ENV) else {}
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=True,
            runtime_env={"env_vars": forwarded} if forwarded else None,
        )
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        print(
            f"ray: connected to the cluster at {address} ({len(nodes)} node(s), {int(res.get('CPU', 0))} "
            f"CPUs, {int(res.get('GPU', 0))} GPUs); mining in one task",
            file=sys.stderr,
        )
        options = dict(options, ray_address=None, no_progress=True)
        options["dataset"] = _location(options["dataset"])
        corpus = options.get("corpus") or ()
        options["corpus"] = (
            [_location(c) for c in corpus] if isinstance(corpus, list | tuple) else _location(corpus)
        )
        gpus = 1 if options.get("device") == "cuda" else 0
        task = ray.remote(_mine_task).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        return Result.from_json(ray.get(task.remote(options)))
    finally:
        if owns:
            ray.shutdown()
