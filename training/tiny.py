"""A tiny InternVL of the real architecture, with a tokenizer and processor built offline.

Tests and the quickstart cannot download weights, so they build the same transformers classes a real
run loads (``InternVLConfig`` with an InternViT-style vision tower and a Qwen2 language model),
only small and randomly initialised:

- the vision tower sees a 64 px image in 2 px patches: a 32 x 32 feature grid, the same grid a
  448 px tile gives InternViT (patch 14), so every tokens-per-tile setting of the paper
  (36 ... 256) is exercised on the real code path;
- attention heads are 32 wide (vLLM's kernels want at least that), two layers per tower;
- the tokenizer is a byte-level BPE trained with ``tokenizers`` on the caller's texts, plus the
  special tokens InternVL's processor needs (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``)
  and the ChatML ones of Qwen (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` as pad).

``build_tiny(texts)`` returns ``(model, processor)``; ``MMEmbedder(model, processor)`` is the
embedder and ``save_pretrained`` writes a directory that ``load_embedder`` reads exactly as it reads
a pretrained InternVL3 ``-hf`` directory. ``internvl3_2b_config`` writes the InternVL3-2B shapes in
code (for benchmarks with random weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, InternVLVisionConfig, PreTrainedTokenizerFast, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from assay.training.model import (
    CompressedInternVLForConditionalGeneration,
    EmbedderProcessor,
    check_tokens_per_tile,
)

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
#: InternVL's image tokens, named as its processor reads them from the tokenizer.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
SPECIAL_TOKENS = [PAD, IM_START, IM_END, *IMAGE_TOKENS.values()]
#: ChatML, as Qwen2 and InternVL3 use it; stage 1 (next-token training) renders samples with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: The judge's answer words; real vocabularies have each as one token, and so does the tiny one.
LABEL_WORDS = ("yes", "no")
#: InternVL normalises with the ImageNet statistics.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE (Qwen's kind) trained on ``texts``; any text encodes, nothing is unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens=dict(IMAGE_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    vocab_size: int,
    image_token_id: int,
    *,
    tokens_per_tile: int = 64,
    image_size: int = 64,
    patch_size: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    head_dim: int = 32,
    layer_scale: float = 0.1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> InternVLConfig:
    """InternVL3's architecture at toy width: both towers ``hidden_size`` wide, ``num_layers`` deep."""
    heads = hidden_size // head_dim
    vision = InternVLVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 2,
        image_size=image_size,
        patch_size=patch_size,
        attention_bias=True,  # InternViT-300M has qkv bias
        layer_scale_init_value=layer_scale,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    config = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    check_tokens_per_tile(config, tokens_per_tile)
    return config


def internvl3_2b_config(tokens_per_tile: int = 256, image_token_id: int = 151667) -> InternVLConfig:
    """The InternVL3-2B shapes: InternViT-300M-448px + Qwen2.5-1.5B, written in code (no download)."""
    vision = InternVLVisionConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=448,
        patch_size=14,
        attention_bias=True,
    )
    text = Qwen2Config(
        vocab_size=151674,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    config = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    check_tokens_per_tile(config, tokens_per_tile)
    return config


def build_processor(
    tokenizer: PreTrainedTokenizerFast, *, image_size: int = 64, tokens_per_tile: int = 64
) -> EmbedderProcessor:
    """InternVL's processor over ``tokenizer`` with the image processor InternVL uses (GOT-OCR2's).

    The PIL flavour needs no torchvision; one ``image_size`` tile per image unless the embedder asks
    for dynamic tiling.
    """
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return EmbedderProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )


def template_texts() -> list[str]:
    """The words of every prompt the model will read besides the data: the embedder's templates,
    the chat roles and the shipped judge prompts (the reranker's input). In the tokenizer's training
    texts they become a few tokens each instead of one per character: the judge prompt of a short
    pair is ~50 tokens instead of ~80, which is what lets a 2-layer reranker find the words it must
    compare (docs/BENCHMARKS.md)."""
    from assay.curation.judge.prompts import FAMILIES, load_prompt

    texts = ["Instruct: Query: Text:", "user", "assistant"]
    for family in FAMILIES:
        prompt = load_prompt(family)
        texts += [prompt.instruction, prompt.template, *prompt.subsets.values(), *prompt.labels]
    return texts


def build_tiny(
    texts: Iterable[str],
    tokens_per_tile: int = 64,
    image_size: int = 64,
    *,
    patch_size: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 1024,
    layer_scale: float = 0.1,
    seed: int = 0,
) -> tuple[CompressedInternVLForConditionalGeneration, EmbedderProcessor]:
    """A randomly initialised tiny compressed InternVL and its processor, built with no network.

    ``texts`` trains the tokenizer (the dataset's instructions and texts; the templates' own words are
    added). The language model's vocabulary is the tokenizer's size rounded up to a multiple of 64.
    """
    tokenizer = train_tokenizer([*template_texts(), *texts], vocab_size=vocab_size)
    tokenizer.add_tokens(list(LABEL_WORDS))  # one token each, as in real vocabularies: the judge reads them
    config = tiny_config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        image_token_id=tokenizer.context_image_token_id,
        tokens_per_tile=tokens_per_tile,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        layer_scale=layer_scale,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CompressedInternVLForConditionalGeneration(config)
    processor = build_processor(tokenizer, image_size=image_size, tokens_per_tile=tokens_per_tile)
    return model.eval(), processor
