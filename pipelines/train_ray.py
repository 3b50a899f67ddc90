"""Data-parallel training under Ray Train: the loop of ``assay train``, run by W workers at once.

``train_distributed(config, num_workers=W)`` starts W workers with Ray Train's ``TorchTrainer``,
which sets up ``torch.distributed`` among them; each worker then runs ``training.trainer.train``,
the very loop a single process runs. The loop sees the process group and does the rest: rank r
takes every W-th unit of each global batch, gradients are all-reduced before every optimizer step
(stage 1 and the reranker sum token-weighted gradients, so W workers compute what one process
would, up to float rounding), and rank 0 writes the checkpoints, ``train_log.jsonl`` and
``complete.json`` into ``config.output`` as a single process would. A rerun resumes from them with
any number of workers, or none. From the command line: ``assay train CONFIG --workers W``, with
``--use-gpu`` and ``--ray-address ADDRESS``.

- CPUs: one worker per CPU, process group ``gloo``. On a local runtime with fewer CPUs than
  workers, the workers share them (slower, same result).
- GPUs (``use_gpu=True``): one worker per GPU, process group ``cpu:gloo,cuda:nccl`` (gradients over
  NCCL, the loop's small CPU tensors over gloo). The config's ``precision`` applies on every
  worker: ``auto`` is bf16 autocast on a GPU with fp32 master weights and optimizer.
- ``address=None`` starts (or reuses) a local Ray runtime with this machine's CPUs and GPUs; an
  address such as ``ray://head:10001`` or ``auto`` runs on that cluster. Its nodes need assay
  installed with the ``train`` extra, in the same Python environment as the driver, and every
  path of the config (data, init, output) must be a URI (``s3://...``: nodes that share no disk)
  or on a file system all workers share. Relative paths are taken from the driver's current
  directory, as in a single process.

With an output URI each worker trains in a local working folder of its node and rank 0 publishes
every checkpoint to the URI, a commit marker last (``training.remote_run``); a rerun resumes from
the URI's last committed checkpoint on any node. Ray Train's own run state goes to
``<output>/.ray-train`` (on the output's store, through its fsspec filesystem), not ``~/ray_results``. A worker's
error (say a ``TrainingError`` for a missing ``init``) is raised here as a ``TrainingError`` with
the worker's message, not as Ray's wrapped traceback (the worker's log still shows its own).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load on use: the setup hook below must import fast
    from assay.training.config import TrainConfig

#: Without Ray's dashboard (assay installs ``ray[data]``, not ``ray[default]``) Ray Train's
#: placement-group cleaner cannot query actor states and warns about it every second.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_train() -> None:
    """Worker-process setup hook of the runtimes this module starts: drops Ray Train's chatter."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_ray(address: str | None) -> Any:
    """Connect to ``address``, else start (or reuse) a local runtime; say which on stderr."""
    import ray

    if ray.is_initialized():
        where = "using the runtime already started in this process"
    else:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        kwargs: dict[str, Any] = {
            "logging_level": logging.WARNING,
            "log_to_driver": True,
            "runtime_env": {"worker_process_setup_hook": f"{__name__}.quiet_ray_train"},
        }
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = os.cpu_count()
            kwargs["include_dashboard"] = False
        ray.init(**kwargs)
        where = f"connected to the cluster at {address}" if address else "started a local runtime"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    gpus = f", {int(res['GPU'])} GPUs" if res.get("GPU") else ""
    size = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {int(res.get('CPU', 0))} CPUs{gpus}"
    print(f"ray: {where} ({size})", file=sys.stderr)
    return ray


