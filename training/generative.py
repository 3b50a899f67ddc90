"""Next-token training (stage 1, the reranker) and the reranker's yes/no scoring.

A *sample* is one chat turn: the user's content parts (text and image parts, the form transformers
chat templates take) with the images they refer to, and the assistant's target text. The processor
renders the prompt with the model's own chat template and expands each image into its tokens; the
target is tokenised on its own and appended, so the loss covers the target tokens and nothing else.

The loss reads the LM head only where there is a label: ``lm_head(hidden[labelled positions])``
instead of full ``(B, T, vocab)`` logits, which for a 150k vocabulary would be most of the memory.

The reranker (PAPER.md's pointwise judge) is the same model trained on samples whose target is one
word, "yes" or "no", under the judge prompt of ``curation.judge.prompts``. Scoring reads the two
label tokens' logits at the answer position in one forward pass:
``p_yes = e^yes / (e^yes + e^no)``; no generation, no softmax over the vocabulary. Training
(``label_loss``) minimises ``-log`` of exactly that probability, the binary cross-entropy of the
verdict the judge will read, not the next-token loss over the whole vocabulary: with the vocabulary
loss a tiny model spends its budget learning to say "yes" or "no" at all, and the large early
gradients wreck the image path it starts from (classification AUC 0.50 after 300 steps, against
0.95 with this loss from the same checkpoint; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from assay.curation.judge.hf import TransformersScorer
from assay.curation.judge.prompts import PromptTemplate, family_for_task, images_of, load_prompt, render
from assay.curation.judge.scoring import JudgeItem
from assay.curation.schema import load_image
from assay.training.model import MMEmbedder

IGNORE = -100


@dataclass(frozen=True)
class Sample:
    parts: list[dict[str, Any]]  # user content parts: {"type": "text", "text"} | {"type": "image"}
    images: list[Any]  # one per image part, in order (PIL, bytes, path or {bytes, path})
    target: str


def sample_from_input(inp: Mapping[str, Any], target: str) -> Sample:
    """A sample from ``{"image", "text"}`` (``training.data.generative_sample``'s input)."""
    parts: list[dict[str, Any]] = []
    images = []
    if inp.get("image") is not None:
        parts.append({"type": "image"})
        images.append(inp["image"])
    if inp.get("text"):
        parts.append({"type": "text", "text": inp["text"]})
    return Sample(parts, images, target)


def _prompt_texts(embedder: MMEmbedder, samples: Sequence[Sample]) -> list[str]:
    proc = embedder._processor
    return [
        proc.apply_chat_template(
            [{"role": "user", "content": s.parts}], tokenize=False, add_generation_prompt=True
        )
        for s in samples
    ]


def _encode_prompts(embedder: MMEmbedder, samples: Sequence[Sample], padding_side: str) -> Any:
    proc = embedder._processor
    images = [load_image(img, embedder.image_root) for s in samples for img in s.images]
    kwargs: dict[str, Any] = {"padding": True, "padding_side": padding_side, "return_tensors": "pt"}
    if images:
        kwargs.update(images=images, **embedder.image_kwargs())
    return proc(text=_prompt_texts(embedder, samples), **kwargs)


def build_batch(embedder: MMEmbedder, samples: Sequence[Sample], *, end_of_turn: bool = True) -> dict:
    """Tensors for next-token training: prompt + target, right-padded, labels only on the target.

    ``end_of_turn`` appends the tokenizer's end-of-turn token to the target (stage 1: the model
    learns where an answer stops); the reranker leaves it off so its loss is the label alone.
    """
    tok = embedder._processor.tokenizer
    enc = _encode_prompts(embedder, samples, "right")
    rows, labels = [], []
    for i, s in enumerate(samples):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        target = tok(s.target + (tok.eos_token if end_of_turn else ""), add_special_tokens=False)["input_ids"]
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    batch = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
    }
    if "pixel_values" in enc:
        batch["pixel_values"] = enc["pixel_values"]
    return batch


