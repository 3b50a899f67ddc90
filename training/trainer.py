"""The built-in trainer: one loop for the three stages of PAPER.md and the reranker.

``train(config)`` runs one stage into ``config.output``:

=========  =====================================================  ===================================
stage      what it learns from                                    loss
=========  =====================================================  ===================================
1          gold pairs as (image, question) -> answer samples      next-token cross-entropy
reranker   (query, candidate) under the judge prompt -> yes / no  next-token cross-entropy (one token)
2          gold pairs, in-batch negatives (+ mined hard ones)     InfoNCE, GradCache
3          gold pairs + judged hard negatives (<= 12 per query)   InfoNCE, GradCache
=========  =====================================================  ===================================

In the contrastive stages a doc is never pushed away from a query it belongs to: the query's other
positives and its false negatives (pairs labelled ``false_negative`` or judged ``yes``) are masked
out of its softmax wherever they turn up in the batch.

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

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from curation.dataset import atomic_write_bytes, atomic_write_json, fingerprint
from training.checkpoint import (
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
from training.config import TrainConfig
from training.data import (
    CAPTION_PROMPT,
    LABEL_PROMPT,
    ContrastiveUnit,
    TrainingData,
    epoch_batches,
    generative_sample,
    steps_per_epoch,
)
from training.generative import build_batch, next_token_loss, reranker_sample, sample_from_input
from training.losses import GradCache, InfoNCELoss
from training.model import MMEmbedder, load_embedder

log = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"
LOG_FILE = "train_log.jsonl"
MAX_GRAD_NORM = 1.0


class TrainingError(RuntimeError):
    """A run that cannot start or continue as configured."""


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


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (fp32 master weights and optimizer), full fp32 on the CPU by default."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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
        from training.tiny import build_tiny

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


def _resume_lora(embedder: MMEmbedder, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = checkpoint / ADAPTER_DIR / "adapter_model.safetensors"
    if not file.is_file():
        raise TrainingError(f"{checkpoint} holds no LoRA adapter ({ADAPTER_DIR}/): cannot resume a LoRA run")
    result = set_peft_model_state_dict(embedder.model, load_file(file))
    if result.unexpected_keys:
        raise TrainingError(f"{file}: adapter keys this model does not have: {result.unexpected_keys[:3]}")


# ---------------------------------------------------------------- steps


class _Stage:
    """Units of one stage and how a step turns a list of them into gradients."""

    def __init__(self, config: TrainConfig, data: TrainingData, embedder: MMEmbedder, device: torch.device):
        self.config, self.data, self.embedder, self.device = config, data, embedder, device
        stage = config.stage
        if stage == "1":
            self.units: Sequence[Any] = data.generative_units()
            subsets = [data.subset_of(q) for q, _ in self.units]
        elif stage == "reranker":
            self.units = data.reranker_units(config.negatives_per_positive, config.seed)
            subsets = [data.subset_of(q) for q, _, _ in self.units]
        else:
            mode = config.negatives
            if mode == "auto":
                mode = "mined" if data.has_hard_negatives() else "none"
            self.negatives = mode
            self.units = data.contrastive_units(mode, config.num_negatives)
            subsets = [data.subset_of(u.query) for u in self.units]
            self.loss = InfoNCELoss(temperature=config.temperature)
        if not self.units:
            raise TrainingError(f"stage {stage}: the datasets give no training units")
        self.unit_subsets = subsets

    def describe(self) -> str:
        extra = f", negatives: {self.negatives}" if self.config.contrastive else ""
        negs = sum(len(u.negatives) for u in self.units) if self.config.contrastive else 0
        return f"{len(self.units)} units{extra}" + (f" ({negs} hard negatives)" if negs else "")

    def step(self, units: Sequence[Any], world: int = 1) -> tuple[float, str]:
        """Forward and backward over this worker's ``units`` (gradients land in ``.grad``).

        Returns the loss and how workers combine it (and their gradients): ``"sum"`` for the
        next-token stages, whose loss is already divided by the token count of the whole global
        batch (so W workers give exactly one process's gradient), ``"mean"`` for the contrastive
        stages (each worker's InfoNCE is a mean over its own queries, as under DDP).
        """
        if self.config.contrastive:
            return (self._contrastive(units) if units else 0.0), "mean"
        return self._generative(units, world), "sum"

    # -- next-token stages

    def _samples(self, units: Sequence[Any]) -> list:
        d = self.data
        if self.config.stage == "reranker":
            return [
                reranker_sample(
                    None, d.queries[q], d.corpus[doc], answer, max_chars=self.config.max_text_chars
                )
                for q, doc, answer in units
            ]
        out = []
        for q, doc in units:
            inp, target = generative_sample(d.queries[q], d.corpus[doc])
            out.append(sample_from_input(inp, target[: self.config.max_text_chars]))
        return out

    def _generative(self, units: Sequence[Any], world: int) -> float:
        samples = self._samples(units)
        end_of_turn = self.config.stage == "1"
        mb = self.config.mini_batch
        batches = [
            build_batch(self.embedder, samples[i : i + mb], end_of_turn=end_of_turn)
            for i in range(0, len(samples), mb)
        ]
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if world > 1:  # normalise by the global batch's target tokens
            count = torch.tensor([total], dtype=torch.float64, device=self.device)
            dist.all_reduce(count)
            total = int(count.item())
        loss_sum = 0.0
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with _autocast(self.config, self.device):
                loss, _ = next_token_loss(self.embedder, batch)
            (loss / max(total, 1)).backward()
            loss_sum += float(loss.detach())
        return loss_sum / max(total, 1)

    # -- contrastive stages

    def _contrastive(self, units: Sequence[ContrastiveUnit]) -> float:
        d = self.data
        queries = [d.queries[u.query] for u in units]
        positives = [d.corpus[u.positive] for u in units]
        k = max((len(u.negatives) for u in units), default=0)
        columns = [u.positive for u in units]
        inputs: list[Any] = [queries, positives]
        fns: list[Callable] = [self._encoder("query"), self._encoder("candidate")]
        kwargs: dict[str, Any] = {}
        if k:
            slots = [(list(u.negatives) + [None] * k)[:k] for u in units]
            # padding slots re-encode the positive (any real row works): masked out of the loss
            negs = [
                d.corpus[n if n is not None else u.positive]
                for u, row in zip(units, slots, strict=True)
                for n in row
            ]
            inputs.append(negs)
            fns.append(self._encoder("candidate"))
            kwargs["neg_mask"] = torch.tensor([[n is not None for n in row] for row in slots])
            columns += [n if n is not None else -1 for row in slots for n in row]
        kwargs["exclude"] = self._exclude(units, columns)
        gc = GradCache(fns, self.loss, self.config.mini_batch)
        with _autocast(self.config, self.device):
            loss = gc(*inputs, **kwargs)
        return float(loss)

    def _encoder(self, side: str) -> Callable:
        def encode(rows: list[dict[str, Any]]) -> torch.Tensor:
            return self.embedder.embed(rows, side)

        return encode

    def _exclude(self, units: Sequence[ContrastiveUnit], columns: list[int]) -> torch.Tensor:
        """(B, columns) True where column j is a doc query i must not be pushed from (not its own)."""
        mask = torch.zeros(len(units), len(columns), dtype=torch.bool)
        for i, u in enumerate(units):
            banned = self.data.excluded(u.query)
            for j, doc in enumerate(columns):
                if j != i and doc in banned:
                    mask[i, j] = True
        return mask


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
    embedder.to(device).train()
    params = [p for p in embedder.parameters() if p.requires_grad]
    stage = _Stage(config, data, embedder, device)

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
    precision = "bf16" if isinstance(_autocast(config, device), torch.autocast) else "fp32"
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in params)
        print(
            f"stage {config.stage}: {stage.describe()}, {per_epoch} steps/epoch, {total} steps, "
            f"{n_train:,} trainable parameters on {device} ({precision})"
            + (f" x {world} workers" if world > 1 else "")
            + (f", resuming at step {start} from {resume.name}" if resume is not None else "")
        )

    saved = resume
    batches, batches_epoch = None, -1
    bar = tqdm(
        total=total, initial=start, desc=f"stage {config.stage}", disable=not config.progress or rank != 0
    )
    for step in range(start, total):
        epoch, index = divmod(step, per_epoch)
        if epoch != batches_epoch:
            batches = epoch_batches(
                stage.unit_subsets,
                config.batch_size,
                seed=config.seed,
                epoch=epoch,
                batching=config.batching,
                max_units_per_subset=config.max_units_per_subset,
            )
            batches_epoch = epoch
        local = [stage.units[i] for i in batches[index][rank::world]]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, combine = stage.step(local, world)
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
                "seconds": round(time.perf_counter() - t0, 4),
                "units": len(batches[index]),
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