def _worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: the ordinary loop on this worker's device; rank 0's return reaches fit()."""
    import socket

    import ray.train.torch
    import torch.distributed as dist

    from assay.curation import storage
    from assay.training.config import config_from_dict
    from assay.training.trainer import TrainingError, train

    config = config_from_dict(loop_config["config"], "config (on a Ray Train worker)")
    # Ray Train moves workers into a directory of its own; relative paths are the driver's.
    cwd = loop_config["cwd"]
    if os.path.isdir(cwd):
        os.chdir(cwd)
    elif not all(
        os.path.isabs(p) or storage.is_remote(p) for p in [*config.data, config.output, config.init or "/"]
    ):
        raise TrainingError(
            f"the config's relative paths are under {cwd}, which node {socket.gethostname()} "
            "lacks: on a cluster give URIs (s3://...) or absolute paths on a file system every node shares"
        )
    if loop_config["quiet_transformers"]:  # as the driver is (assay train: no per-file bars)
        from assay.pipelines.result import quiet_transformers

        quiet_transformers()
    final = train(config, device=ray.train.torch.get_device())
    return {"final": str(final), "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def _root_cause(error: BaseException) -> str:
    """What the workers (or Ray Train's controller) actually raised, one line per distinct message."""
    from assay.training.trainer import TrainingError

    failures: dict[int, BaseException] = getattr(error, "worker_failures", None) or {}
    if not failures:
        failures = {-1: getattr(error, "controller_failure", None) or error}
    messages: dict[str, list[int]] = {}
    for rank, cause in sorted(failures.items()):
        while getattr(cause, "_base_exc", None) is not None:  # Ray's wrapper of a user exception
            cause = cause._base_exc
        text = str(cause) if isinstance(cause, TrainingError) else f"{type(cause).__name__}: {cause}"
        messages.setdefault(text, []).append(rank)
    if len(messages) == 1:
        return next(iter(messages))
    return "\n".join(f"worker {', '.join(map(str, ranks))}: {text}" for text, ranks in messages.items())


def train_distributed(
    config: TrainConfig,
    *,
    num_workers: int,
    use_gpu: bool = False,
    address: str | None = None,
    cpus_per_worker: float | None = None,
) -> Path:
    """Run one stage on ``num_workers`` Ray Train workers; returns the final checkpoint's path.

    ``cpus_per_worker`` defaults to 1, or to an equal share of a local runtime's CPUs when it has
    fewer than ``num_workers``. A local runtime must have a GPU per worker when ``use_gpu``.
    """
    from assay.curation import storage
    from assay.training.trainer import TrainingError, final_checkpoint

    if num_workers < 1:
        raise TrainingError(f"num_workers must be >= 1, got {num_workers}")
    if final_checkpoint(config.output) is not None:  # complete: the loop returns it at once
        from assay.training.trainer import train

        return train(config)

    ray = _init_ray(address)
    from ray.train import LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    res = ray.cluster_resources()
    local = not address
    if use_gpu and local and res.get("GPU", 0) < num_workers:
        raise TrainingError(
            f"{num_workers} GPU workers asked for, but this Ray runtime has {int(res.get('GPU', 0))} "
            "GPUs (one worker per GPU)"
        )
    if cpus_per_worker is None:
        cpus = res.get("CPU", 0)
        cpus_per_worker = 1.0 if not local or cpus >= num_workers else cpus / num_workers
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    backend = "cpu:gloo,cuda:nccl" if use_gpu else "gloo"
    print(
        f"ray train: {num_workers} workers, {backend}, {cpus_per_worker:g} CPU"
        + (" + 1 GPU" if use_gpu else "")
        + " each",
        file=sys.stderr,
    )
    if local:  # one machine is not preempted, and the watcher is one more process to start
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The trainer prints as in one process (Ray Train's print patch echoes each line twice).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from transformers.utils import logging as hf_logging

    loop_config = {
        "config": config.to_dict(),
        "cwd": os.getcwd(),
        "quiet_transformers": not hf_logging.is_progress_bar_enabled(),
    }
    if storage.is_remote(config.output):  # Ray Train's state beside the run, on the same store
        import pyarrow.fs

        state = storage.path(storage.join(storage.absolute(config.output), ".ray-train"))
        storage_path = state.path
        storage_filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(state.fs))
    else:
        storage_path, storage_filesystem = str(Path(config.output).resolve() / ".ray-train"), None
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"stage-{config.stage}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise TrainingError(_root_cause(e)) from None
    final = final_checkpoint(config.output)
    if final is None:
        raise TrainingError(f"Ray Train finished, but {storage.display(config.output)} holds no complete run")
    world = (result.return_value or {}).get("world_size", num_workers)
    shown = storage.display(final)
    print(f"ray train: stage {config.stage} trained by {world} workers -> {shown}", file=sys.stderr)
    return final
