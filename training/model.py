"""The embedder: InternVL with parameter-free visual token compression, read out at the last token.

How InternVL turns a tile into tokens (transformers' ``InternVLModel.get_image_features``): the
vision tower maps a 448 px tile, patch 14, to a 32 x 32 grid of features (CLS dropped); the grid is
reshaped to ``(B, 32, 32, C)`` and *pixel-shuffled* with ``downsample_ratio`` 0.5, which folds each
2 x 2 block into one feature of 4C channels: 16 x 16 = 256 tokens; the MLP connector projects them
into the language model, where they replace the ``<IMG_CONTEXT>`` placeholders the processor put in
the prompt (``image_seq_length`` of them per tile).

The paper's compression (PAPER.md) is one extra step before the pixel shuffle: resize the feature
map bilinearly, with no learned weights, to the side that yields the requested tokens per tile::

    tokens per tile   36     64     100    144    256 (vanilla)
    grid before shuffle 12x12  16x16  20x20  24x24  32x32 (identity: no resize at all)

``CompressedInternVLModel`` overrides only ``pixel_shuffle`` (the one place that sees the spatial
grid) to resize first; every weight name stays InternVL's, so a pretrained ``-hf`` checkpoint loads
as is. The tokens per tile are ``config.image_seq_length``, the field InternVL already has, and the
processor's ``image_seq_length`` must equal it: ``MMEmbedder`` refuses a pair that disagrees and
``MMEmbedder.set_tokens_per_tile`` changes both together.

The embedding is the last token's hidden state, L2-normalised. Prompts follow the paper::

    query:     Instruct: {instruction} <image> Query: {text}
    candidate: Instruct: {instruction} <image> Text: {text}

where a part with nothing to say (no instruction, no image, no text) is left out.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, InternVLConfig, InternVLProcessor
from transformers.image_processing_backends import PilBackend
from transformers.models.internvl.modeling_internvl import (
    InternVLForConditionalGeneration,
    InternVLModel,
    InternVLPreTrainedModel,
)

from assay.curation.safety import refuse_pickle
from assay.curation.schema import load_image

log = logging.getLogger(__name__)

Side = Literal["query", "candidate"]
#: Tokens per tile the paper ablates (256 is vanilla InternVL3, 64 is the paper's choice).
TOKENS_PER_TILE_CHOICES = (36, 64, 100, 144, 256)
#: Prefix of the text after the image: the paper's ``Query:`` / ``Text:``.
TEXT_LABEL: dict[str, str] = {"query": "Query:", "candidate": "Text:"}
#: Written next to the weights: the embedder's own settings (everything else is transformers').
EMBEDDER_FILE = "assay_embedder.json"


# ---------------------------------------------------------------- the compression


def compressed_side(tokens_per_tile: int, downsample_ratio: float) -> int:
    """Side of the feature grid, before pixel shuffle, that yields ``tokens_per_tile`` tokens.

    Pixel shuffle turns an ``s x s`` grid into ``(s * r) x (s * r)`` tokens, so the grid must be
    ``sqrt(tokens) / r`` on a side: 64 tokens at r = 0.5 need 16 x 16.
    """
    root = math.isqrt(tokens_per_tile)
    side = root / downsample_ratio
    if root * root != tokens_per_tile or tokens_per_tile <= 0 or side != int(side):
        raise ValueError(
            f"tokens_per_tile={tokens_per_tile} is not a square whose side divided by downsample_ratio="
            f"{downsample_ratio} is whole; try one of {TOKENS_PER_TILE_CHOICES}"
        )
    return int(side)


def vanilla_tokens_per_tile(config: InternVLConfig) -> int:
    """Tokens per tile of unmodified InternVL: (image_size / patch_size * downsample_ratio) ** 2."""
    grid = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
    return int(grid * config.downsample_ratio) ** 2


def check_tokens_per_tile(config: InternVLConfig, tokens_per_tile: int) -> None:
    """Refuse a setting the vision grid cannot give: not square, or more tokens than vanilla."""
    compressed_side(tokens_per_tile, config.downsample_ratio)
    vanilla = vanilla_tokens_per_tile(config)
    if tokens_per_tile > vanilla:
        raise ValueError(
            f"tokens_per_tile={tokens_per_tile} exceeds the vanilla {vanilla}: bilinear only downsamples"
        )


class CompressedInternVLModel(InternVLModel):
    """``InternVLModel`` whose vision feature map is resized bilinearly before the pixel shuffle.

    No parameters are added; the target comes from ``config.image_seq_length`` at every call, so
    changing the setting on a loaded model takes effect at once. When the grid already has the
    target side (256 tokens on a 448 px tile) the features pass through untouched: the output is
    exactly vanilla InternVL's.
    """

    def pixel_shuffle(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """Resize ``(B, H, W, C)`` features to the compressed side, then InternVL's pixel shuffle."""
        side = compressed_side(self.config.image_seq_length, scale_factor)
        if vision_features.shape[1] != side or vision_features.shape[2] != side:
            grid = vision_features.permute(0, 3, 1, 2)  # (B, C, H, W), what interpolate expects
            grid = F.interpolate(
                grid, size=(side, side), mode="bilinear", align_corners=False, antialias=False
            )
            vision_features = grid.permute(0, 2, 3, 1).contiguous()
        return super().pixel_shuffle(vision_features, scale_factor=scale_factor)


