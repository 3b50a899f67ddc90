"""The transformers judge backend: in process, on the CPU by default, on a GPU when given one.

``TransformersScorer.from_pretrained(path)`` loads any chat vision-language model (or a text-only
causal LM) that transformers reads without remote code; ``TransformersScorer(model, processor, ...)``
wraps a model already in memory (``pipelines`` hands over an assay reranker this way, so curation/
never imports training/).

How a batch is scored:

1. each item's parts go through the model's own chat template (``apply_chat_template`` with the
   generation prompt), and its images through the model's own processor;
2. items are grouped by length (similar lengths share a batch, so little of it is padding) and
   left-padded, so the last position of every row is its answer position;
3. ONE forward pass per batch, keeping only the last position's logits (``logits_to_keep=1``); the
   two label tokens' entries give the margin. Nothing is sampled, nothing is normalised over the
   vocabulary.

A batch that fails (a broken image, a prompt longer than the model takes) is retried one item at a
time so that only the bad items get an error Score. torch and transformers are imported here, not by
``curation.judge``: the default install can render prompts and read judgments without them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from curation.judge.scoring import JudgeItem, Score, checked_score, label_token_ids, model_id_for


def load_pil(value: Any, root: str | os.PathLike | None = None) -> Image.Image:
    """An RGB PIL image from PIL, raw bytes, a path (relative ones under ``root``) or a {bytes, path} cell."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        with Image.open(path) as im:
            return im.convert("RGB")
    raise TypeError(f"cannot read an image from {type(value).__name__}")


def prompt_text(processor: Any, parts: list[dict[str, str]]) -> str:
    """The model's own chat template over one user message with ``parts``, ending in the answer slot."""
    messages = [{"role": "user", "content": parts}]
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TypeError, ValueError):
        # A text-only tokenizer whose template wants a string, not parts.
        if any(p["type"] == "image" for p in parts):
            raise
        text = "".join(p["text"] for p in parts)
        return processor.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )


class TransformersScorer:
    """A transformers model as a judge (see the module docstring).

    ``model_id`` names the model and its weights (the judgment cache's key); ``batch_size`` is the
    number of prompts per forward pass; ``image_root`` resolves relative image paths.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        model_id: str,
        batch_size: int = 16,
        image_root: str | os.PathLike | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.batch_size = batch_size
        self.image_root = image_root
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._label_ids: dict[tuple[str, str], tuple[int, int]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        model_id: str | None = None,
        image_root: str | os.PathLike | None = None,
    ) -> TransformersScorer:
        """Load a model directory; float32 on the CPU, bfloat16 on a GPU unless ``dtype`` says."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        kw = {"trust_remote_code": trust_remote_code}
        processor = AutoProcessor.from_pretrained(path, **kw)
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kw)
        except ValueError:  # not a vision-language model: a text-only judge
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        if hasattr(model.config, "vision_config") and not hasattr(processor, "image_processor"):
            raise ValueError(
                f"{path}: AutoProcessor found no image processor for this vision-language model "
                f"({type(model).__name__}); an assay checkpoint is loaded by `assay judge`, which knows it"
            )
        model.to(device).eval()
        return cls(
            model,
            processor,
            model_id=model_id or model_id_for(path),
            batch_size=batch_size,
            image_root=image_root,
        )

    # -- scoring

    def label_ids(self, labels: tuple[str, str]) -> tuple[int, int]:
        if labels not in self._label_ids:
            self._label_ids[labels] = label_token_ids(self.tokenizer, labels)
        return self._label_ids[labels]

    def score(self, items: Sequence[JudgeItem]) -> list[Score]:
        """One Score per item, in order; failures become error Scores, never exceptions."""
        out: list[Score | None] = [None] * len(items)
        texts: list[str | None] = []
        for i, item in enumerate(items):
            try:
                texts.append(prompt_text(self.processor, item.parts))
            except Exception as e:  # noqa: BLE001 - a template that cannot take this item
                texts.append(None)
                out[i] = Score(error=f"chat template failed: {type(e).__name__}: {e}")
        # Length groups: image count first (image prompts are long), then text length.
        order = sorted(
            (i for i in range(len(items)) if texts[i] is not None),
            key=lambda i: (len(items[i].images), len(texts[i] or "")),
        )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            try:
                scores = self._forward([items[i] for i in chunk], [texts[i] for i in chunk])
            except Exception:  # noqa: BLE001 - find the bad item(s): one at a time
                scores = []
                for i in chunk:
                    try:
                        scores.extend(self._forward([items[i]], [texts[i]]))
                    except Exception as e:  # noqa: BLE001
                        scores.append(Score(error=f"{type(e).__name__}: {e}"))
            for i, s in zip(chunk, scores, strict=True):
                out[i] = s
        return [s if s is not None else Score(error="not scored") for s in out]

    @torch.no_grad()
    def _forward(self, items: Sequence[JudgeItem], texts: Sequence[str]) -> list[Score]:
        ids = [self.label_ids(tuple(it.labels)) for it in items]
        images = [load_pil(img, self.image_root) for it in items for img in it.images]
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt", "padding_side": "left"}
        if images and not hasattr(self.processor, "image_processor"):
            raise ValueError("this judge's processor takes no images (a text-only model)")
        if images:
            kwargs["images"] = images
        proc = self.processor if images or self.processor is not self.tokenizer else self.tokenizer
        enc = proc(text=list(texts), **kwargs)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}
        try:
            logits = self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1]
        except TypeError:  # a model without logits_to_keep
            logits = self.model(**enc, use_cache=False).logits[:, -1]
        rows = torch.arange(len(items), device=logits.device)
        pair = torch.tensor(ids, device=logits.device)
        yes = logits[rows, pair[:, 0]].float().tolist()
        no = logits[rows, pair[:, 1]].float().tolist()
        return [checked_score(y, n) for y, n in zip(yes, no, strict=True)]
