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

Shared prefixes. A judge's real input is a query with many mined candidates: the same instruction
and query image in front of each candidate. Items whose prompts start with the same text up to their
first image, and the same image, form a group; the group's prefix (chat preamble, instruction, first
image) is encoded once, image and all, and its key/value cache is copied to each candidate's row,
which then runs only its own suffix (the rest of the query and the candidate). The scores are the
same as the plain path's (a test holds them to 1e-5): the suffix gets the positions it would have had,
and before a scorer first shares a prefix it checks, on one item, that tokenising prefix and suffix
apart gives the ids of the whole prompt; if not, it never shares. Groups of one, models outside
``SHARED_PREFIX_MODELS``, ``prefix_sharing=False`` and, unless asked, a model on a GPU take the plain
path (see ``TransformersScorer._shared_attention``).

A batch that fails (a broken image, a prompt longer than the model takes) is retried one item at a
time so that only the bad items get an error Score. torch and transformers are imported here, not by
``curation.judge``: the default install can render prompts and read judgments without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from assay.curation import storage
from assay.curation.judge.scoring import JudgeItem, Score, checked_score, label_token_ids, model_id_for
from assay.curation.safety import refuse_pickle
from assay.curation.schema import load_image


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


#: Model types whose forward takes a key/value cache with explicit 1-D (RoPE) position ids, so that a
#: shared prefix can be encoded once. (Qwen2-VL's 3-D positions are not among them: plain path.)
SHARED_PREFIX_MODELS = frozenset({"internvl"})