class CompressedInternVLForConditionalGeneration(InternVLForConditionalGeneration):
    """InternVL with the compressed vision path and the language-model head (stage 1 trains it).

    The same modules and weight names as ``InternVLForConditionalGeneration``; only the inner
    ``model`` is the compressed one. ``__init__`` repeats the parent's three lines rather than
    building a vanilla model and throwing it away.
    """

    def __init__(self, config: InternVLConfig) -> None:
        InternVLPreTrainedModel.__init__(self, config)
        self.model = CompressedInternVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


class EmbedderProcessor(InternVLProcessor):
    """InternVL's processor without the video processor.

    transformers' video processors need torchvision, which an embedder of images and text does not;
    dropping the argument from ``__init__`` also drops it from what ``save_pretrained`` writes.
    Everything else, including how ``<IMG_CONTEXT>`` expands to ``image_seq_length`` tokens per tile
    between ``<img>`` and ``</img>``, is InternVL's.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, image_backend: str = "pil") -> EmbedderProcessor:
        """Tokenizer + image processor from a model directory or hub id, never with remote code.

        ``image_backend`` pins the image processor's implementation: left to itself transformers
        picks torchvision where it is installed and PIL elsewhere, and the two resize a little
        differently, so the same checkpoint would embed the same image differently on two machines.
        """
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(
            path, trust_remote_code=False, backend=image_backend
        )
        seq = _read_json(path, "processor_config.json").get("image_seq_length", 256)
        template_file = Path(path) / "chat_template.jinja"
        chat_template = template_file.read_text() if template_file.is_file() else tokenizer.chat_template
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_length=int(seq),
            chat_template=chat_template,
        )


# ---------------------------------------------------------------- prompts and images


def format_prompt(row: Mapping[str, Any], side: Side, image_token: str) -> str:
    """The paper's template for one row; parts with nothing in them are left out.

    >>> format_prompt({"instruction": "Find it.", "text": "a cat", "image": None}, "query", "<I>")
    'Instruct: Find it. Query: a cat'
    """
    parts = []
    if row.get("instruction"):
        parts.append(f"Instruct: {row['instruction']}")
    if row.get("image") is not None:
        parts.append(image_token)
    if row.get("text"):
        parts.append(f"{TEXT_LABEL[side]} {row['text']}")
    if not parts:
        raise ValueError(f"row has no instruction, image or text: {dict(row)!r}")
    return " ".join(parts)


# ---------------------------------------------------------------- the embedder


class MMEmbedder(nn.Module):
    """Universal multimodal embedder: rows of (instruction, text, image) -> unit vectors.

    ``model`` is a ``CompressedInternVLForConditionalGeneration`` (a trainer may wrap it in peft:
    LoRA layers are injected in place, and ``backbone`` unwraps). Inference::

        emb = MMEmbedder(model, processor)
        q = emb.encode_queries([{"instruction": "...", "text": "...", "image": pil}])   # (N, D)

    Training: ``batch = emb.prepare(rows, "query")`` (CPU work, fine in a collate_fn), then
    ``emb(**batch.to(device))`` returns embeddings with grad. ``max_tiles`` > 1 turns on InternVL's
    dynamic tiling (that many 448 px tiles plus a thumbnail), each tile costing ``tokens_per_tile``.
    ``padding_side`` does not change any embedding (positions are counted from the attention
    mask); ``image_root`` resolves relative image paths of ``{bytes, path}`` cells.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: EmbedderProcessor | None = None,
        *,
        max_tiles: int = 1,
        padding_side: Literal["left", "right"] = "left",
        image_root: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.max_tiles = max_tiles
        self.padding_side = padding_side
        self.image_root = image_root
        if processor is not None and processor.image_seq_length != self.tokens_per_tile:
            raise ValueError(
                f"processor.image_seq_length={processor.image_seq_length} but the model makes "
                f"{self.tokens_per_tile} tokens per tile; use set_tokens_per_tile to change both"
            )
        check_tokens_per_tile(self.config, self.tokens_per_tile)

    @property
    def backbone(self) -> CompressedInternVLModel:
        """The inner vision-language model (no LM head), through a peft wrapper if there is one."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model.model

    @property
    def config(self) -> InternVLConfig:
        return self.backbone.config

    @property
    def image_backend(self) -> str:
        """ "pil" or "torchvision": which implementation of the image processor is in use."""
        image_processor = self._processor.image_processor
        return "pil" if isinstance(image_processor, PilBackend) else "torchvision"

    @property
    def tokens_per_tile(self) -> int:
        return int(self.config.image_seq_length)

    def set_tokens_per_tile(self, tokens_per_tile: int) -> None:
        """Change the compression: the model's grid and the processor's placeholder count together."""
        check_tokens_per_tile(self.config, tokens_per_tile)
        self.config.image_seq_length = tokens_per_tile
        if self.processor is not None:
            self.processor.image_seq_length = tokens_per_tile

    # -- tensors in, embeddings out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """L2-normalised float32 embeddings ``(B, D)`` of the last real token, with grad.

        Position ids are counted from the attention mask, so a row gets the same positions (and the
        same embedding) whether the batch pads it on the left, on the right, or not at all.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)  # last 1 in the mask, either padding side
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(pooled.float(), dim=-1)

    # -- rows in

    def prompts(self, rows: Sequence[Mapping[str, Any]], side: Side) -> list[str]:
        """The templated prompt of each row (``<IMG_CONTEXT>`` stands where the image goes)."""
        return [format_prompt(r, side, self._processor.image_token) for r in rows]

    def prepare(self, rows: Sequence[Mapping[str, Any]], side: Side) -> BatchFeature:
        """Tokenise a batch: ``input_ids``, ``attention_mask`` and, if any row has one, ``pixel_values``."""
        images = [load_image(r["image"], self.image_root) for r in rows if r.get("image") is not None]
        return self.process(self.prompts(rows, side), images)

    def process(
        self, texts: Sequence[str], images: Sequence[Image.Image], padding_side: str | None = None
    ) -> BatchFeature:
        """The processor on prompts and their images (in prompt order), padded to the longest prompt
        on ``padding_side`` (default: the embedder's), images tiled as ``image_kwargs`` says."""
        side = padding_side or self.padding_side
        kwargs: dict[str, Any] = {"padding": True, "padding_side": side, "return_tensors": "pt"}
        if images:
            kwargs.update(images=list(images), **self.image_kwargs())
        return self._processor(text=list(texts), **kwargs)

    def image_kwargs(self) -> dict[str, Any]:
        """How the processor cuts an image into tiles here: one tile, or InternVL's dynamic tiling."""
        return {"crop_to_patches": self.max_tiles > 1, "max_patches": self.max_tiles}

    def embed(self, rows: Sequence[Mapping[str, Any]], side: Side) -> torch.Tensor:
        """``forward`` on rows, with grad: what a training step calls."""
        device = next(self.model.parameters()).device
        return self(**self.prepare(rows, side).to(device))

    @torch.no_grad()
    def encode(self, rows: Sequence[Mapping[str, Any]], side: Side, batch_size: int = 32) -> torch.Tensor:
        """Embeddings ``(N, D)`` on the CPU, in eval mode, ``batch_size`` rows at a time."""
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.embed(rows[i : i + batch_size], side).cpu() for i in range(0, len(rows), batch_size)
            ]
        finally:
            self.train(was_training)
        dim = self.config.text_config.hidden_size
        return torch.cat(chunks) if chunks else torch.empty(0, dim)

    def encode_queries(self, rows: Sequence[Mapping[str, Any]], batch_size: int = 32) -> torch.Tensor:
        """Queries: ``Instruct: {instruction} <image> Query: {text}``."""
        return self.encode(rows, "query", batch_size)

    def encode_candidates(self, rows: Sequence[Mapping[str, Any]], batch_size: int = 32) -> torch.Tensor:
        """Candidates: ``Instruct: {instruction} <image> Text: {text}``."""
        return self.encode(rows, "candidate", batch_size)

    # -- checkpoints

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Weights as safetensors, config, tokenizer and image processor, and the embedder settings.

        A peft-wrapped model must be merged first (``merge_and_unload``): the directory is a whole
        model that ``load_embedder`` (or plain transformers) can read.
        """
        if hasattr(self.model, "get_base_model"):
            raise ValueError(
                "merge the LoRA adapters first (model.merge_and_unload()) and save the whole model"
            )
        path = Path(path)
        self.model.save_pretrained(path, safe_serialization=True)
        self._processor.save_pretrained(path)
        settings = {
            "tokens_per_tile": self.tokens_per_tile,
            "max_tiles": self.max_tiles,
            "padding_side": self.padding_side,
            "image_backend": self.image_backend,
        }
        (path / EMBEDDER_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @property
    def _processor(self) -> EmbedderProcessor:
        if self.processor is None:
            raise ValueError("this embedder has no processor: pass tensors to forward() instead of rows")
        return self.processor


def load_embedder(
    path: str | os.PathLike,
    tokens_per_tile: int | None = None,
    trust_remote_code: bool = False,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    max_tiles: int | None = None,
    image_backend: str | None = None,
    allow_pickle: bool = False,
) -> MMEmbedder:
    """An ``MMEmbedder`` from a directory or hub id: an assay checkpoint or a pretrained InternVL.

    The same path for both: transformers' InternVL classes (``model_type: internvl``, the ``-hf``
    conversions such as OpenGVLab/InternVL3-2B-hf) loaded into the compressed subclass. Remote code
    is never run: ``trust_remote_code=True`` is refused, and so is an original ``internvl_chat``
    checkpoint, which only remote code can read. ``tokens_per_tile`` defaults to what the directory
    says (``config.image_seq_length``); the processor is always set to the same number.
    ``image_backend`` ("pil" or "torchvision") defaults to what was saved, else "pil". A directory
    holding pickle files is refused unless ``allow_pickle`` (curation.safety).
    """
    refuse_pickle(path, allow_pickle)
    if trust_remote_code:
        raise ValueError("assay never runs remote code; use a transformers-native (-hf) InternVL checkpoint")
    config_dict, _ = InternVLConfig.get_config_dict(path)
    if config_dict.get("model_type") != InternVLConfig.model_type:
        raise ValueError(
            f"{path} is a {config_dict.get('model_type')!r} model, not transformers' 'internvl'; original "
            "OpenGVLab checkpoints ('internvl_chat') need remote code: use their -hf conversion"
        )
    config = InternVLConfig.from_pretrained(path, trust_remote_code=False)
    settings = _read_json(path, EMBEDDER_FILE)
    tokens = int(tokens_per_tile or settings.get("tokens_per_tile") or config.image_seq_length)
    check_tokens_per_tile(config, tokens)
    config.image_seq_length = tokens
    model = CompressedInternVLForConditionalGeneration.from_pretrained(
        path, config=config, dtype=dtype or "auto", trust_remote_code=False
    )
    if device is not None:
        model = model.to(device)
    image_backend = image_backend or settings.get("image_backend", "pil")
    processor = EmbedderProcessor.from_dir(path, image_backend=image_backend)
    if processor.image_seq_length != tokens:
        log.info("processor image_seq_length %d -> %d (tokens per tile)", processor.image_seq_length, tokens)
        processor.image_seq_length = tokens
    return MMEmbedder(
        model,
        processor,
        max_tiles=max_tiles or int(settings.get("max_tiles", 1)),
        padding_side=settings.get("padding_side", "left"),
    ).eval()


def _read_json(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """A small JSON file of a local model directory; ``{}`` when absent (or for a hub id)."""
    file = Path(path) / name
    return json.loads(file.read_text()) if file.is_file() else {}
