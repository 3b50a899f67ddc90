"""The built-in trainer: one loop for the three stages of PAPER.md and the reranker.

``train(config)`` runs one stage into ``config.output``:

=========  =====================================================  ===================================
stage      what it learns from                                    loss
=========  =====================================================  ===================================
1          gold pairs as (image, question) -> answer samples      next-token cross-entropy
reranker   (query, candidate) under the judge prompt -> yes / no  cross-entropy of the two label logits
2          gold pairs, in-batch negatives (+ mined hard ones)     InfoNCE, GradCache
3          gold pairs + judged hard negatives (<= 12 per query)   InfoNCE, GradCache
=========  =====================================================  ===================================

In the contrastive stages a doc is never pushed away from a query it belongs to: the query's other
positives and its false negatives (pairs labelled ``false_negative`` or judged ``yes``) are masked
out of its softmax wherever they turn up in the batch. (``training.steps`` holds what one step of
each stage does, and ``training.trainer_model`` the model a run starts from.)

A step only computes. Its inputs (image tiles, token ids, labels, masks) are made on a background
thread while the steps before it run (``training.inputs.Prefetcher``), from the input cache
(``input_cache``, by default ``OUTPUT/../cache/inputs``: beside the run's other steps, which share
it), so the processor runs once per image and prompt, not once per batch, epoch and stage. The
tensors are the processor's, bit for bit; ``input_cache: off`` runs the processor on every batch
instead. Each line of ``train_log.jsonl`` says how long its step took (``seconds``) and how much of
that it waited for its inputs (``input_wait_seconds``).

Every ``save_every`` steps and at the end, a checkpoint ``step-NNNNNN`` (see ``training.checkpoint``)
holds the weights, optimizer, scheduler and RNG state. A rerun of the same config resumes from the
latest complete one and computes what the uninterrupted run would have: batches are a function of
(seed, epoch) and the state is restored exactly; the unfinished save a kill may have left (a
hidden ``.tmp-*`` folder) is removed first. ``complete.json`` names the final checkpoint;
a rerun of a complete stage returns it at once. With LoRA the checkpoint's weights are the merged
model (usable as is for eval and mining) and ``adapter/`` holds the adapter the run resumes from,
on top of the stage's ``init`` model (checked by its weights hash).

The output may be a URI (``s3://bucket/run/stage1``): the run then trains in a local working
folder and publishes each checkpoint to the URI, a commit marker put last, and resumes from the
URI's last committed checkpoint on any machine (``training.remote_run``).

Data parallelism: when ``torch.distributed`` is initialised (Ray Train's ``TorchTrainer`` does this,
see ``pipelines/train_ray.py``), each of the W workers takes every W-th unit of the global batch
and the gradients are averaged across workers by all-reduce before each optimizer step, which is
what DDP does, done explicitly so that GradCache's two passes and stage 1's token-weighted loss
need no special casing. In-batch negatives are the worker's own. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from assay.curation import storage
from assay.curation.dataset import TMP_PREFIX, atomic_write_bytes, atomic_write_json, fingerprint
from assay.training.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_name,
    latest_checkpoint,
    restore_training_state,
    save_checkpoint,
    weights_hash,
)
from assay.training.config import TrainConfig
from assay.training.data import TrainingData, epoch_batches, steps_per_epoch
from assay.training.inputs import CachedInputs, Prefetcher, ProcessorInputs, model_inputs
from assay.training.model import MMEmbedder
from assay.training.steps import Prepared, StageSteps, TrainingError, autocast
from assay.training.trainer_model import freeze_vision, fresh_model, resumed_model

if TYPE_CHECKING:
    from assay.training.remote_run import RemoteOutput

__all__ = ["COMPLETE_FILE", "LOG_FILE", "TrainingError", "final_checkpoint", "resolve_device", "train"]

log = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"
LOG_FILE = "train_log.jsonl"
MAX_GRAD_NORM = 1.0


# ---------------------------------------------------------------- environment


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def final_checkpoint(output: str | os.PathLike) -> Path | None:
    """The final checkpoint of a completed stage run, else None (a URI's location for a run on one)."""
    file = storage.path(output) / COMPLETE_FILE
    if not file.is_file():
        return None
    return storage.path(output) / json.loads(file.read_text())["final"]


# ---------------------------------------------------------------- the loop


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _all_reduce_grads(params: Sequence[torch.nn.Parameter], divide: int) -> None:
    """Sum every gradient over the workers, then divide (by W for a mean, 1 for a sum)."""
    for p in params:
        if p.grad is None:  # a parameter this worker's batch did not reach (e.g. no image in it)
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if divide != 1:
            p.grad /= divide


def _prune(output: Path, keep: int) -> None:
    steps = sorted(p for p in output.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _remove_partial_saves(output: Path) -> int:
    """Delete the checkpoints a killed run was still writing: the hidden ``.tmp-*`` folders that
    ``save_checkpoint`` renames into place once complete. Nothing ever reads them, and each holds a
    whole model; named by the writer's pid, a rerun's saves never reuse (and so never clear) them.
    Returns how many were removed."""
    if not output.is_dir():
        return 0
    stale = [p for p in output.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint save(s) a killed run left in %s", len(stale), output)
    return len(stale)


def _rewrite_log(output: Path, upto: int) -> None:
    """Keep log lines of steps <= ``upto`` (a resumed run rewrites what came after)."""
    file = output / LOG_FILE
    if not file.is_file():
        return
    lines = [ln for ln in file.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= upto]
    atomic_write_bytes(file, "".join(ln + "\n" for ln in lines).encode())


class _BatchSchedule:
    """Which units each step trains on, and their tensors: what the input thread runs ahead.

    Batches are ``epoch_batches`` of (seed, epoch), computed once per epoch, so the steps from
    ``start`` on are the ones an uninterrupted run has; worker ``rank`` of ``world`` takes every
    W-th unit of each global batch.
    """

    def __init__(
        self, config: TrainConfig, stage: StageSteps, per_epoch: int, rank: int, world: int, pin: bool
    ):
        self.config, self.stage, self.per_epoch = config, stage, per_epoch
        self.rank, self.world, self.pin = rank, world, pin
        self._epoch, self._batches = -1, []

    def prepare(self, step: int) -> tuple[int, int, Prepared | None]:
        """(epoch, units in the global batch, this worker's prepared inputs) of ``step``."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            c = self.config
            self._batches = epoch_batches(
                self.stage.unit_subsets,
                c.batch_size,
                seed=c.seed,
                epoch=epoch,
                batching=c.batching,
                max_units_per_subset=c.max_units_per_subset,
            )
            self._epoch = epoch
        batch = self._batches[index]
        prepared = self.stage.prepare([self.stage.units[i] for i in batch[self.rank :: self.world]])
        if prepared is not None and self.pin:
            prepared.pin_memory()
        return epoch, len(batch), prepared


def train(config: TrainConfig, *, device: str | torch.device | None = None) -> Path:
    """Run (or resume, or return the result of) one stage; returns the final checkpoint's path.

    An output URI (``s3://...``) is trained in a local working folder and each checkpoint published
    to the URI as it is written (``training.remote_run``); the result is then the URI's location."""
    if storage.is_remote(config.output):
        from assay.training.remote_run import train_remote

        return train_remote(config, device=device)
    output = Path(config.output)
    done = _completed_run(config, output)
    if done is not None:
        return done
    run = _set_up(config, output, device)
    _announce(run)
    _loop(run)
    return _finish(run)


@dataclass
class _Run:
    """One stage run, as :func:`_set_up` made it: what every step reads and updates."""

    config: TrainConfig
    output: Path
    rank: int  # this worker, of ``world`` (0 of 1 without torch.distributed); rank 0 writes
    world: int
    device: torch.device
    started: float  # time.perf_counter() at the start, for complete.json's seconds
    embedder: MMEmbedder
    parent: str | None  # weights hash of the model the run started from
    params: list[torch.nn.Parameter]  # the trainable ones
    inputs: CachedInputs | ProcessorInputs
    stage: StageSteps
    per_epoch: int
    total: int  # steps of the whole run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int  # the first step this call runs: 0, or the step of the checkpoint it resumes from
    resume: Path | None
    precision: str  # "bf16" under autocast, else "fp32"
    remote: RemoteOutput | None = None  # an output URI: ``output`` is its local working folder


def _completed_run(config: TrainConfig, output: Path) -> Path | None:
    """The final checkpoint when ``output`` holds this config's completed run; None when it holds none."""
    done = final_checkpoint(output)
    if done is None:
        return None
    stored = json.loads((output / COMPLETE_FILE).read_text())
    if stored.get("config_fingerprint") != fingerprint(config.resume_key()):
        raise TrainingError(
            f"{storage.display(output)} holds a completed run of a different config; "
            "choose another output or delete it"
        )
    log.info("stage %s already complete: %s", config.stage, done)
    return done


def _set_up(
    config: TrainConfig, output: Path, device: str | torch.device | None, remote: RemoteOutput | None = None
) -> _Run:
    """The data, the model (fresh, or from the latest checkpoint), the optimizer and the schedule.
    With ``remote``, ``output`` is the run's local working folder and the checkpoint to resume from
    is the one ``remote`` found committed at the URI."""
    rank, world = _world()
    if rank == 0:
        _remove_partial_saves(output)  # a kill mid-save leaves one; no save of this run is under way yet
    device = torch.device(device) if device is not None else resolve_device(config.device)
    started = time.perf_counter()
    data = TrainingData.load(config.data, config.subsets)

    resume = latest_checkpoint(output) if remote is None else remote.resume
    if resume is not None:
        embedder, parent, state = resumed_model(config, data, resume)
    else:
        if rank == 0:
            _rewrite_log(output, 0)  # a run that never reached a checkpoint starts its log afresh
        embedder, parent = fresh_model(config, data)
        state = None
    if config.freeze_vision:
        freeze_vision(embedder)
    embedder.to(device).train()
    params = [p for p in embedder.parameters() if p.requires_grad]
    inputs = model_inputs(embedder, config.input_cache, output)
    stage = StageSteps(config, data, embedder, device, inputs)

    per_epoch, total = _steps(config, stage)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # linear warm-up over warmup_ratio of the steps, then linear decay to 0 at the last
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total, int(config.warmup_ratio * total))
    )
    start = 0
    if state is not None:
        restore_training_state(optimizer, scheduler, state)
        start = state.step
        if rank == 0:
            _rewrite_log(output, start)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    return _Run(
        config=config,
        output=output,
        rank=rank,
        world=world,
        device=device,
        started=started,
        embedder=embedder,
        parent=parent,
        params=params,
        inputs=inputs,
        stage=stage,
        per_epoch=per_epoch,
        total=total,
        optimizer=optimizer,
        scheduler=scheduler,
        start=start,
        resume=resume,
        precision="bf16" if isinstance(autocast(config, device), torch.autocast) else "fp32",
        remote=remote,
    )


def _steps(config: TrainConfig, stage: StageSteps) -> tuple[int, int]:
    """Steps per epoch, and steps of the whole run (``epochs`` of them, at most ``max_steps``)."""
    per_epoch = steps_per_epoch(
        stage.unit_subsets, config.batch_size, config.batching, config.max_units_per_subset
    )
    total = math.ceil(config.epochs * per_epoch)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return per_epoch, total


def _announce(run: _Run) -> None:
    """Rank 0 says what it trains: the stage, its steps, the trainable parameters, where it resumes."""
    if run.rank != 0:
        return
    n_train = sum(p.numel() for p in run.params)
    print(
        f"stage {run.config.stage}: {run.stage.describe()}, {run.per_epoch} steps/epoch, {run.total} steps, "
        f"{n_train:,} trainable parameters on {run.device} ({run.precision})"
        + (f" x {run.world} workers" if run.world > 1 else "")
        + (f", resuming at step {run.start} from {run.resume.name}" if run.resume is not None else "")
    )
    if run.inputs.cache is not None:
        print(f"input cache: {run.inputs.cache.directory} ({len(run.inputs.cache)} entries)")


def _loop(run: _Run) -> None:
    """Steps ``start`` to ``total``: each trains, logs every ``log_every`` steps and saves a checkpoint
    every ``save_every`` steps (and both at the last)."""
    config = run.config
    schedule = _BatchSchedule(
        config, run.stage, run.per_epoch, run.rank, run.world, pin=run.device.type == "cuda"
    )
    bar = tqdm(
        total=run.total,
        initial=run.start,
        desc=f"stage {config.stage}",
        disable=not config.progress or run.rank != 0,
    )
    prefetch = Prefetcher(schedule.prepare, range(run.start, run.total))  # the next steps' inputs, meanwhile
    try:
        for step in range(run.start, run.total):
            t0 = time.perf_counter()
            epoch, units, prepared = prefetch.get(step)
            waited = time.perf_counter() - t0
            loss, grad_norm = _train_step(run, step, prepared)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            last = step + 1 == run.total
            if run.rank == 0 and ((step + 1) % config.log_every == 0 or last):
                _log_step(
                    run, step, epoch, units, loss, grad_norm, seconds=time.perf_counter() - t0, waited=waited
                )
            if (step + 1) % config.save_every == 0 or last:
                _save(run, step + 1)
    finally:
        prefetch.close()
        run.inputs.close()  # the cache's pending entries become a shard, for the next run
    bar.close()


def _train_step(run: _Run, step: int, prepared: Prepared | None) -> tuple[float, float]:
    """One optimizer step on this worker's inputs; returns the loss (over all workers) and the
    gradient norm before clipping."""
    run.optimizer.zero_grad(set_to_none=True)
    loss, combine = run.stage.step(prepared, run.world)
    if run.world > 1:
        divide = run.world if combine == "mean" else 1
        _all_reduce_grads(run.params, divide)
        reduced = torch.tensor([loss], dtype=torch.float64, device=run.device)
        dist.all_reduce(reduced)
        loss = float(reduced) / divide
    if not math.isfinite(loss):  # before the step: a NaN never reaches the weights or a checkpoint
        raise TrainingError(f"stage {run.config.stage}: loss is {loss} at step {step + 1}; lower lr?")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, MAX_GRAD_NORM))
    run.optimizer.step()
    run.scheduler.step()
    return loss, grad_norm