def image_key(value: Any, root: str | os.PathLike | None = None) -> str:
    """A key equal for two image cells exactly when they hold the same image (bytes hash or path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return "b:" + hashlib.blake2b(bytes(value), digest_size=16).hexdigest()
    if isinstance(value, (str, os.PathLike)):
        if storage.is_remote(value):  # an image on object storage: its URI names it
            return f"p:{value}"
        if root is not None and storage.is_remote(root) and not os.path.isabs(value):
            return f"p:{storage.resolve_under(root, os.fspath(value))[1]}"
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        return f"p:{os.path.normpath(path)}"
    return f"o:{id(value)}"  # a PIL image in memory: the same object only


@dataclass
class _Group:
    """Items that share a prompt prefix: the text up to and including their first image, and that image."""

    prefix: str
    image: Any
    members: list[int] = field(default_factory=list)  # item indices


class TransformersScorer:
    """A transformers model as a judge (see the module docstring).

    ``model_id`` names the model and its weights (the judgment cache's key); ``batch_size`` is the
    number of prompts per forward pass; ``image_root`` resolves relative image paths;
    ``prefix_sharing`` encodes a shared query prefix once (None: where the model allows it, on the
    CPU; see ``_shared_attention`` for the GPU).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        model_id: str,
        batch_size: int = 16,
        image_root: str | os.PathLike | None = None,
        prefix_sharing: bool | None = None,
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
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        image_token = getattr(processor, "image_token", None)
        possible = model_type in SHARED_PREFIX_MODELS and image_token is not None
        if prefix_sharing and not possible:
            raise ValueError(f"prefix sharing needs a model of type {sorted(SHARED_PREFIX_MODELS)}")
        # Left to itself (None), a scorer shares prefixes on the CPU only: see _shared_attention.
        params = getattr(model, "parameters", None)
        on_cpu = params is None or next(params()).device.type == "cpu"
        self.prefix_sharing = (possible and on_cpu) if prefix_sharing is None else prefix_sharing
        self._tokenisation_checked: set[bool] = set()  # suffix kinds (with images?) checked
        # transformers 5.2x renamed forward's past_key_values to cache; take whichever it has.
        forward = inspect.signature(type(model).forward).parameters if self.prefix_sharing else {}
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"

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
        allow_pickle: bool = False,
    ) -> TransformersScorer:
        """Load a model directory; float32 on the CPU, bfloat16 on a GPU unless ``dtype`` says.

        A directory holding pickle weights is refused unless ``allow_pickle`` (curation.safety).
        """
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        refuse_pickle(path, allow_pickle)

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
        plain = [i for i in range(len(items)) if texts[i] is not None]
        if self.prefix_sharing:
            groups, plain = self._groups(items, texts, plain)
            for batch in self._group_batches(groups, texts):
                try:
                    scores = self._forward_shared(items, texts, batch)
                except Exception:  # noqa: BLE001 - the plain path finds the bad item(s)
                    scores = None
                members = [i for g in batch for i in g.members]
                if scores is None:
                    plain.extend(members)
                    continue
                for i, s in zip(members, scores, strict=True):
                    out[i] = s
            plain.sort()
        # Length groups: image count first (image prompts are long), then text length.
        order = sorted(plain, key=lambda i: (len(items[i].images), len(texts[i] or "")))
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

    # -- shared prefixes

    def _groups(
        self, items: Sequence[JudgeItem], texts: Sequence[str | None], indices: list[int]
    ) -> tuple[list[_Group], list[int]]:
        """Items with the same text up to their first image and the same image; the rest stay plain."""
        token = self.processor.image_token
        by_key: dict[tuple[str, str], _Group] = {}
        for i in indices:
            text = texts[i] or ""
            cut = text.find(token)
            if cut < 0 or not items[i].images:
                continue
            prefix = text[: cut + len(token)]
            key = (prefix, image_key(items[i].images[0], self.image_root))
            by_key.setdefault(key, _Group(prefix, items[i].images[0])).members.append(i)
        groups = [g for g in by_key.values() if len(g.members) > 1]
        shared = {i for g in groups for i in g.members}
        return groups, [i for i in indices if i not in shared]

    def _group_batches(
        self, groups: list[_Group], texts: Sequence[str | None] | None = None
    ) -> list[list[_Group]]:
        """Groups packed into batches of at most ``batch_size`` items (a big group is split).

        With ``texts``, a piece's prefix is extended to the last line break its members' prompts
        share (the query's own text, when they judge the same query), where that cut tokenises the
        same as the whole prompt.
        """
        pieces = []
        for g in sorted(groups, key=lambda g: len(g.prefix)):
            for start in range(0, len(g.members), self.batch_size):
                members = g.members[start : start + self.batch_size]
                prefix = (
                    g.prefix if texts is None or len(members) < 2 else self._longer_prefix(g, members, texts)
                )
                pieces.append(_Group(prefix, g.image, members))
        batches: list[list[_Group]] = []
        size = 0
        for piece in pieces:
            if not batches or size + len(piece.members) > self.batch_size:
                batches.append([])
                size = 0
            batches[-1].append(piece)
            size += len(piece.members)
        return batches

    def _longer_prefix(self, group: _Group, members: list[int], texts: Sequence[str | None]) -> str:
        whole = [texts[i] or "" for i in members]
        common = os.path.commonprefix(whole)[: min(map(len, whole)) - 1]  # every suffix keeps a token
        cut = common.rfind("\n") + 1
        prefix = common[:cut]
        if cut <= len(group.prefix) or prefix.count(self.processor.image_token) != 1:
            return group.prefix
        tok = self.tokenizer
        joined = tok(prefix)["input_ids"] + tok(whole[0][cut:], add_special_tokens=False)["input_ids"]
        return prefix if joined == tok(whole[0])["input_ids"] else group.prefix

    def _encode_suffixes(self, suffixes: list[str], images: list[Image.Image]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt", "padding_side": "left"}
        if images:
            return dict(self.processor(text=suffixes, images=images, add_special_tokens=False, **kwargs))
        return dict(self.tokenizer(suffixes, add_special_tokens=False, **kwargs))

    def _check_tokenisation(self, text: str, prefix: str, images: list[Image.Image]) -> bool:
        """Do prefix and suffix, tokenised apart, give the whole prompt's ids? (checked once per kind)"""
        kind = len(images) > 1
        if kind in self._tokenisation_checked:
            return True
        whole = self.processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]
        head = self.processor(text=[prefix], images=images[:1], return_tensors="pt")["input_ids"][0]
        tail = self._encode_suffixes([text[len(prefix) :]], images[1:])["input_ids"][0]
        if not torch.equal(whole, torch.cat([head, tail])):
            self.prefix_sharing = False  # this tokenizer merges across the cut: never share
            return False
        self._tokenisation_checked.add(kind)
        return True

    @torch.no_grad()
    def _forward_shared(
        self, items: Sequence[JudgeItem], texts: Sequence[str | None], groups: list[_Group]
    ) -> list[Score] | None:
        """Score the groups' members, each group's prefix encoded once; None: use the plain path."""
        if not self.prefix_sharing:
            return None
        loaded: dict[str, Image.Image] = {}

        def pil(value: Any) -> Image.Image:
            key = image_key(value, self.image_root)
            if key not in loaded:
                loaded[key] = load_image(value, self.image_root)
            return loaded[key]

        members = [i for g in groups for i in g.members]
        first = items[members[0]]
        if not self._check_tokenisation(
            texts[members[0]] or "", groups[0].prefix, [pil(v) for v in first.images]
        ):
            return None
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt", "padding_side": "left"}
        head = self.processor(
            text=[g.prefix for g in groups], images=[pil(g.image) for g in groups], **kwargs
        )
        head = {k: v.to(device) for k, v in head.items() if hasattr(v, "to")}
        with self._shared_attention():
            out = self.model(**head, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        row = torch.tensor([k for k, g in enumerate(groups) for _ in g.members], device=device)
        cache.batch_select_indices(row)
        suffixes = [(texts[i] or "")[len(g.prefix) :] for g in groups for i in g.members]
        tail = self._encode_suffixes(suffixes, [pil(v) for i in members for v in items[i].images[1:]])
        tail = {k: v.to(device) for k, v in tail.items() if hasattr(v, "to")}
        # Each suffix token gets the position it has in the whole prompt: right after its prefix's
        # last token (prefixes are left-padded to the same length, so that is head_len for all).
        head_len, tail_mask = head["input_ids"].shape[1], tail["attention_mask"]
        pads = tail_mask.shape[1] - tail_mask.sum(1, keepdim=True)
        steps = torch.arange(tail_mask.shape[1], device=device).unsqueeze(0)
        tail["position_ids"] = head_len + (steps - pads).clamp(min=0)
        tail["attention_mask"] = torch.cat([head["attention_mask"][row], tail_mask], dim=1)
        tail[self._cache_arg] = cache
        with self._shared_attention():
            logits = self.model(**tail, use_cache=True, logits_to_keep=1).logits[:, -1]
        return self._scores([items[i] for i in members], logits)

    @contextlib.contextmanager
    def _shared_attention(self):
        """Eager attention for the shared-prefix forwards on a GPU.

        On an H200 (torch 2.11, transformers 5.17, fp32), the shared path with sdpa attention gave
        p_yes up to 1.2e-2 away from the plain path's for some rows (16 of 256 when every prompt
        was its own group; the cause is not found), while eager attention gave the plain path's
        numbers (max difference 3.2e-8 over 256 pairs at batch 1, 8 and 64). So a GPU scorer does
        not share prefixes unless asked (``prefix_sharing=True``), and then runs these two
        forwards with eager attention. On the CPU both give the plain path's numbers.
        """
        if next(self.model.parameters()).device.type == "cpu":
            yield
            return
        config = self.model.config
        configs = [
            c
            for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None))
            if c is not None
        ]
        saved = [c._attn_implementation for c in configs]
        try:
            for c in configs:
                c._attn_implementation = "eager"
            yield
        finally:
            for c, impl in zip(configs, saved, strict=True):
                c._attn_implementation = impl

    @torch.no_grad()
    def _forward(self, items: Sequence[JudgeItem], texts: Sequence[str]) -> list[Score]:
        for it in items:  # unknown label words fail here, before the forward pass
            self.label_ids(tuple(it.labels))
        images = [load_image(img, self.image_root) for it in items for img in it.images]
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
        return self._scores(items, logits)

    def _scores(self, items: Sequence[JudgeItem], logits: torch.Tensor) -> list[Score]:
        """The two label logits of each row (one row per item) as Scores."""
        ids = [self.label_ids(tuple(it.labels)) for it in items]
        rows = torch.arange(len(items), device=logits.device)
        pair = torch.tensor(ids, device=logits.device)
        yes = logits[rows, pair[:, 0]].float().tolist()
        no = logits[rows, pair[:, 1]].float().tolist()
        return [checked_score(y, n) for y, n in zip(yes, no, strict=True)]
