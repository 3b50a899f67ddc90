"""A tiny Qwen2-VL of the real architecture, with its tokenizer and processor built offline.

The judge backends (transformers in ``curation.judge.hf``, vLLM in ``curation.judge.vllm_backend``)
are tested against each other on the same directory, so it has to load in both: transformers'
``AutoModelForImageTextToText`` + ``AutoProcessor`` and ``vllm.LLM``. What it holds:

- ``Qwen2VLForConditionalGeneration``, randomly initialised: a 2-layer, 128-wide Qwen2 language model
  (heads 32 wide, the smallest vLLM's kernels take) with multimodal rotary sections summing to half
  the head, and a 2-block, 64-wide vision tower (patch 14, 2x2 merge, as the real one);
- a byte-level BPE tokenizer trained with :func:`training.tiny.train_tokenizer` on the caller's texts,
  with Qwen2-VL's special tokens added (``<|vision_start|>``, ``<|image_pad|>``, ...) and the judge's
  label words ``yes`` and ``no`` as single tokens (the InternVL image tokens that function adds stay
  unused in the vocabulary);
- a ``Qwen2VLProcessor`` with a small pixel budget (56x56 to 112x112 px: 4 to 16 image tokens per
  image) and Qwen2-VL's ChatML chat template. transformers' ``Qwen2VLProcessor`` requires a video
  processor, and video processors need torchvision: build (and load) it where torchvision imports,
  e.g. ``.venv-vllm``. ``AutoProcessor`` then picks the torchvision image processor; the two
  backends load the same directory in the same environment, so they preprocess images alike.

The weights are saved as float32 safetensors: both backends then run in float32 and agree closely.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from assay.training.tiny import IM_END, LABEL_WORDS, PAD, train_tokenizer

#: Qwen2-VL's own special tokens, named as its processor and config read them.
VISION_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
#: The chat template shipped with Qwen2-VL-*-Instruct, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH_SIZE, MERGE_SIZE = 14, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
#: Words the tokenizer is trained on besides the caller's (the judge templates' vocabulary).
DEFAULT_TEXTS = [
    "You are a helpful assistant.",
    "Determine whether the given target matches the query. Answer yes or no.",
    "Query: Target: Question: Answer: Does the image show a red circle? a blue square? a green triangle?",
    "Is this caption a correct description of the picture? The answer is yes. The answer is no.",
]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2-VL's special tokens and ``yes``/``no`` as one token each."""
    backend = train_tokenizer(texts, vocab_size=vocab_size).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens=dict(VISION_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(list(LABEL_WORDS))
    return tokenizer


def tiny_config(
    tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 128, num_layers: int = 2
) -> Qwen2VLConfig:
    """Qwen2-VL's architecture at toy size over ``tokenizer``'s vocabulary (rounded up to 64)."""
    head_dim, vision_dim, vision_head_dim = 32, 64, 32
    heads = hidden_size // head_dim
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in VISION_TOKENS.items()}
    text = {
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # Qwen2-VL's M-RoPE: (temporal, height, width) sections of half the head (16 + 24 + 24 of 64).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        "bos_token_id": tokenizer.convert_tokens_to_ids(PAD),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "depth": num_layers,
        "embed_dim": vision_dim,
        "hidden_size": hidden_size,  # the merger projects into the language model's width
        "mlp_ratio": 2,
        "num_heads": vision_dim // vision_head_dim,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
    """Qwen2-VL's processor with the PIL image processor and a 56..112 px pixel budget.

    ``Qwen2VLProcessor`` cannot be built (nor loaded by ``AutoProcessor``) without its video
    processor, and transformers' video processors need torchvision: ImportError where it is missing.
    """
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except ImportError as e:
        raise ImportError(
            "a Qwen2-VL processor needs torchvision (transformers' Qwen2VLProcessor requires a video "
            "processor); build the tiny Qwen2-VL in .venv-vllm (scripts/vllm-cpu-env.sh)"
        ) from e
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    patches = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": 2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**pixels, **patches),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels, **patches),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen2vl(out_dir: str | Path, texts: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (float32 safetensors), its tokenizer and processor to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tokenizer([*DEFAULT_TEXTS, *(texts or [])])
    processor = build_processor(tokenizer)  # first: fails early without torchvision
    config = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
