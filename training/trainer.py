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
each stage does.)

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
hidden ``.partial-*`` folder) is removed first. ``complete.json`` names the final checkpoint;
a rerun of a complete stage returns it at once. With LoRA the checkpoint's weights are the merged
model (usable as is for eval and mining) and ``adapter/`` holds the adapter the run resumes from,
on top of the stage's ``init`` model (checked by its weights hash).

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
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from assay.curation.dataset import atomic_write_bytes, atomic_write_json, fingerprint
from assay.training.checkpoint import (
    ADAPTER_DIR,
    CHECKPOINT_NAME,
    PARTIAL_PREFIX,
    TrainingState,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    weights_hash,
)
from assay.training.config import TrainConfig
from assay.training.data import CAPTION_PROMPT, LABEL_PROMPT, TrainingData, epoch_batches, steps_per_epoch
from assay.training.inputs import Prefetcher, model_inputs
from assay.training.model import MMEmbedder, load_embedder
from assay.training.steps import Prepared, StageSteps, TrainingError, autocast

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
    """The final checkpoint of a completed stage run, else None."""
    file = Path(output) / COMPLETE_FILE
    if not file.is_file():
        return None
    return Path(output) / json.loads(file.read_text())["final"]


# ---------------------------------------------------------------- the model


def _dataset_texts(data: TrainingData) -> list[str]:
    texts = [r[k] for r in data.queries for k in ("text", "instruction") if r.get(k)]
    texts += [r[k] for r in data.corpus for k in ("text", "instruction") if r.get(k)]
    return [*dict.fromkeys(texts), CAPTION_PROMPT, LABEL_PROMPT]


def _initial_embedder(config: TrainConfig, data: TrainingData) -> tuple[MMEmbedder, str | None]:
    """The model a fresh run starts from, and the weights hash of where it came from."""
    if config.tiny is not None:
        from assay.training.tiny import build_tiny

        t = config.tiny
        model, processor = build_tiny(
            _dataset_texts(data),
            tokens_per_tile=config.tokens_per_tile or 64,
            image_size=t.image_size,
            patch_size=t.patch_size,
            hidden_size=t.hidden_size,
            num_layers=t.num_layers,
            vocab_size=t.vocab_size,
            layer_scale=t.layer_scale,
            seed=t.seed,
        )
        return MMEmbedder(model, processor), None
    init = Path(config.init)
    if not init.is_dir():
        raise TrainingError(f"init {config.init}: no such model directory")
    embedder = load_embedder(init, tokens_per_tile=config.tokens_per_tile)
    return embedder, weights_hash(init)


def _wrap_lora(embedder: MMEmbedder, config: TrainConfig) -> None:
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    embedder.model = get_peft_model(embedder.model, peft_config)


#: Parameter names of a vision tower: InternVL's ``vision_tower``, Qwen2-VL's ``visual``.
VISION_PARAMETERS = re.compile(r"(^|\.)(vision_tower|visual)\.")


def _freeze_vision(embedder: MMEmbedder) -> None:
    """``freeze_vision``: the vision tower's parameters take no gradient (and no optimizer state)."""
    frozen = [p for name, p in embedder.model.named_parameters() if VISION_PARAMETERS.search(name)]
    if not frozen:
        raise TrainingError(
            "freeze_vision: this model has no vision tower (no vision_tower. / visual. parameters)"
        )
    for p in frozen:
        p.requires_grad_(False)