def _log_step(
    run: _Run,
    step: int,
    epoch: int,
    units: int,
    loss: float,
    grad_norm: float,
    *,
    seconds: float,
    waited: float,
) -> None:
    """Append step ``step``'s line to ``train_log.jsonl``."""
    entry = {
        "step": step + 1,
        "epoch": epoch,
        "loss": loss,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "seconds": round(seconds, 4),  # the whole step, waiting included
        "input_wait_seconds": round(waited, 4),  # of which waiting for its inputs
        "units": units,
        "precision": run.precision,
    }
    with open(run.output / LOG_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _save(run: _Run, steps_done: int) -> None:
    """Rank 0 writes checkpoint ``step-NNNNNN`` and prunes the old ones; every worker waits for it."""
    if run.rank == 0:
        save_checkpoint(
            run.output / checkpoint_name(steps_done),
            run.embedder,
            stage=run.config.stage,
            step=steps_done,
            training_config=run.config.to_dict(),
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            parent=run.parent,
            overwrite=True,
            resume_key=run.config.resume_key(),
        )
        _prune(run.output, run.config.keep_checkpoints)
        if run.remote is not None:
            run.remote.publish(run.output / checkpoint_name(steps_done), run.output / LOG_FILE)
    if run.world > 1:
        dist.barrier()


def _finish(run: _Run) -> Path:
    """Rank 0 writes ``complete.json`` naming the final checkpoint (and puts it at an output URI);
    returns that checkpoint's path (its location at the URI)."""
    final = run.output / checkpoint_name(run.total)
    result = final if run.remote is None else storage.path(run.remote.uri) / final.name
    if run.rank == 0:
        atomic_write_json(
            run.output / COMPLETE_FILE,
            {
                "final": final.name,
                "stage": run.config.stage,
                "steps": run.total,
                "weights_sha256": weights_hash(final),
                "config_fingerprint": fingerprint(run.config.resume_key()),
                "seconds": round(time.perf_counter() - run.started, 1),
            },
        )
        if run.remote is not None:
            run.remote.complete(final, run.output / COMPLETE_FILE)
        print(f"stage {run.config.stage}: done, {run.total} steps -> {storage.display(result)}")
    if run.world > 1:
        dist.barrier()
    return result