def _hidden(embedder: MMEmbedder, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"]
    out = embedder.backbone(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        pixel_values=batch.get("pixel_values"),
        position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
    )
    return out.last_hidden_state


def lm_head(embedder: MMEmbedder) -> torch.nn.Module:
    model = embedder.model
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.lm_head


def _labelled(
    embedder: MMEmbedder, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict the labelled tokens, those tokens, and which positions they
    are: ``(hidden (n, H), targets (n,), keep (B, T-1))``, in row order."""
    hidden = _hidden(embedder, batch)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return hidden[:, :-1][keep], labels[keep], keep


def next_token_loss(embedder: MMEmbedder, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the target tokens' cross-entropy, number of target tokens) of one batch."""
    hidden, targets, _ = _labelled(embedder, batch)
    loss = F.cross_entropy(lm_head(embedder)(hidden).float(), targets, reduction="sum")
    return loss, len(targets)


# ---------------------------------------------------------------- the reranker


def label_loss(embedder: MMEmbedder, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum over rows of -log p(verdict), number of rows): the reranker's loss.

    Each row has one labelled token, its verdict; ``batch["label_ids"]`` (rows, 2) holds the row's
    two label tokens (the template's "yes" and "no"), and the loss is the cross-entropy over those
    two logits alone at the answer position: ``-log p_yes`` for a "yes" row, ``-log (1 - p_yes)``
    for a "no" row, with ``p_yes`` as ``Reranker.score`` computes it.
    """
    rows, targets, keep = _labelled(embedder, batch)
    if not bool((keep.sum(1) == 1).all()):
        raise ValueError("a reranker sample must have exactly one target token (its verdict)")
    pair = batch["label_ids"].to(targets.device)
    if not bool(((targets == pair[:, 0]) | (targets == pair[:, 1])).all()):
        raise ValueError("a reranker sample's target is neither of its two label tokens")
    head = lm_head(embedder)  # only the two label rows of its (vocab, hidden) weight are read
    logits = torch.einsum("rh,rkh->rk", rows.float(), head.weight[pair].float())
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[pair].float()
    verdict = (targets == pair[:, 1]).long()  # 0: the first label ("yes"), 1: the second
    return F.cross_entropy(logits, verdict, reduction="sum"), len(targets)


@functools.cache
def default_template(task: str | None) -> PromptTemplate:
    """The shipped judge template of a task's family, read once per process."""
    return load_prompt(family_for_task(task))


def reranker_sample(
    template: PromptTemplate | None, query: Mapping[str, Any], doc: Mapping[str, Any], match: bool, **kw: Any
) -> Sample:
    """The judge prompt for (query, doc), its target the template's first label ("yes") when
    ``match``, else its second ("no")."""
    template = template or default_template(query.get("task"))
    answer = template.labels[0] if match else template.labels[1]
    return Sample(render(template, dict(query), dict(doc), **kw), images_of(dict(query), dict(doc)), answer)


def reranker_labels(query: Mapping[str, Any], template: PromptTemplate | None = None) -> tuple[str, str]:
    """The two label words the judge reads for ``query`` (its task family's template)."""
    return tuple((template or default_template(query.get("task"))).labels)  # type: ignore[return-value]


class Reranker:
    """A trained reranker checkpoint as a judge: ``score(queries, docs) -> p_yes`` per pair.

    ``template`` fixes the prompt (default: each query's task family); the label tokens are the
    template's labels. The scoring itself is the judge's transformers backend
    (``curation.judge.hf.TransformersScorer``) over this model and processor: one forward pass per
    batch, reading only the two label logits at the answer position. ``scorer`` is that backend,
    ready to hand to the judge stage.
    """

    def __init__(
        self,
        embedder: MMEmbedder,
        template: PromptTemplate | None = None,
        batch_size: int = 16,
        model_id: str = "assay-reranker",
    ):
        self.embedder = embedder
        self.template = template
        self.scorer = TransformersScorer(
            embedder.model,
            embedder._processor,
            model_id=model_id,
            batch_size=batch_size,
            image_root=embedder.image_root,
        )

    def item(self, query: Mapping[str, Any], doc: Mapping[str, Any]) -> JudgeItem:
        template = self.template or default_template(query.get("task"))
        q, d = dict(query), dict(doc)
        return JudgeItem(render(template, q, d), images_of(q, d), template.labels)

    def score(self, queries: Sequence[Mapping[str, Any]], docs: Sequence[Mapping[str, Any]]) -> list[float]:
        """p_yes per (query, doc); ValueError when a pair cannot be scored."""
        if len(queries) != len(docs):
            raise ValueError(f"{len(queries)} queries but {len(docs)} docs")
        was_training = self.embedder.training
        self.embedder.eval()
        self.scorer.image_root = self.embedder.image_root
        try:
            scores = self.scorer.score([self.item(q, d) for q, d in zip(queries, docs, strict=True)])
        finally:
            self.embedder.train(was_training)
        bad = [(i, s.error) for i, s in enumerate(scores) if not s.ok]
        if bad:
            raise ValueError(f"{len(bad)} pair(s) could not be scored; first: pair {bad[0][0]}: {bad[0][1]}")
        return [float(s.p_yes) for s in scores]