def _resume_lora(embedder: MMEmbedder, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = checkpoint / ADAPTER_DIR / "adapter_model.safetensors"
    if not file.is_file():
        raise TrainingError(f"{checkpoint} holds no LoRA adapter ({ADAPTER_DIR}/): cannot resume a LoRA run")
    result = set_peft_model_state_dict(embedder.model, load_file(file))
    if result.unexpected_keys:
        raise TrainingError(f"{file}: adapter keys this model does not have: {result.unexpected_keys[:3]}")


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
    """Delete the checkpoints a killed run was still writing: the hidden ``.partial-*`` folders that
    ``save_checkpoint`` renames into place once complete. Nothing ever reads them, and each holds a
    whole model; named by the writer's pid, a rerun's saves never reuse (and so never clear) them.
    Returns how many were removed."""
    if not output.is_dir():
        return 0
    stale = [p for p in output.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
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
    """Run (or resume, or return the result of) one stage; returns the final checkpoint's path."""
    output = Path(config.output)
    done = final_checkpoint(output)
    if done is not None:
        stored = json.loads((output / COMPLETE_FILE).read_text())
        if stored.get("config_fingerprint") != fingerprint(config.resume_key()):
            raise TrainingError(
                f"{output} holds a completed run of a different config; choose another output or delete it"
            )
        log.info("stage %s already complete: %s", config.stage, done)
        return done
    rank, world = _world()
    if rank == 0:
        _remove_partial_saves(output)  # a kill mid-save leaves one; no save of this run is under way yet
    device = torch.device(device) if device is not None else resolve_device(config.device)
    t_start = time.perf_counter()
    data = TrainingData.load(config.data, config.subsets)

    resume = latest_checkpoint(output)
    state: TrainingState | None = None
    if resume is not None:
        embedder, state = load_checkpoint(resume)
        if state.stage != config.stage or state.manifest.training_config_fingerprint != fingerprint(
            config.resume_key()
        ):
            raise TrainingError(
                f"{resume} was written by a different config (stage {state.stage}); "
                "resume with the same config, or give a new output directory"
            )
        parent = state.manifest.parent
        if config.lora is not None:
            embedder, init_hash = _initial_embedder(config, data)
            if init_hash != parent:
                raise TrainingError(
                    f"init {config.init} changed since {resume} was written (weights hash "
                    f"{(init_hash or '')[:12]} != {(parent or '')[:12]}): cannot resume its LoRA adapter"
                )
            _wrap_lora(embedder, config)
            _resume_lora(embedder, resume)
    else:
        if rank == 0:
            _rewrite_log(output, 0)  # a run that never reached a checkpoint starts its log afresh
        torch.manual_seed(config.seed)
        embedder, parent = _initial_embedder(config, data)
        if config.lora is not None:
            _wrap_lora(embedder, config)
    if config.freeze_vision:
        _freeze_vision(embedder)
    embedder.to(device).train()
    params = [p for p in embedder.parameters() if p.requires_grad]
    inputs = model_inputs(embedder, config.input_cache, output)
    stage = StageSteps(config, data, embedder, device, inputs)

    per_epoch = steps_per_epoch(
        stage.unit_subsets, config.batch_size, config.batching, config.max_units_per_subset
    )
    total = math.ceil(config.epochs * per_epoch)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total, int(config.warmup_ratio * total))
    )
    start = 0
    if state is not None:
        restore_training_state(optimizer, scheduler, state)
        start = state.step
        if rank == 0:
            _rewrite_log(output, start)
    precision = "bf16" if isinstance(autocast(config, device), torch.autocast) else "fp32"
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in params)
        print(
            f"stage {config.stage}: {stage.describe()}, {per_epoch} steps/epoch, {total} steps, "
            f"{n_train:,} trainable parameters on {device} ({precision})"
            + (f" x {world} workers" if world > 1 else "")
            + (f", resuming at step {start} from {resume.name}" if resume is not None else "")
        )
        if inputs.cache is not None:
            print(f"input cache: {inputs.cache.directory} ({len(inputs.cache)} entries)")

    saved = resume
    schedule = _BatchSchedule(config, stage, per_epoch, rank, world, pin=device.type == "cuda")
    bar = tqdm(
        total=total, initial=start, desc=f"stage {config.stage}", disable=not config.progress or rank != 0
    )
    prefetch = Prefetcher(schedule.prepare, range(start, total))  # the next steps' inputs, meanwhile
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch, units, prepared = prefetch.get(step)
            waited = time.perf_counter() - t0
            optimizer.zero_grad(set_to_none=True)
            loss, combine = stage.step(prepared, world)
            if world > 1:
                divide = world if combine == "mean" else 1
                _all_reduce_grads(params, divide)
                reduced = torch.tensor([loss], dtype=torch.float64, device=device)
                dist.all_reduce(reduced)
                loss = float(reduced) / divide
            if not math.isfinite(loss):  # before the step: a NaN never reaches the weights or a checkpoint
                raise TrainingError(f"stage {config.stage}: loss is {loss} at step {step + 1}; lower lr?")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if rank == 0 and ((step + 1) % config.log_every == 0 or step + 1 == total):
                entry = {
                    "step": step + 1,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "seconds": round(time.perf_counter() - t0, 4),  # the whole step, waiting included
                    "input_wait_seconds": round(waited, 4),  # of which waiting for its inputs
                    "units": units,
                    "precision": precision,
                }
                with open(output / LOG_FILE, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if (step + 1) % config.save_every == 0 or step + 1 == total:
                if rank == 0:
                    saved = output / checkpoint_name(step + 1)
                    save_checkpoint(
                        saved,
                        embedder,
                        stage=config.stage,
                        step=step + 1,
                        training_config=config.to_dict(),
                        optimizer=optimizer,
                        scheduler=scheduler,
                        parent=parent,
                        overwrite=True,
                        resume_key=config.resume_key(),
                    )
                    _prune(output, config.keep_checkpoints)
                if world > 1:
                    dist.barrier()
    finally:
        prefetch.close()
        inputs.close()  # the cache's pending entries become a shard, for the next run
    bar.close()
    final = output / checkpoint_name(total)
    if rank == 0:
        atomic_write_json(
            output / COMPLETE_FILE,
            {
                "final": final.name,
                "stage": config.stage,
                "steps": total,
                "weights_sha256": weights_hash(final),
                "config_fingerprint": fingerprint(config.resume_key()),
                "seconds": round(time.perf_counter() - t_start, 1),
            },
        )
        print(f"stage {config.stage}: done, {total} steps -> {final}")
    if world > 1:
        dist.barrier()
    return final
