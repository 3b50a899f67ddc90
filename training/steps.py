"""One training step of each stage, in two halves: ``prepare`` (inputs) and ``step`` (the model).

``StageSteps`` holds a stage's training units (``training.data``) and turns the units of one step
into gradients. The work is split where the model begins:

- ``prepare(units)`` builds every tensor the step needs on the CPU: the mini-batches of token ids
  and pixels (``training.inputs``), labels, the masks of the loss. It reads only the data, so the
  trainer runs it on a background thread for the coming steps (``training.inputs.Prefetcher``);
- ``step(prepared)`` moves the tensors to the device and runs forward and backward, nothing else.

Stage 1: next-token loss over the target tokens, summed over the step's mini-batches and divided
by the step's target-token count. The reranker: the same, over its one target token per sample (the
verdict) and only that token's two label logits (``training.generative.label_loss``). Stages 2 and 3: InfoNCE over the step's
queries, positives and hard negatives, with GradCache when the step's rows take more than one
mini-batch. When every group (queries, positives, negatives) fits one mini-batch, the step encodes
each once, with grad: GradCache's first pass (an encoding without grad, to learn the loss's
gradient at the embeddings) would only compute the same embeddings twice. The rest is GradCache's:
the loss's gradient at the embeddings, then a backward per group in the same order, so the
parameter gradients are summed as GradCache sums them and come out the same, bit for bit
(``tests/training/test_trainer.py``); the quickstart's stage-2 warm-up ends with the same losses
and weights as before this shortcut. The memory is that of one mini-batch per group, all at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from assay.curation.judge.scoring import label_token_ids
from assay.training.config import TrainConfig
from assay.training.data import ContrastiveUnit, TrainingData, generative_sample
from assay.training.generative import (
    label_loss,
    next_token_loss,
    reranker_labels,
    reranker_sample,
    sample_from_input,
)
from assay.training.inputs import Batch, CachedInputs, ProcessorInputs
from assay.training.losses import GradCache, InfoNCELoss
from assay.training.model import MMEmbedder


class TrainingError(ValueError):
    """A run that cannot start or continue as configured."""


def autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (fp32 master weights and optimizer), full fp32 on the CPU by default."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class Prepared:
    """Everything one step computes from, as CPU tensors.

    ``groups``: per input group (next-token: one; contrastive: queries, positives[, negatives]) its
    mini-batches. ``targets``: the target-token count of a next-token step. ``loss_kwargs``: the
    contrastive loss's masks.
    """

    groups: list[list[Batch]]
    targets: int = 0
    loss_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def pin_memory(self) -> Prepared:
        """Page-locked copies, so the copies to a GPU can overlap the computation."""
        self.groups = [[{k: v.pin_memory() for k, v in b.items()} for b in g] for g in self.groups]
        return self


class StageSteps:
    """Units of one stage, and how a step turns a list of them into gradients."""

    def __init__(
        self,
        config: TrainConfig,
        data: TrainingData,
        embedder: MMEmbedder,
        device: torch.device,
        inputs: CachedInputs | ProcessorInputs,
    ):
        self.config, self.data, self.embedder, self.device, self.inputs = (
            config,
            data,
            embedder,
            device,
            inputs,
        )
        stage = config.stage
        if stage == "1":
            self.units: Sequence[Any] = data.generative_units()
            subsets = [data.subset_of(q) for q, _ in self.units]
        elif stage == "reranker":
            self.units = data.reranker_units(config.negatives_per_positive, config.seed)
            subsets = [data.subset_of(q) for q, _, _ in self.units]
            if not any(negs for _, _, negs in self.units):
                raise TrainingError("reranker: no negative to answer 'no' to (one doc per subset?)")
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
        self._label_ids: dict[tuple[str, str], tuple[int, int]] = {}  # reranker: label words -> ids

    def describe(self) -> str:
        if self.config.stage == "reranker":
            negs = sum(len(n) for _, _, n in self.units)
            return f"{len(self.units)} gold pairs, each with its negatives in its step ({negs} negatives)"
        extra = f", negatives: {self.negatives}" if self.config.contrastive else ""
        negs = sum(len(u.negatives) for u in self.units) if self.config.contrastive else 0
        return f"{len(self.units)} units{extra}" + (f" ({negs} hard negatives)" if negs else "")

    # -- the CPU half (any thread)

    def prepare(self, units: Sequence[Any]) -> Prepared | None:
        """The tensors of a step over this worker's ``units`` (None when it has none)."""
        if not units:
            return None
        if self.config.contrastive:
            return self._prepare_contrastive(units)
        samples = self._samples(units)
        mb = self.config.mini_batch
        end_of_turn = self.config.stage == "1"
        batches = [
            self.inputs.generative(samples[i : i + mb], end_of_turn) for i in range(0, len(samples), mb)
        ]
        if self.config.stage == "reranker":  # each row's two label tokens, which its loss reads
            pairs = self._label_pairs(units)
            for i, batch in enumerate(batches):
                batch["label_ids"] = pairs[i * mb : (i + 1) * mb]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        return Prepared([batches], targets=targets)

    def _samples(self, units: Sequence[Any]) -> list:
        d = self.data
        if self.config.stage == "reranker":
            return [
                reranker_sample(
                    None, d.queries[q], d.corpus[doc], match, max_chars=self.config.max_text_chars
                )
                for q, doc, match in self._verdicts(units)
            ]
        out = []
        for q, doc in units:
            inp, target = generative_sample(d.queries[q], d.corpus[doc])
            out.append(sample_from_input(inp, target[: self.config.max_text_chars]))
        return out

    @staticmethod
    def _verdicts(units: Sequence[Any]) -> list[tuple[int, int, bool]]:
        """A reranker step's samples: (query, doc, match), each group's gold pair then its negatives."""
        return [
            (q, d, match) for q, pos, negs in units for d, match in [(pos, True), *((n, False) for n in negs)]
        ]

    def _label_pairs(self, units: Sequence[Any]) -> torch.Tensor:
        """(samples, 2): the token ids of each reranker sample's two label words ("yes", "no")."""
        tok = self.embedder._processor.tokenizer
        ids = []
        for q, _, _ in self._verdicts(units):
            labels = reranker_labels(self.data.queries[q])
            if labels not in self._label_ids:  # tokenised once a run, not once a step
                self._label_ids[labels] = label_token_ids(tok, labels)
            ids.append(self._label_ids[labels])
        return torch.tensor(ids, dtype=torch.long)

    def _prepare_contrastive(self, units: Sequence[ContrastiveUnit]) -> Prepared:
        d = self.data
        k = max((len(u.negatives) for u in units), default=0)
        columns = [u.positive for u in units]
        sides: list[tuple[list, str]] = [
            ([d.queries[u.query] for u in units], "query"),
            ([d.corpus[u.positive] for u in units], "candidate"),
        ]
        kwargs: dict[str, torch.Tensor] = {}
        if k:
            slots = [(list(u.negatives) + [None] * k)[:k] for u in units]
            # padding slots re-encode the positive (any real row works): masked out of the loss
            negs = [
                d.corpus[n if n is not None else u.positive]
                for u, row in zip(units, slots, strict=True)
                for n in row
            ]
            sides.append((negs, "candidate"))
            kwargs["neg_mask"] = torch.tensor([[n is not None for n in row] for row in slots])
            columns += [n if n is not None else -1 for row in slots for n in row]
        kwargs["exclude"] = self._exclude(units, columns)
        mb = self.config.mini_batch
        groups = [
            [self.inputs.embed(rows[i : i + mb], side) for i in range(0, len(rows), mb)]
            for rows, side in sides
        ]
        return Prepared(groups, loss_kwargs=kwargs)

    def _exclude(self, units: Sequence[ContrastiveUnit], columns: list[int]) -> torch.Tensor:
        """(B, columns) True where column j is a doc query i must not be pushed from (not its own)."""
        mask = torch.zeros(len(units), len(columns), dtype=torch.bool)
        for i, u in enumerate(units):
            banned = self.data.excluded(u.query)
            for j, doc in enumerate(columns):
                if j != i and doc in banned:
                    mask[i, j] = True
        return mask

    # -- the device half (the training thread)

    def step(self, prepared: Prepared | None, world: int = 1) -> tuple[float, str]:
        """Forward and backward over this worker's prepared step (gradients land in ``.grad``).

        Returns the loss and how workers combine it (and their gradients): ``"sum"`` for the
        next-token stages, whose loss is already divided by the token count of the whole global
        batch (so W workers give exactly one process's gradient), ``"mean"`` for the contrastive
        stages (each worker's InfoNCE is a mean over its own queries, as under DDP).
        """
        if self.config.contrastive:
            return (self._contrastive(prepared) if prepared is not None else 0.0), "mean"
        return self._generative(prepared, world), "sum"

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _generative(self, prepared: Prepared | None, world: int) -> float:
        batches = prepared.groups[0] if prepared is not None else []
        total = prepared.targets if prepared is not None else 0
        if world > 1:  # normalise by the global batch's target tokens
            count = torch.tensor([total], dtype=torch.float64, device=self.device)
            dist.all_reduce(count)
            total = int(count.item())
        loss_fn = label_loss if self.config.stage == "reranker" else next_token_loss
        loss_sum = 0.0
        for batch in batches:
            with autocast(self.config, self.device):
                loss, _ = loss_fn(self.embedder, self._to_device(batch))
            (loss / max(total, 1)).backward()
            loss_sum += float(loss.detach())
        return loss_sum / max(total, 1)

    def _contrastive(self, prepared: Prepared, gradcache: bool | None = None) -> float:
        """InfoNCE over the prepared groups; GradCache when a group takes several mini-batches
        (``gradcache`` forces the choice, for tests)."""
        groups, kwargs = prepared.groups, prepared.loss_kwargs
        if gradcache is None:
            gradcache = any(len(chunks) > 1 for chunks in groups)
        with autocast(self.config, self.device):
            if not gradcache:  # one mini-batch per group: one pass
                reps = [self._encode(chunks[0]) for chunks in groups]
                leaves = [r.detach().requires_grad_() for r in reps]
                loss = self.loss(*leaves, **kwargs)
                loss.backward()
                for r, leaf in zip(reps, leaves, strict=True):  # group by group, as GradCache sums them
                    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                    if r.requires_grad:
                        torch.autograd.backward(r, grad_tensors=grad.to(r.dtype))
                return float(loss.detach())
            mb = self.config.mini_batch
            sizes = [sum(int(c["input_ids"].shape[0]) for c in chunks) for chunks in groups]
            fns = [self._chunk_encoder(chunks, mb) for chunks in groups]
            return float(GradCache(fns, self.loss, mb)(*sizes, **kwargs))

    def _encode(self, batch: Batch) -> torch.Tensor:
        return self.embedder(**self._to_device(batch))

    def _chunk_encoder(self, chunks: list[Batch], mb: int) -> Callable[[int, int], torch.Tensor]:
        """GradCache's encoder of rows [start, stop): the prepared mini-batch that begins at start
        (GradCache cuts a group of N rows at the same multiples of ``mini_batch`` as ``prepare``)."""

        def encode(start: int, stop: int) -> torch.Tensor:
            batch = chunks[start // mb]
            if batch["input_ids"].shape[0] != stop - start:
                raise RuntimeError(
                    f"prepared mini-batch at row {start} holds {batch['input_ids'].shape[0]} rows"
                )
            return self._encode(batch)

        return encode
